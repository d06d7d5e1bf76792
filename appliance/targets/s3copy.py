"""Copies inside S3 (no byte through the appliance): an object to another key with new metadata
(``CopyObject`` up to 5 GiB, ``UploadPartCopy`` beyond), and an object onto itself carrying the digests
known only once it was complete (:func:`store_digests`, what :class:`.s3stream.MultipartWriter` does on
``close``)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any

from .base import TargetError
from .s3parts import upload_error

log = logging.getLogger(__name__)

#: CopyObject's limit; larger objects are copied part by part
MAX_COPY = 5 << 30
COPY_PART = 1 << 30


def server_copy(
    client: Any,
    bucket: str,
    source_key: str,
    key: str,
    size: int,
    metadata: Mapping[str, str],
    sse: Mapping[str, str],
    *,
    if_match: str | None = None,
) -> str:
    """Copy ``bucket/source_key`` (``size`` bytes) to ``bucket/key`` inside S3, with ``metadata``
    (replacing the source's) and ``sse``: ``CopyObject`` up to 5 GiB, ``UploadPartCopy`` of 1 GiB
    parts beyond (aborted on any failure). ``if_match``: the source's ETag the caller checked — S3
    refuses the copy (``PreconditionFailed``) if the source was replaced since. Returns the new
    object's ETag. Raises what boto3 raises."""
    source = {"Bucket": bucket, "Key": source_key}
    condition = {"CopySourceIfMatch": f'"{if_match}"'} if if_match else {}
    if size <= MAX_COPY:
        resp = client.copy_object(
            Bucket=bucket,
            Key=key,
            CopySource=source,
            Metadata=dict(metadata),
            MetadataDirective="REPLACE",
            **condition,
            **sse,
        )
        return str(resp["CopyObjectResult"]["ETag"]).strip('"')
    copy_id = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata=dict(metadata), **sse)[
        "UploadId"
    ]
    try:
        parts = []
        for i, start in enumerate(range(0, size, COPY_PART), 1):
            end = min(start + COPY_PART, size) - 1
            resp = client.upload_part_copy(
                Bucket=bucket,
                Key=key,
                UploadId=copy_id,
                PartNumber=i,
                CopySource=source,
                CopySourceRange=f"bytes={start}-{end}",
                **condition,
            )
            parts.append({"PartNumber": i, "ETag": resp["CopyPartResult"]["ETag"]})
        done = client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=copy_id, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=copy_id)
        except Exception as exc:
            log.error("could not abort the copy upload of s3://%s/%s: %s", bucket, key, type(exc).__name__)
        raise
    return str(done["ETag"]).strip('"')


def store_digests(
    client: Any,
    bucket: str,
    key: str,
    size: int,
    metadata: Mapping[str, str],
    sse: Mapping[str, str],
    digests: Mapping[str, str],
    *,
    checksum: bool = False,
) -> str:
    """Copy ``bucket/key`` (``size`` bytes) onto itself with ``metadata`` (which carries ``digests``) and
    ``sse``; check that the stored object carries ``digests``; return the new ETag. ``checksum``: the copy
    gets S3's SHA-256 checksum of the whole object (a copy is one part), which must then be the
    ``sha256`` of ``digests``. ``UploadFailed`` for anything else."""
    where = f"s3://{bucket}/{key}"
    source = {"Bucket": bucket, "Key": key}
    try:
        if size <= MAX_COPY:
            resp = client.copy_object(
                Bucket=bucket,
                Key=key,
                CopySource=source,
                Metadata=dict(metadata),
                MetadataDirective="REPLACE",
                **sse,
                **({"ChecksumAlgorithm": "SHA256"} if checksum else {}),
            )
            etag = str(resp["CopyObjectResult"]["ETag"]).strip('"')
        else:
            etag = server_copy(client, bucket, key, key, size, metadata, sse)
        head = client.head_object(Bucket=bucket, Key=key, **({"ChecksumMode": "ENABLED"} if checksum else {}))
    except TargetError:
        raise
    except Exception as exc:
        raise upload_error(f"storing the sha256 of {where}", exc) from exc
    stored = head.get("Metadata", {})
    if any(stored.get(k) != v for k, v in digests.items()) or int(head["ContentLength"]) != size:
        raise TargetError(f"{where}: the stored object does not carry its sha256", "UploadFailed")
    reported = head.get("ChecksumSHA256")
    if checksum and reported and digests.get("sha256"):
        whole = base64.b64encode(bytes.fromhex(digests["sha256"])).decode("ascii")
        if reported != whole:
            raise TargetError(
                f"{where}: S3 reports the checksum {reported} for the copy, not {whole}",
                "UploadFailed",
            )
    return etag
