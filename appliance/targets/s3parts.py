"""What the S3 multipart modules share (:mod:`.s3stream`, :mod:`.s3partupload`, :mod:`.s3complete`,
:mod:`.s3resume`, :mod:`.s3copy`): S3's part limits, the ETag of a multipart object, whether part ETags
are MD5s, and the error a failed S3 call becomes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from .base import TargetError

MIN_PART = 5 << 20
MAX_PARTS = 10_000


def upload_error(operation: str, exc: Exception) -> TargetError:
    """``UploadFailed`` naming the operation and S3's error code, never a library's whole text."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return TargetError(f"{operation} failed: {err.get('Code')}: {err.get('Message')}", "UploadFailed")
    return TargetError(f"{operation} failed: {type(exc).__name__}", "UploadFailed")


def multipart_etag(part_md5s: list[bytes]) -> str:
    """S3's ETag of a multipart object made of parts with these MD5 digests."""
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


def etag_is_md5(sse: Mapping[str, str]) -> bool:
    """Whether S3's ETags of parts written under server-side encryption ``sse`` are their MD5s: not
    under SSE-KMS."""
    return not str(sse.get("ServerSideEncryption", "")).startswith("aws:kms")
