"""The checks of a completed multipart object and the digests its metadata still needs
(:meth:`.s3stream.MultipartWriter.close` applies them once ``CompleteMultipartUpload`` answered).

* The completed object's ETag must be S3's multipart form, ``md5(md5(part 1) ‖ … ‖ md5(part N))-N``
  (:func:`check_multipart_etag`; not under SSE-KMS, whose ETags are not MD5s).
* With per-part checksums (the exports) the object's digest is the chunked SHA-256 of its parts
  (:mod:`.chunkdigest`), which is S3's composite checksum: ``HeadObject(ChecksumMode=ENABLED)`` must
  answer the same ``base64-N`` value where the store reports one (:func:`check_composite`).
* S3 takes metadata when an upload starts: what was not known then (the whole-object sha256; the
  chunked value when the store keeps no checksum) is stored by copying the object onto itself with it
  (:func:`digests_to_store`, :func:`.s3copy.store_digests`: ``CopyObject`` up to 5 GiB,
  ``UploadPartCopy`` beyond). Exports copy only objects up to 5 GiB (a single ``CopyObject`` keeps the
  object's checksum); a larger one keeps its digests in the task's record and in S3's checksum, not in
  its metadata.
"""

from __future__ import annotations

from typing import Any

from .base import TargetError
from .chunkdigest import ChunkedDigest
from .s3parts import multipart_etag, upload_error


def check_multipart_etag(where: str, etag: str, part_md5s: list[bytes]) -> None:
    """``UploadFailed`` unless ``etag`` (unquoted) is the multipart ETag of parts of these MD5s."""
    expected = multipart_etag(part_md5s)
    if etag != expected:
        raise TargetError(
            f"{where}: S3 answered ETag {etag} for the completed object, not {expected}", "UploadFailed"
        )


def check_composite(client: Any, bucket: str, key: str, digest: ChunkedDigest) -> bool:
    """Whether S3 reports the composite SHA-256 checksum of ``bucket/key`` (``UploadFailed`` when it
    differs from ``digest``: the store holds other bytes than were sent); False when it reports none."""
    where = f"s3://{bucket}/{key}"
    try:
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except Exception as exc:
        raise upload_error(f"HeadObject {where}", exc) from exc
    reported = head.get("ChecksumSHA256")
    if not reported:
        return False
    # S3 answers base64-N for a composite checksum (some stores leave out the -N)
    value, _, count = str(reported).partition("-")
    if value != digest.s3_checksum.partition("-")[0] or count not in ("", str(digest.chunks)):
        raise TargetError(
            f"{where}: S3 reports the checksum {reported}, not the {digest.s3_checksum} of the parts sent",
            "UploadFailed",
        )
    return True


def digests_to_store(sha256: str | None, digest: ChunkedDigest, verified: bool) -> dict[str, str]:
    """The metadata an object with per-part checksums gets after it completed: what was not known when
    the upload started, the whole-object ``sha256`` (when computed) and, when the store did not verify
    the composite checksum (``verified``), the chunked value; empty: nothing to copy."""
    store: dict[str, str] = {} if sha256 is None else {"sha256": sha256}
    if not verified:
        store |= {"sha256-chunked": digest.hexdigest, "digest-chunks": str(digest.chunks)}
    return store
