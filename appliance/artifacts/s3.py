"""S3 plumbing of the artifact store: the client for its connection settings and a hashed, bounded
download of one object."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import Cancelled
from ..targets.base import boto_client
from .cache import CHUNK


def s3_client(settings: Mapping[str, Any]) -> Any:
    """A boto3 S3 client for ``artifacts`` connection settings (path addressing for custom endpoints)."""
    style = settings.get("addressing_style") or "auto"
    if style == "auto" and settings.get("endpoint_url"):
        host = str(settings["endpoint_url"]).split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
        if not host.endswith("amazonaws.com"):
            style = "path"  # MinIO, Ceph RGW, moto: no wildcard DNS for virtual-hosted buckets
    return boto_client("s3", settings, signature_version="s3v4", s3={"addressing_style": style})


def download_object(
    client: Any,
    bucket: str,
    key: str,
    dst: Path,
    *,
    max_bytes: int,
    cancel: threading.Event | None,
    what: str,
    on_error: Callable[[Exception, str], Exception],
    too_large: Callable[[], Exception],
) -> tuple[str, int]:
    """GET ``bucket/key`` into the new file ``dst``, hashing as it goes; ``(sha256, size)``.

    Past ``max_bytes`` the download stops with ``too_large()``; ``on_error(exc, what)`` turns an S3
    error into the coded error to raise. The caller removes ``dst`` on failure.
    """
    sha = hashlib.sha256()
    size = 0
    try:
        out = client.get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        raise on_error(exc, what) from exc
    body = out["Body"]
    try:
        with open(dst, "xb") as f:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"download of {what} cancelled")
                try:
                    chunk = body.read(CHUNK)
                except Exception as exc:
                    raise on_error(exc, what) from exc
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise too_large()
                sha.update(chunk)
                f.write(chunk)
    finally:
        body.close()
    return sha.hexdigest(), size


def same_filesystem(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b.parent).st_dev
    except OSError:
        return False
