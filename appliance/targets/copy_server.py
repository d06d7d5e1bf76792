"""The server-side copy of a stored image (:mod:`appliance.targets.copy`): S3 copies the bytes itself.

When source and destination are objects behind the same endpoint with the same credentials (one client
may read the one and write the other, :func:`same_credentials`), the source is read once to verify its
digest (a GET, hashed as it arrives, never stored), then copied by S3, part by part with
``UploadPartCopy`` pinned to the ETag of the object that was read (``CopySourceIfMatch``): the bytes S3
copies are the bytes whose digest was checked, and the appliance uploads nothing (half the traffic of a
streamed copy). A store that refuses ``UploadPartCopy`` on the first part (:data:`NO_SERVER_COPY`) makes
:func:`server_side_copy` answer None, and the caller streams instead. A source replaced meanwhile is
``Source.DigestMismatch``; a cancel or any failure leaves no object and no incomplete upload
(:func:`~appliance.targets.copy_source.discard_upload`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..config import Config
from ..progress import ProgressCallback, ProgressTracker
from .base import TargetError, check_cancel
from .copy_source import (
    Digests,
    SourceDigestMismatch,
    discard_upload,
    read_stored,
    s3_client,
    s3_copied,
    s3_failure,
    transfer,
)

#: UploadPartCopy parts are at most 5 GiB; smaller parts report progress and check cancel more often
MAX_COPY_PART = 5 << 30
#: S3 error codes that mean "this store (or these credentials) cannot copy server-side": stream instead
NO_SERVER_COPY = ("NotImplemented", "AccessDenied", "InvalidRequest")


def same_credentials(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two endpoints' settings are one endpoint with one set of credentials."""
    keys = ("endpoint_url", "region", "access_key", "secret_key")
    return all(a.get(k) == b.get(k) for k in keys)


class _PartCopy:
    """One ``UploadPartCopy`` multipart upload of a verified source to ``s3://bucket/key``."""

    def __init__(
        self, client: Any, location: Mapping[str, Any], bucket: str, key: str, etag: str | None
    ) -> None:
        self.client, self.bucket, self.key, self.etag = client, bucket, key, etag
        self.source = {"Bucket": location["bucket"], "Key": location["key"]}
        self.where = f"s3://{bucket}/{key}"
        self.changed = SourceDigestMismatch(
            f"the stored image s3://{location['bucket']}/{location['key']} changed while it was copied (its "
            "ETag is no longer that of the bytes verified); nothing was copied"
        )
        self.upload_id = ""
        self.completed = False

    def source_changed(self) -> bool:
        """Whether the source's ETag is no longer the one read (a store that ignores
        CopySourceIfMatch, as moto does, still cannot hand over a copy of a replaced source)."""
        try:
            now = self.client.head_object(**self.source)
        except Exception:
            return True
        return bool(self.etag) and str(now.get("ETag")) != self.etag

    def start(self, metadata: Mapping[str, str]) -> None:
        try:
            upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key, Metadata=metadata)
        except Exception as exc:
            raise s3_failure(f"CreateMultipartUpload {self.where}", exc) from exc
        self.upload_id = upload["UploadId"]

    def part(self, number: int, start: int, end: int) -> dict[str, Any] | None:
        """Part ``number`` (bytes ``start``…``end`` of the source); None when the store refuses
        server-side copies (the first part only: the upload is aborted)."""
        try:
            resp = self.client.upload_part_copy(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                CopySource=self.source,
                CopySourceRange=f"bytes={start}-{end}",
                **({"CopySourceIfMatch": self.etag} if self.etag else {}),
            )
        except Exception as exc:
            code = ((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code")
            if number == 1 and code in NO_SERVER_COPY:
                self.discard()
                return None
            if code == "PreconditionFailed" or self.source_changed():
                raise self.changed from exc
            raise s3_failure(f"UploadPartCopy {number} of {self.where}", exc) from exc
        return {"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]}

    def complete(self, parts: list[dict[str, Any]], size: int, sha256: str) -> str:
        """Complete the upload and check the object is the one verified; its ETag."""
        try:
            done = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
            )
        except Exception as exc:
            if self.source_changed():
                raise self.changed from exc
            raise s3_failure(f"CompleteMultipartUpload {self.where}", exc) from exc
        self.completed = True
        head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        if int(head["ContentLength"]) != size or (head.get("Metadata") or {}).get("sha256") != sha256:
            raise TargetError(f"{self.where}: the copy is not the object that was verified", "CopyFailed")
        if self.source_changed():
            raise self.changed
        return str(done["ETag"]).strip('"')

    def discard(self) -> None:
        discard_upload(self.client, self.bucket, self.key, self.upload_id, completed=self.completed)
        self.upload_id = ""


def server_side_copy(
    config: Config,
    location: Mapping[str, Any],
    settings: Mapping[str, Any],
    destination: Mapping[str, Any],
    key: str,
    digests: Digests,
    metadata: Mapping[str, str] | None,
    on_progress: ProgressCallback | None,
    cancel: threading.Event | None,
    fence: Callable[[], None] | None,
) -> dict[str, Any] | None:
    """The copy made by S3 (``UploadPartCopy``), pinned to the ETag of the object whose digest was
    checked; None when the store refuses server-side copies (the caller streams instead)."""
    part_size, threads = transfer(settings)
    with read_stored(config, location) as (chunks, size, etag):
        tracker = ProgressTracker("verifying source", size, on_progress)
        for _chunk in digests.hashed(chunks, cancel):
            tracker.update(digests.read)
    source_sha256 = digests.check(size)
    tracker.finish()
    if size == 0:  # nothing to copy in parts: streamed
        return None
    copy = _PartCopy(s3_client(settings, threads), location, destination["bucket"], key, etag)
    copy.start({**(metadata or {}), "sha256": source_sha256})
    part = min(max(part_size, -(-size // 10_000)), MAX_COPY_PART)
    copying = ProgressTracker("copying", size, on_progress)
    try:
        parts = []
        for number, start in enumerate(range(0, size, part), 1):
            check_cancel(cancel, "copy")
            end = min(start + part, size) - 1
            copied = copy.part(number, start, end)
            if copied is None:
                return None
            parts.append(copied)
            copying.update(end + 1)
        check_cancel(cancel, "copy")
        if fence is not None:
            fence()
        etag_out = copy.complete(parts, size, source_sha256)
    except BaseException:
        copy.discard()
        raise
    copying.finish()
    return s3_copied(destination, key, etag_out, source_sha256, size, source_sha256, "server-side")
