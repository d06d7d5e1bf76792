"""Unbundling an EC2 image bundle: where its manifest and parts are, and the unbundle into a file.

A bundle (``ec2-bundles.md``) is a manifest (:mod:`.bundle_manifest`) and encrypted parts stored beside
it. :func:`unbundle_to_file` reads the manifest from a local path, ``s3://bucket/key`` or an http(s) URL
(:class:`BundleLocation`), verifies its signature when user certificates are given, unwraps the AES key
and IV with the cloud's private key, and runs the pipeline of :mod:`.bundle_decrypt`: parts fetched in
parallel and SHA-1-checked, decrypted here, gunzipped and untarred by a confined child
(:mod:`.bundle_untar`), the tar stream's SHA-1 checked against the manifest's ``image/digest``.

Tar safety as for OVA: exactly one member, a regular file, with a plain name (no ``/``, ``..``, NUL),
of exactly ``image/size`` bytes; the decompressed stream may not exceed ``image/size`` + 1 MiB of tar
overhead (a gzip bomb stops there). The image is written to a partial beside the output and renamed into
place only once every check passed: on any failure nothing is left (:mod:`appliance.partials`).
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from ..config import Limits
from ..errors import BundleInvalid
from ..partials import Ledger, partial_file, publish
from ..redact import redact_url
from . import s3 as s3mod
from .bundle_decrypt import MAX_PART_BYTES, check_part, decrypt_parts, size_limit
from .bundle_manifest import (
    MAX_BUNDLE_MANIFEST_BYTES,
    BundleManifest,
    BundlePart,
    parse_bundle_manifest,
    unwrap,
    verify_signature,
)
from .http import HttpClient, SourceUnavailable
from .urlfilter import UrlPolicy, parse_s3_url


@dataclass(frozen=True)
class UnbundleResult:
    path: Path
    size: int
    sha256: str
    #: the tar stream's SHA-1, as the manifest's ``image/digest``
    digest: str
    name: str
    parts: int


# --------------------------------------------------------------------------------------------- locations


class BundleLocation:
    """Where a manifest and its parts are: a directory, an S3 prefix or an http(s) URL's directory."""

    def __init__(
        self,
        manifest: str,
        policy: UrlPolicy,
        s3cfg: Mapping[str, Any] | None = None,
        *,
        http: HttpClient | None = None,
        s3_client: Any = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.manifest, self.policy, self.cancel = manifest, policy, cancel
        lowered = manifest.lower()
        if lowered.startswith("s3://"):
            self.kind = "s3"
            self.bucket, self.key = parse_s3_url(manifest)
            cfg = s3cfg if s3cfg is not None else (policy.sources.s3 if policy.sources else {})
            self.s3 = s3_client or s3mod.s3_client(cfg, policy, max_pool_connections=16)
        elif lowered.startswith(("http://", "https://")):
            self.kind = "http"
            self.http = http or HttpClient(policy)
        else:
            self.kind = "file"
            self.path = Path(manifest)

    def __str__(self) -> str:
        return redact_url(self.manifest) if self.kind == "http" else self.manifest

    def _read(self, where: str, limit: int, stop: threading.Event | None = None) -> bytes:
        cancel = stop or self.cancel
        if self.kind == "file":
            try:
                with open(where, "rb") as f:
                    return f.read(limit + 1)
            except OSError as exc:
                raise SourceUnavailable(f"cannot read {where}: {exc.strerror}") from None
        if self.kind == "s3":
            bucket, key = parse_s3_url(where)
            with s3mod.open_object(self.s3, bucket, key, cancel=cancel) as stream:
                return _bounded(stream.iter_chunks(), limit)
        with self.http.get_stream(where, cancel=cancel) as response:
            if response.status != 200:
                raise SourceUnavailable(
                    f"{redact_url(where)} answered HTTP {response.status}", status=response.status
                )
            return _bounded(response.iter_chunks(), limit)

    def read_manifest(self) -> bytes:
        data = self._read(self.manifest, MAX_BUNDLE_MANIFEST_BYTES)
        if len(data) > MAX_BUNDLE_MANIFEST_BYTES:
            raise BundleInvalid(
                "Manifest", f"the bundle manifest is larger than {MAX_BUNDLE_MANIFEST_BYTES} bytes"
            )
        return data

    def part(self, filename: str) -> str:
        """Where the part ``filename`` (a plain name, checked by the manifest parser) is."""
        if self.kind == "file":
            return str(self.path.parent / filename)
        if self.kind == "s3":
            prefix = self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""
            return f"s3://{self.bucket}/{prefix}{filename}"
        split = urllib.parse.urlsplit(self.manifest)
        path = split.path.rsplit("/", 1)[0] + "/" + urllib.parse.quote(filename)
        return urllib.parse.urlunsplit(split._replace(path=path, query="", fragment=""))

    def read_part(self, part: BundlePart, stop: threading.Event) -> bytes:
        return check_part(part, self._read(self.part(part.filename), MAX_PART_BYTES, stop))


def _bounded(chunks: Iterator[bytes], limit: int) -> bytes:
    out = bytearray()
    for chunk in chunks:
        out += chunk
        if len(out) > limit:
            break
    return bytes(out)


def unbundle_stream(
    location: BundleLocation,
    manifest: BundleManifest,
    cloud_key: rsa.RSAPrivateKey,
    out: Any,
    *,
    parallel: int = 4,
    max_bytes: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    limits: Limits | None = None,
) -> tuple[int, str, str]:
    """Write the image of ``manifest`` to the binary file ``out``; (bytes, SHA-256, tar SHA-1)."""
    size_limit(manifest.size, max_bytes)
    key = unwrap(manifest.ec2_encrypted_key, cloud_key, "AES key")
    iv = unwrap(manifest.ec2_encrypted_iv, cloud_key, "IV")
    return decrypt_parts(
        manifest.parts,
        location.read_part,
        key,
        iv,
        out,
        size=manifest.size,
        bundled_size=manifest.bundled_size,
        digest=manifest.digest,
        parallel=parallel,
        cancel=location.cancel,
        on_progress=on_progress,
        limits=limits,
    )


def unbundle_to_file(
    location: BundleLocation,
    cloud_key: rsa.RSAPrivateKey,
    dst: Path,
    *,
    user_keys: Sequence[rsa.RSAPublicKey] = (),
    parallel: int = 4,
    max_bytes: int | None = None,
    ledger: Ledger | None = None,
    on_progress: Callable[[int], None] | None = None,
    reserve: Callable[[int], None] | None = None,
    limits: Limits | None = None,
) -> UnbundleResult:
    """Unbundle the bundle at ``location`` into ``dst`` (published only when every check passed).
    ``reserve(image_size)`` is called once the (verified) manifest says how large the image is. The
    gunzip and untar run confined under ``limits`` (default: the embedded defaults).

    Raises :class:`BundleInvalid`, :class:`SourceUnavailable`, ``ImageRejected`` (size limit)."""
    manifest = parse_bundle_manifest(location.read_manifest())
    if user_keys:
        verify_signature(manifest, user_keys)
    if (max_bytes is None or manifest.size <= max_bytes) and reserve is not None:
        reserve(manifest.size)
    with partial_file(dst, ledger) as tmp:
        with open(tmp, "wb") as out:
            written, sha256, digest = unbundle_stream(
                location,
                manifest,
                cloud_key,
                out,
                parallel=parallel,
                max_bytes=max_bytes,
                on_progress=on_progress,
                limits=limits,
            )
            out.flush()
            os.fsync(out.fileno())
        publish(tmp, dst)
    return UnbundleResult(dst, written, sha256, digest, manifest.name, len(manifest.parts))
