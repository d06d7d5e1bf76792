"""The fetch step's bundle branch: a disk container whose URL or S3 key names an EC2 bundle manifest
(``….manifest.xml``) is unbundled into scratch instead of downloaded (:mod:`appliance.sources.bundle`),
with the cloud's private key of ``bundles.*``; then the workflow goes on as for any fetched disk
(inspection, guest validation, conversion, target). The result has the fetch step's shape."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..scratch import Allowance
from ..sources.bundle import BundleLocation, unbundle_to_file
from ..sources.bundle_manifest import configured_cloud_key
from ..sources.fetch import parse_source
from ..sources.urlfilter import UrlPolicy
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
    allowance = Allowance(ctx.scratch, "unbundling an image bundle")
    location = BundleLocation(url, UrlPolicy.from_config(cfg.sources), cfg.sources.s3, cancel=ctx.cancel)

    def on_progress(done: int) -> None:
        ctx.progress({"phase": "unbundling", "done": done})

    try:
        result = unbundle_to_file(
            location,
            cloud_key,
            dst,
            parallel=cfg.bundles.parallel_parts,
            max_bytes=cfg.limits.max_decompressed_size,
            ledger=ctx,
            on_progress=on_progress,
            reserve=lambda size: allowance.cover(size, True),
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
        "bundle": {"name": result.name, "parts": result.parts, "digest": result.digest},
    }
