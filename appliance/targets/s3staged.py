"""An image streamed into the S3 image target without scratch: uploaded to a staging key, checked there,
published to its final key only when the checks pass.

:class:`StagedImage` (a context manager) gives the caller a forward-only :class:`.s3stream.MultipartWriter`
on ``<final key>.partial`` (the staging key: parts in parallel, each part's MD5 checked, the sha256 of every
byte computed on the way; server-side encrypted as asked, like :meth:`.s3.S3ImageTarget.store`). Then:

1. :meth:`StagedImage.complete` completes the upload (the staging object exists, under a name no one
   takes for an image);
2. :meth:`StagedImage.reader` reads it back at random offsets (:class:`.s3read.ObjectRangeReader`: cached
   ranged GETs with ``If-Match``), for the caller's inspection of the written disk and its guest
   validation — the checks run on the bytes S3 stored, not on a copy;
3. :meth:`StagedImage.publish` — the point of no return, after ``fence`` — copies the staging object to
   the final key inside S3 (``CopyObject``; ``UploadPartCopy`` beyond 5 GiB) with its user metadata: the
   object's ``sha256`` and the provenance known only at the end of the stream (S3 takes metadata when an
   object is created, so the copy that publishes is also the one that carries the digest: no extra copy
   compared with an upload that stores its digest afterwards), reads the object's headers back (size,
   ``sha256``, the encryption S3 applied: :meth:`.s3.S3ImageTarget.check_encryption`) and deletes the
   staging object. The copy's metadata also names the staging object's ETag (``staging-etag``): a run
   killed between the copy and its step's ledger entry leaves an object the step's next run recognises
   (:func:`adoptable`) and adopts, or the sweep deletes once the task is over without it
   (:mod:`appliance.steps.image_stream_s3`, :mod:`appliance.service.sweeps`).

Any exception inside the ``with`` — a hostile stream, a failed check, a cancel — aborts the multipart
upload, deletes the staging object and, if the final object was already made, that too: no object and no
incomplete upload are left. Entering also removes what a killed earlier run of the same task left at the
staging key, but the upload it continues (``resume``: a streamed import resumed from its checkpoint,
:mod:`appliance.steps.s3_checkpoint`). A resumable run stopped by a lost lease, an unavailable task store
or a suspend (``keep_on_cancel``: the worker shuts down) keeps its upload for the run that takes the task
over (the sweeps of :mod:`appliance.service.sweeps` remove it once the task is over), without waiting for
its parts in flight (:meth:`.s3stream.MultipartWriter.detach`). A process killed
outright leaves its incomplete upload at the staging key until the task resumes, the sweep finds its task
over, or its image is deleted (:meth:`.s3.S3ImageTarget.delete` removes both keys); a bucket lifecycle
rule (``AbortIncompleteMultipartUpload``) reaps it otherwise.

Memory: the staging upload's parts are the target's ``part_size`` (default 16 MiB), grown only as far as
S3's 10,000 parts require, and its part buffers are bounded by the target's ``memory`` (default 128 MiB:
fewer parts in flight when they would hold more).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from ..errors import Cancelled, LeaseLost, StoreUnavailable
from ..partials import Ledger
from ..sources.savedhash import available
from .base import TargetError
from .encryption import Encryption
from .s3 import STAGING_SUFFIX, S3ImageTarget, digest_metadata, sse_arguments
from .s3copy import server_copy
from .s3read import ObjectRangeReader
from .s3resume import ResumedUpload
from .s3stream import MultipartWriter

log = logging.getLogger(__name__)

#: stops that keep a resumable upload for the run that takes the task over
KEEP_ON = (LeaseLost, StoreUnavailable)
#: the user metadata of a published image naming the ETag of the staging object it was copied from
STAGING_ETAG = "staging-etag"
#: the kind of a step checkpoint saying which image a step is about to publish (the final key, the
#: staging object's ETag and sha256: :func:`appliance.steps.image_stream_s3.publish_intent`)
PUBLISH_KIND = "image.stream-s3/publish"


def adoptable(client: Any, bucket: str, key: str, sha256: str, staging_etag: str, size: int) -> str | None:
    """The ETag of ``bucket/key`` when it is the image published from the staging object
    ``staging_etag`` (its metadata names that ETag and the ``sha256``, its size is ``size``); None when
    there is no such object or it is another. Raises what boto3 raises for other errors."""
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        code = str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code"))
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    meta = head.get("Metadata", {})
    if (meta.get(STAGING_ETAG), meta.get("sha256"), int(head["ContentLength"])) != (
        staging_etag.strip('"'),
        sha256,
        size,
    ):
        return None
    return str(head["ETag"]).strip('"')


class StagedImage:
    """One image streamed to the staging key, checked, then published (module docstring)."""

    def __init__(
        self,
        target: S3ImageTarget,
        task_id: str,
        *,
        format: str = "raw",
        encryption: Encryption | None = None,
        expected_size: int | None = None,
        on_progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
        ledger: Ledger | None = None,
        resume: ResumedUpload | None = None,
        keep_on_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.target, self.format = target, format.lower()
        #: asked on a cancel: whether it is a suspend, which keeps a resumable upload like a lost lease
        self.keep_on_cancel = keep_on_cancel
        self.client = target.client
        self.bucket = target.bucket
        self.key = target.key_for(task_id, format)
        self.staging_key = self.key + STAGING_SUFFIX
        self.encryption, self.sse = encryption, sse_arguments(encryption)
        self.expected_size, self.on_progress, self.cancel = expected_size, on_progress, cancel
        self.ledger = ledger
        self.writer: MultipartWriter | None = None
        self.written: dict[str, Any] | None = None
        self.published = False
        self._ledgered = False
        #: the upload an earlier run left, continued (None: a new one)
        self.resume = resume
        #: whether the staging upload can be checkpointed and resumed (parts of one size, a sha256 whose
        #: state can be saved)
        self.resumable = resume is not None or (expected_size is not None and available())

    @property
    def staging(self) -> str:
        return f"s3://{self.bucket}/{self.staging_key}"

    # ------------------------------------------------------------------------------------- entering

    def __enter__(self) -> StagedImage:
        # what a killed earlier run of this task left, but the upload this run continues
        self._remove_staging(keep=self.resume.upload_id if self.resume is not None else None)
        if self.ledger is not None:
            self.ledger.ledger_created(self.staging)
            self._ledgered = True
        try:
            self.writer = self._writer()
        except BaseException:
            self._settle()
            raise
        return self

    def _writer(self) -> MultipartWriter:
        return MultipartWriter(
            self.client,
            self.bucket,
            self.staging_key,
            part_size=self.target.part_size,
            threads=self.target.threads,
            sse=self.sse,
            expected_size=self.expected_size,
            on_progress=self.on_progress,
            cancel=self.cancel,
            store_digest=False,
            grow_parts=self.expected_size is None,  # a stream of unknown size
            memory=self.target.memory,
            resumable=self.resumable,
            resume=self.resume,
            chunked=True,  # the image's sha256-chunked, as the file image target records it
        )

    def restart(self) -> MultipartWriter:
        """Give up the continued upload (aborted) and start a new one from byte 0."""
        if self.writer is not None:
            self.writer.abort()
        self.resume = None
        self.resumable = self.expected_size is not None and available()
        self.writer = self._writer()
        return self.writer

    def _settle(self) -> None:
        """The staging key is gone: tell the ledger (once)."""
        if self.ledger is not None and self._ledgered:
            self.ledger.ledger_removed(self.staging)
            self._ledgered = False

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            return
        suspended = issubclass(kind, Cancelled) and self.keep_on_cancel is not None and self.keep_on_cancel()
        if (
            (issubclass(kind, KEEP_ON) or suspended)
            and self.resumable
            and self.writer is not None
            and not self.writer.closed
            and self.written is None
        ):
            # the run that takes the task over continues this upload from the checkpoint (or the sweep
            # removes it once the task is over): left as it is, still in the ledger. A part in flight is
            # not waited for (a silent S3 would hold the suspend past the worker's grace): landing late,
            # it is the part the next run sends again, byte for byte (MultipartWriter.detach)
            log.info("keeping the upload to %s for the task's next run", self.staging)
            self.writer.detach()
            return
        # Only what this run made goes: its own upload (by its UploadId) and the staging object it
        # completed. Listing and aborting every upload on the key is for __enter__ — here it could
        # abort the upload of a run that took the task over after this one lost its lease.
        if self.writer is not None and not self.writer.closed:
            self.writer.abort()
        if self.written is not None:
            self._delete_staging_object()
        if self.published:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
            except Exception as err:
                log.error("could not delete s3://%s/%s: %s", self.bucket, self.key, type(err).__name__)
        self._settle()

    # ------------------------------------------------------------------------------------- the steps

    def complete(self) -> dict[str, Any]:
        """Complete the staging upload: ``{bucket, key, etag, sha256, size, parts}`` of the staging object."""
        assert self.writer is not None, "complete() inside the with block"
        self.written = self.writer.close()
        return self.written

    def reader(self) -> ObjectRangeReader:
        """The completed staging object, read back at random offsets (cached ranged GETs, If-Match)."""
        if self.written is None:
            raise TargetError(f"{self.staging} is not complete yet", "UploadFailed")
        return ObjectRangeReader(
            self.client,
            self.bucket,
            self.staging_key,
            size=int(self.written["size"]),
            etag=str(self.written["etag"]),
            cancel=self.cancel,
        )

    def publish(
        self, metadata: Mapping[str, str], *, fence: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Copy the checked staging object to the final key with ``metadata`` and its ``sha256``; check
        what S3 stored; remove the staging object. Returns the location as
        :meth:`.s3.S3ImageTarget.store` does (``type, bucket, key, etag, sha256, size, format,
        encryption``). ``fence`` runs first: a run that lost its task publishes nothing."""
        if self.written is None:
            raise TargetError(f"{self.staging} is not complete yet", "UploadFailed")
        sha256, size = str(self.written["sha256"]), int(self.written["size"])
        if fence is not None:
            fence()
        where = f"s3://{self.bucket}/{self.key}"
        # the staging object it was copied from: what a run resumed after a kill between this copy and
        # the step's ledger entry recognises the object by (:func:`adoptable`)
        digest = self.written.get("digest")
        meta = {**metadata, "sha256": sha256, STAGING_ETAG: str(self.written["etag"]).strip('"')}
        meta |= digest_metadata(digest)
        self.published = True  # from here on a failure removes the final object too
        try:
            etag = server_copy(
                self.client,
                self.bucket,
                self.staging_key,
                self.key,
                size,
                meta,
                self.sse,
                if_match=str(self.written["etag"]).strip('"'),  # the bytes that were read back and checked
            )
            head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
            raise TargetError(
                f"copying {self.staging} to {where} failed: {code or type(exc).__name__}", "UploadFailed"
            ) from exc
        if head.get("Metadata", {}).get("sha256") != sha256 or int(head["ContentLength"]) != size:
            raise TargetError(f"{where}: the published object is not the one checked", "UploadFailed")
        applied = self.target.check_encryption(self.key, self.encryption)
        self._remove_staging()
        self._settle()
        return {
            "type": "s3",
            "bucket": self.bucket,
            "key": self.key,
            "etag": etag,
            "sha256": sha256,
            "size": size,
            "format": self.format,
            "encryption": applied.to_dict() if applied else None,
            **({"digest": digest} if isinstance(digest, dict) else {}),
        }

    def _delete_staging_object(self) -> None:
        """Delete the staging object; never raises."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.staging_key)
        except Exception as exc:
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
            if code != "NoSuchBucket":
                log.error("could not delete %s: %s", self.staging, code or type(exc).__name__)

    def _remove_staging(self, keep: str | None = None) -> None:
        """Delete the staging object and abort every upload still open for it (but ``keep``, an upload
        id); never raises."""
        self._delete_staging_object()
        try:
            listing = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.staging_key)
            for upload in listing.get("Uploads", []):
                if upload["Key"] == self.staging_key and upload["UploadId"] != keep:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=self.staging_key, UploadId=upload["UploadId"]
                    )
        except Exception as exc:
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
            if code != "NoSuchBucket":
                log.error("could not remove %s: %s", self.staging, code or type(exc).__name__)
