"""Bundles in the import workflows, kept apart from the steps they branch from.

- ``source.fetch``: a disk container whose URL or S3 key names an EC2 bundle manifest (``….manifest.xml``)
  is unbundled into scratch instead of downloaded (:mod:`appliance.sources.bundle`), with the cloud's
  private key of ``bundles.*`` (and its signature checked when ``bundles.signer_certs`` are set); then
  the workflow goes on as for any fetched disk (inspection, guest validation, conversion, target). The
  result has the fetch step's shape.
- ``manifest.wait`` / ``volume.import`` (pull mode): a verified ``BUNDLE`` download manifest
  (``ec2-bundles.md`` §9) becomes :func:`bundle_download`; ``volume.import`` then unbundles it onto the
  volume (:func:`unbundle_onto_volume`): the key and IV are decrypted with ``bundles.*`` (the key of the
  certificate the cloud re-encrypted them for), the parts fetched from their ``get-url`` in parallel,
  each SHA1-checked, and the image must be exactly ``unbundled-size`` bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..allowance import Allowance
from ..errors import BundleInvalid, ImageRejected
from ..image.stream import RawStreamCheck
from ..redact import redact_url
from ..sources.bundle import BundleLocation, unbundle_to_file
from ..sources.bundle_decrypt import MAX_PART_BYTES, check_part, decrypt_parts, size_limit
from ..sources.bundle_manifest import BundlePart, configured_cloud_key, configured_signer_keys, unwrap
from ..sources.euca_manifest import DownloadManifest
from ..sources.fetch import parse_source
from ..sources.http import HttpClient, SourceUnavailable
from ..sources.urlfilter import UrlPolicy
from ..targets.base import Volume, storage_error
from ..targets.rawio import RawWriter
from ..workflow.step import StepContext

MANIFEST_SUFFIX = ".manifest.xml"


def bundle_manifest_url(source: Mapping[str, Any]) -> str | None:
    """``s3://bucket/key`` or the http(s) URL of the bundle manifest ``source`` names, or None when it
    does not name one (the name, without a query string, ends in ``.manifest.xml``)."""
    src = parse_source(source)
    if src.kind == "s3":
        name, url = src.key or "", f"s3://{src.bucket}/{src.key}"
    else:
        url = src.url or ""
        name = url.split("?", 1)[0].split("#", 1)[0]
    return url if name.lower().endswith(MANIFEST_SUFFIX) else None


def unbundle_source(ctx: StepContext, url: str, dst: Path) -> dict[str, Any]:
    """Unbundle the bundle at ``url`` into ``dst``; ``{path, size, sha256, etag, bundle}``."""
    cfg = ctx.config
    cloud_key = configured_cloud_key(cfg.bundles)
    signers = configured_signer_keys(cfg.bundles)
    allowance = Allowance(ctx.scratch, "unbundling an image bundle")
    location = BundleLocation(url, UrlPolicy.from_config(cfg.sources), cfg.sources.s3, cancel=ctx.cancel)

    def on_progress(done: int) -> None:
        ctx.progress({"phase": "unbundling", "done": done})

    try:
        result = unbundle_to_file(
            location,
            cloud_key,
            dst,
            user_keys=signers,
            parallel=cfg.bundles.parallel_parts,
            max_bytes=cfg.limits.max_decompressed_size,
            ledger=ctx,
            on_progress=on_progress,
            reserve=lambda size: allowance.cover(size, True),
            limits=cfg.limits,
        )
    except BaseException:
        allowance.release()
        raise
    allowance.shrink_to(result.size)
    ctx.ledger_created(dst)
    return {
        "path": str(result.path),
        "size": result.size,
        "sha256": result.sha256,
        "etag": None,
        "bundle": {
            "name": result.name,
            "parts": result.parts,
            "digest": result.digest,
            "signature_verified": bool(signers),
        },
    }


# --------------------------------------------------------------------------------------------- pull mode


def bundle_download(download: DownloadManifest) -> dict[str, Any]:
    """What ``manifest.wait`` hands ``volume.import`` for a verified BUNDLE download manifest."""
    assert download.bundle is not None
    return {
        "file_format": "RAW",
        "size": download.bundle.unbundled_size,
        "bundle": {
            "encrypted_key": download.bundle.encrypted_key,
            "encrypted_iv": download.bundle.encrypted_iv,
            "bundled_size": download.size,
            "parts": [
                {"index": p.index, "url": p.get_url, "sha1": (p.digest or "").lower()} for p in download.parts
            ],
        },
    }


class _Sequential:
    """``write(bytes)`` onto a :class:`RawWriter` from offset 0, through the RAW format inspectors."""

    def __init__(self, out: RawWriter, check: RawStreamCheck) -> None:
        self.out, self.check, self.offset = out, check, 0

    def write(self, chunk: bytes) -> None:
        self.check.eat(chunk)
        self.out.write(self.offset, chunk)
        self.offset += len(chunk)


def unbundle_onto_volume(
    ctx: StepContext, manifest: dict[str, Any], vol: Volume, zeroed: bool
) -> dict[str, Any]:
    """Unbundle the BUNDLE download manifest ``manifest`` (:func:`bundle_download`) onto ``vol``."""
    cfg = ctx.config
    bundle, size = manifest["bundle"], int(manifest["size"])
    size_limit(size, cfg.limits.max_decompressed_size)
    if size > vol.size:
        raise BundleInvalid(
            "Size", f"the bundle's image is {size} bytes but volume {vol.id} holds {vol.size}"
        )
    cloud_key = configured_cloud_key(cfg.bundles)
    key = unwrap(bundle["encrypted_key"], cloud_key, "AES key")
    iv = unwrap(bundle["encrypted_iv"], cloud_key, "IV")
    parts = [BundlePart(p["index"], p["url"], p["sha1"]) for p in bundle["parts"]]
    http = HttpClient(UrlPolicy.from_config(cfg.sources))

    def read_part(part: BundlePart, stop: Any) -> bytes:
        with http.get_stream(part.filename, cancel=stop) as response:
            if response.status != 200:
                raise SourceUnavailable(
                    f"bundle part {part.index} ({redact_url(part.filename)}) answered HTTP {response.status}",
                    status=response.status,
                )
            data = bytearray()
            for chunk in response.iter_chunks():
                data += chunk
                if len(data) > MAX_PART_BYTES:
                    break
        return check_part(part, bytes(data))

    check = RawStreamCheck()
    where = f"volume {vol.id} ({vol.path})"
    with RawWriter(vol.path, zeroed=zeroed, error=lambda exc: storage_error(exc, where)) as out:
        written, sha256, _digest = decrypt_parts(
            parts,
            read_part,
            key,
            iv,
            _Sequential(out, check),
            size=size,
            bundled_size=int(bundle["bundled_size"]),
            digest=None,  # the cloud does not carry the tar SHA-1 into download manifests (§9)
            parallel=cfg.bundles.parallel_parts,
            cancel=ctx.cancel,
            limits=cfg.limits,
            on_progress=lambda done: ctx.progress(
                {
                    "phase": "writing",
                    "done": done,
                    "total": size,
                    "percent": 100.0 * done / size,
                    "converted": done,
                }
            ),
        )
        findings = check.verdict()
        if findings:
            raise ImageRejected(findings)
        out.zero(size, vol.size - size)
    return {
        "bytes_written": written,
        "format": "RAW",
        "virtual_size": written,
        "streamed": True,
        "sha256": sha256,
    }
