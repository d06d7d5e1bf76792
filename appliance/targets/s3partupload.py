"""One part of a multipart upload sent and checked (:class:`.s3stream.MultipartWriter` sends its parts
with it, in its upload threads).

Each part is sent with ``Content-MD5`` (S3 refuses a part whose bytes differ) and its returned ETag
must be that MD5 where S3 says so (not under SSE-KMS, whose ETags are not MD5s: :func:`.s3parts.etag_is_md5`).
With ``checksums`` (the exports) a part also carries its SHA-256 (``ChecksumSHA256``, the upload created
with ``ChecksumAlgorithm=SHA256``: S3 refuses a part whose bytes differ), computed here, in the part's
upload thread. An all-zero part (a hole of a RAW disk) takes the cached digests of a zero part.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass
from typing import Any

from .base import TargetError
from .chunkdigest import is_zero
from .s3parts import upload_error


@dataclass(frozen=True)
class SentPart:
    """What S3 acknowledged of one part: its MD5, its SHA-256 (``checksums``, else ``b""``), the ETag S3
    answered, and whether it was all zeros (its digests then not computed)."""

    md5: bytes
    sha256: bytes
    etag: str
    zero: bool


@functools.lru_cache(maxsize=4)
def zero_part_digests(length: int) -> tuple[bytes, bytes]:
    """``(md5, sha256)`` of a part of ``length`` zero bytes (once per length and process)."""
    z = bytes(length)
    return hashlib.md5(z).digest(), hashlib.sha256(z).digest()


def send_part(
    client: Any,
    bucket: str,
    key: str,
    upload_id: str | None,
    number: int,
    data: bytes,
    *,
    checksums: bool,
    etag_is_md5: bool,
) -> SentPart:
    """``UploadPart`` of part ``number`` (``data``) of the upload ``upload_id`` of ``bucket/key``, its
    answer checked (``UploadFailed`` otherwise)."""
    where = f"s3://{bucket}/{key}"
    extra: dict[str, str] = {}
    zero = bool(data) and is_zero(data)
    if zero:  # a hole of a RAW disk: nothing to hash
        md5, sha = zero_part_digests(len(data))
    else:
        md5 = hashlib.md5(data).digest()
        sha = hashlib.sha256(data).digest() if checksums else b""
    if checksums:
        extra["ChecksumSHA256"] = base64.b64encode(sha).decode("ascii")
    try:
        resp = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ContentMD5=base64.b64encode(md5).decode("ascii"),
            **extra,
        )
    except Exception as exc:
        raise upload_error(f"UploadPart {number} of {where}", exc) from exc
    etag = str(resp["ETag"])
    if etag_is_md5 and etag.strip('"') != md5.hex():
        raise TargetError(
            f"UploadPart {number} of {where}: S3 answered ETag {etag}, not the part's MD5 "
            f"{md5.hex()}: the part was damaged on its way",
            "UploadFailed",
        )
    return SentPart(md5, sha if checksums else b"", etag, zero)
