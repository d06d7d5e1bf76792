"""The server-side copy of a stored image (:mod:`appliance.targets.copy`): S3 copies the bytes itself.

When source and destination are objects behind the same endpoint with the same credentials (one client
may read the one and write the other, :func:`same_credentials`), the source is read once to verify its
digest (a GET, hashed as it arrives, never stored), then copied by S3, part by part with
``UploadPartCopy`` pinned to the ETag of the object that was read (``CopySourceIfMatch``): the bytes S3
copies are the bytes whose digest was checked, and the appliance uploads nothing (half the traffic of a
streamed copy). A store that refuses ``UploadPartCopy`` on the first part (:data:`NO_SERVER_COPY`) makes
:func:`server_side_copy` answer None, and the caller streams instead. A source replaced meanwhile is
``Source.DigestMismatch``; a cancel or any failure leaves no object and no incomplete upload
(:func:`~appliance.targets.copy_source.discard_upload`), and a cancel does not wait for the part S3 is
copying (minutes for a part of GiBs, forever on a stalled connection). Its parts go through the one
part loop of both ways of copying (:func:`~appliance.targets.copy_parts.send_parts`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from ..errors import Cancelled
from ..progress import ProgressTracker
from .base import TargetError
from .copy_parts import S3Copy, send_parts
from .copy_source import SourceDigestMismatch, discard_upload, read_stored, s3_failure
from .partpool import PartPool, wait_first

#: UploadPartCopy parts are at most 5 GiB; smaller parts report progress and check cancel more often
MAX_COPY_PART = 5 << 30
#: S3 error codes that mean "this store (or these credentials) cannot copy server-side": stream instead
NO_SERVER_COPY = ("NotImplemented", "AccessDenied", "InvalidRequest")


def same_credentials(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two endpoints' settings are one endpoint with one set of credentials."""
    keys = ("endpoint_url", "region", "access_key", "secret_key")
    return all(a.get(k) == b.get(k) for k in keys)


class _Refused(Exception):
    """The store refuses server-side copies (the first ``UploadPartCopy``: :data:`NO_SERVER_COPY`)."""


class _PartCopy:
    """One ``UploadPartCopy`` multipart upload of a verified source to ``s3://bucket/key`` (a
    :class:`~.copy_parts.PartUpload` of ``(number, start, end)`` source ranges)."""

    def __init__(
        self, job: S3Copy, client: Any, etag: str | None, size: int, sha256: str, tracker: ProgressTracker
    ) -> None:
        self.job, self.client, self.bucket, self.key, self.etag = job, client, job.bucket, job.key, etag
        self.size, self.sha256, self.tracker = size, sha256, tracker
        location = job.location
        self.source = {"Bucket": location["bucket"], "Key": location["key"]}
        self.where = f"s3://{self.bucket}/{self.key}"
        self.changed = SourceDigestMismatch(
            f"the stored image s3://{location['bucket']}/{location['key']} changed while it was copied (its "
            "ETag is no longer that of the bytes verified); nothing was copied"
        )
        self.upload_id = ""
        self.completed = False
        self.parts: list[dict[str, Any]] = []
        # each UploadPartCopy is sent from a thread of its own and waited for here, the cancel looked
        # at meanwhile: S3 may take minutes over a part of GiBs, or never answer (a stalled connection),
        # and a cancel or suspend must not wait for it (the upload it belongs to is aborted)
        self._pool = PartPool(1, "s3-part-copy")
        self._discarded = False

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

    def send(self, piece: tuple[int, int, int]) -> None:
        """Part ``number`` (bytes ``start``…``end`` of the source); :class:`_Refused` when the store
        refuses server-side copies (the first part only)."""
        number, start, end = piece
        answer = self._pool.submit(self._copy_part, number, start, end)
        try:
            resp = _answer(answer, self.job.cancel)
        except Cancelled:
            raise
        except Exception as exc:
            code = ((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code")
            if number == 1 and code in NO_SERVER_COPY:
                raise _Refused(code) from exc
            if code == "PreconditionFailed" or self.source_changed():
                raise self.changed from exc
            raise s3_failure(f"UploadPartCopy {number} of {self.where}", exc) from exc
        self.parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
        self.tracker.update(end + 1)

    def _copy_part(self, number: int, start: int, end: int) -> Any:
        """``UploadPartCopy`` of part ``number``, in the pool's thread. S3 may store a part it finishes
        copying after its upload was aborted, and keeps its bytes until the upload is aborted again: a part
        answered after :meth:`discard` aborts the upload once more."""
        upload_id = self.upload_id
        resp = self.client.upload_part_copy(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=upload_id,
            PartNumber=number,
            CopySource=self.source,
            CopySourceRange=f"bytes={start}-{end}",
            **({"CopySourceIfMatch": self.etag} if self.etag else {}),
        )
        if self._discarded:
            with contextlib.suppress(Exception):  # (most likely gone already)
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)
        return resp

    def finish(self) -> dict[str, Any]:
        """Complete the upload and check the object is the one verified: what the copy answers."""
        if self.job.fence is not None:
            self.job.fence()
        try:
            done = self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            )
        except Exception as exc:
            if self.source_changed():
                raise self.changed from exc
            raise s3_failure(f"CompleteMultipartUpload {self.where}", exc) from exc
        self.completed = True
        self._pool.shutdown()
        head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        if (
            int(head["ContentLength"]) != self.size
            or (head.get("Metadata") or {}).get("sha256") != self.sha256
        ):
            raise TargetError(f"{self.where}: the copy is not the object that was verified", "CopyFailed")
        if self.source_changed():
            raise self.changed
        etag = str(done["ETag"]).strip('"')
        return self.job.copied(etag, self.sha256, self.size, self.sha256, "server-side")

    def discard(self) -> None:
        self._discarded = True  # (a part still in flight aborts the upload again once it lands)
        self._pool.shutdown(wait=False, cancel_futures=True)  # a part in flight is not waited for
        discard_upload(self.client, self.bucket, self.key, self.upload_id, completed=self.completed)
        self.upload_id = ""


def _answer(answer: Future[Any], cancel: threading.Event | None) -> Any:
    """The result of ``answer`` (its error raised); :class:`Cancelled` as soon as ``cancel`` is set."""
    wait_first({answer}, cancel, "copy")
    return answer.result()


def server_side_copy(job: S3Copy) -> dict[str, Any] | None:
    """The copy made by S3 (``UploadPartCopy``), pinned to the ETag of the object whose digest was
    checked; None when the store refuses server-side copies (the caller streams instead)."""
    part_size, threads = job.transfer()
    digests = job.digests
    with read_stored(job.config, job.location) as (chunks, size, etag):
        tracker = ProgressTracker("verifying source", size, job.on_progress)
        for _chunk in digests.hashed(chunks, job.cancel):
            tracker.update(digests.read)
    source_sha256 = digests.check(size)
    tracker.finish()
    if size == 0:  # nothing to copy in parts: streamed
        return None
    copying = ProgressTracker("copying", size, job.on_progress)
    copy = _PartCopy(job, job.client(threads), etag, size, source_sha256, copying)
    copy.start({**(job.metadata or {}), "sha256": source_sha256})
    part = min(max(part_size, -(-size // 10_000)), MAX_COPY_PART)
    ranges = ((n, start, min(start + part, size) - 1) for n, start in enumerate(range(0, size, part), 1))
    try:
        return send_parts(copy, ranges, job.cancel, copying)
    except _Refused:
        return None
