"""A streamed S3 multipart upload: bytes written in order, parts uploaded in parallel as they fill, every
part's ETag checked against its MD5, the object's sha256 stored as user metadata; any failure or cancel
aborts the upload and leaves nothing in the bucket.

:class:`MultipartWriter` is a forward-only byte sink (``write(data)``), so a writer that never seeks
(:func:`appliance.image.vmdkwriter.write_stream_vmdk`, a tar stream of an OVA, a RAW disk read in order)
goes to S3 without a scratch copy. Its part size and memory (``memory``, ``expected_size``,
``grow_parts``) are those of :mod:`.s3budget`.

Digests and checks: every part is sent with ``Content-MD5`` and its ETag checked, with ``checksums``
(the exports) also with its SHA-256 (:mod:`.s3partupload`); the completed object's ETag and composite
checksum are checked, and what its metadata still needs is stored by a copy (:mod:`.s3complete`). The
sha256 of every byte written is computed on the way, in a thread of its own
(:class:`~appliance.targets.hashing.ThreadedSha256`): a caller that knows it beforehand passes
``sha256`` (checked against the bytes at the end, stored when the upload starts); otherwise it is
stored by the copy, unless ``store_digest=False`` (a caller that copies the completed object to its
final key, :mod:`.s3staged`, stores the digest with that copy). ``full_sha256=False`` skips the
serial whole-object sha256 of an export: the object's metadata then carries the algorithm and part
size from the start (``digest-algorithm``, ``digest-chunk-size``) and no copy is made when the store
itself verified the composite checksum.

:meth:`MultipartWriter.abort` (called on any exception inside ``with``) aborts the multipart upload and
deletes the object if it was already completed, so a cancelled export leaves no object and no incomplete
upload behind. A cancel is seen while the writer waits for its parts, and an abort does not wait for a
part in flight (its thread, :mod:`.partpool`, does not hold the process either): a part S3 never answers
cannot keep a cancelled or suspended task from stopping.

Resumable uploads (``resumable=True``, ``resume``: a streamed import into the S3 image target) keep
the digest states at the end of every part for a checkpoint (:meth:`MultipartWriter.uploaded_prefix`)
and continue an upload an earlier run left: :mod:`.s3resume`. ``chunked`` (the S3 image target) records
the ``sha256-chunked`` of a writer that is not resumable too (a stream of unknown size), hashed in threads.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from ..errors import Cancelled
from .base import TargetError
from .chunkdigest import ALGORITHM, ChunkedDigest, ChunkedSha256, combine, is_zero
from .hashing import ThreadedSha256
from .partpool import PartPool, wait_first
from .s3budget import PartBudget, fitted_part_size
from .s3complete import check_composite, check_multipart_etag, digests_to_store
from .s3copy import MAX_COPY, store_digests
from .s3parts import MAX_PARTS, MIN_PART, etag_is_md5, upload_error
from .s3partupload import send_part
from .s3resume import ResumableDigests, ResumedUpload, completion_error

log = logging.getLogger(__name__)


class MultipartWriter:
    """One object written as a stream (module docstring). Use as a context manager; :meth:`close`
    completes the upload and returns ``{bucket, key, etag, sha256, size, parts}``."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        *,
        part_size: int = 64 << 20,
        threads: int = 4,
        sha256: str | None = None,
        metadata: Mapping[str, str] | None = None,
        sse: Mapping[str, str] | None = None,
        expected_size: int | None = None,
        on_progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
        fence: Callable[[], None] | None = None,
        checksums: bool = False,
        full_sha256: bool = True,
        store_digest: bool = True,
        grow_parts: bool = False,
        memory: int | None = None,
        resumable: bool = False,
        resume: ResumedUpload | None = None,
        chunked: bool = False,
    ) -> None:
        if resume is not None:
            part_size, resumable = resume.part_size, True
        if part_size < MIN_PART:
            raise ValueError(f"part size {part_size} is below S3's minimum of {MIN_PART}")
        if checksums and grow_parts:  # the chunked digest's chunks are parts of one size
            raise ValueError("per-part checksums need parts of one size: not with grow_parts")
        if resumable and (checksums or grow_parts or sha256 is not None):
            raise ValueError("a resumable upload has parts of one size and computes its own sha256")
        if expected_size is not None and resume is None:  # 10,000 parts at most: grow the part (whole MiB)
            part_size = fitted_part_size(part_size, expected_size)
        self.client, self.bucket, self.key = client, bucket, key
        self.where = f"s3://{bucket}/{key}"
        self.part_size, self.threads = part_size, max(1, threads)
        #: the parts in flight and the part buffers held (``buffered``, ``peak_buffered``)
        self.budget = PartBudget(part_size, threads, memory, grow=grow_parts)
        self.known_sha256 = sha256
        self.metadata = dict(metadata or {})
        self.sse = dict(sse or {})
        self.on_progress, self.cancel, self.fence = on_progress, cancel, fence
        #: False: leave the sha256 out of the object (a caller copying it elsewhere stores it there)
        self.store_digest = store_digest
        self._buffer = bytearray()
        self.checksums = checksums
        self.full_sha256 = full_sha256 or sha256 is not None
        self.resumable = resumable
        #: continuing an earlier run's upload (whose parts in flight may land late: :meth:`detach`)
        self.resumed = resume is not None
        #: a resumable upload's digests and acknowledged prefix (its checkpoints), else None
        self._resumable: ResumableDigests | None = ResumableDigests() if resumable else None
        #: ``chunked`` and not resumable (a stream of unknown size): the sha256-chunked in its threads
        self._threaded_chunks: ChunkedSha256 | None = (
            ChunkedSha256(name="s3-chunked") if chunked and not resumable else None
        )
        self._sha: ThreadedSha256 | None = (
            ThreadedSha256("s3-sha256") if self.full_sha256 and not resumable else None
        )
        #: called (in the part's upload thread) once S3 acknowledged a part: a checkpoint may go further
        self.on_part: Callable[[], None] | None = None
        self._sizes: dict[int, int] = {}
        self._md5s: dict[int, bytes] = {}
        self._sha256s: dict[int, bytes] = {}
        self._hashed = 0
        self._zero_parts = 0
        self._lock = threading.Lock()
        self._etags: dict[int, str] = {}
        self._pending: set[Future[int]] = set()
        self._pool: PartPool | None = None
        self._number = 0
        self.size = 0
        self.uploaded = 0
        self.completed = False
        self.closed = False
        self._aborted = False
        meta = dict(self.metadata)
        if sha256 is not None:
            meta["sha256"] = sha256
        extra: dict[str, str] = {}
        if checksums:
            meta |= {"digest-algorithm": ALGORITHM, "digest-chunk-size": str(self.part_size)}
            extra["ChecksumAlgorithm"] = "SHA256"
        self.upload_id: str | None = None
        if resume is not None:
            self._resume(resume)
            return
        try:
            self.upload_id = client.create_multipart_upload(
                Bucket=bucket, Key=key, Metadata=meta, **self.sse, **extra
            )["UploadId"]
        except Exception as exc:
            raise upload_error(f"CreateMultipartUpload {self.where}", exc) from exc

    def _resume(self, resume: ResumedUpload) -> None:
        """Continue ``resume``'s upload after its last part (its ``parts`` as :func:`.s3resume.verify_parts`
        listed and checked them)."""
        assert self._resumable is not None
        self._resumable.load(resume)  # ValueError: parts or states that are not the record's
        self.upload_id = resume.upload_id
        for p in resume.parts:
            etag = p.etag if p.etag.startswith('"') else f'"{p.etag}"'
            self._etags[p.number] = etag
            self._sizes[p.number] = p.size
            if self._etag_is_md5():
                self._md5s[p.number] = bytes.fromhex(p.etag.strip('"'))
        self._number = resume.count
        self.size = self.uploaded = resume.size

    # -------------------------------------------------------------------------------------- writing

    def __enter__(self) -> MultipartWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None:
            self.abort()

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"upload to {self.where} cancelled")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; full parts go up in the background (at most ``threads`` at once)."""
        if self.closed:
            raise ValueError("write to a closed upload")
        self._check_cancel()
        n = len(data)
        if self._sha is not None:
            self._sha.update(data)  # in its own thread, beside this one's reads and the parts' uploads
        self.size += n
        if not self._buffer and n == self.part_size and isinstance(data, bytes):
            self.budget.count(n)
            self._submit(data)  # a whole part as it came: no copy
            return n
        # the buffer is filled up to one part at a time, so it never holds more than a part while a
        # full part waits for its turn to go up
        view = memoryview(data)
        while view:
            take = view[: self.part_size - len(self._buffer)]
            self._buffer += take
            self.budget.count(len(take))
            view = view[len(take) :]
            if len(self._buffer) >= self.part_size:
                part = bytes(self._buffer)
                self._buffer.clear()  # its bytes stay counted: they moved to the part
                self._submit(part)
        return n

    def _submit(self, data: bytes) -> None:
        if self._pool is None:
            self._pool = PartPool(self.threads, "s3-part")
        while len(self._pending) >= self.budget.in_flight:
            self._harvest(block=True)
            self._check_cancel()
        self._number += 1
        if self._number > MAX_PARTS:
            raise TargetError(f"{self.where}: more than {MAX_PARTS} parts", "UploadFailed")
        if self._resumable is not None:  # hashed in order as the parts are cut; the states at each end
            self._resumable.cut(self._number, data)
        elif self._threaded_chunks is not None:  # a hole is not hashed
            if is_zero(data):
                self._threaded_chunks.zeros(len(data))
            else:
                self._threaded_chunks.update(data)
        self._sizes[self._number] = len(data)
        self._pending.add(self._pool.submit(self._upload_part, self._number, data))
        self.part_size = self.budget.cut(self._number)
        self._harvest(block=False)

    def _upload_part(self, number: int, data: bytes) -> int:
        upload_id = self.upload_id
        sent = send_part(
            self.client,
            self.bucket,
            self.key,
            upload_id,
            number,
            data,
            checksums=self.checksums,
            etag_is_md5=self._etag_is_md5(),
        )
        if self._aborted and upload_id is not None:
            # S3 may store a part that was in flight when its upload was aborted, and keeps its bytes
            # until the upload is aborted again: once more now that it has landed (never raises: the
            # upload is most likely gone already)
            self._abort_upload(upload_id)
            return len(data)
        with self._lock:
            self._zero_parts += int(sent.zero)
            self._hashed += len(data) if self.checksums and not sent.zero else 0
        if self.checksums:
            self._sha256s[number] = sent.sha256
        self._md5s[number] = sent.md5
        self._etags[number] = sent.etag
        self.budget.count(-len(data))
        if self.on_part is not None:
            self.on_part()
        return len(data)

    def uploaded_prefix(self) -> ResumedUpload | None:
        """A resumable upload's longest run of parts 1..k that S3 has acknowledged, as a checkpoint
        records it (:class:`ResumedUpload` without its ``parts``: the count, the digest of their ETags,
        the digest states at the end of part k); None: no part yet. Parts of the full part size only
        (the last, short part is the object's end: nothing to resume after it). The prefix advances part
        by part as acknowledgements come in: constant work per part, whatever k."""
        if self._resumable is None or self.upload_id is None:
            return None
        # the dicts as they are (no copy per call: only membership and single reads, safe beside the
        # upload threads adding to them)
        return self._resumable.advance(self.upload_id, self.part_size, self._etags, self._sizes)

    @property
    def buffered(self) -> int:
        return self.budget.buffered

    @property
    def peak_buffered(self) -> int:
        return self.budget.peak_buffered

    def _etag_is_md5(self) -> bool:
        return etag_is_md5(self.sse)

    def _harvest(self, *, block: bool) -> None:
        done, self._pending = wait_first(self._pending, self.cancel, f"upload to {self.where}", block=block)
        for fut in done:
            self.uploaded += fut.result()  # re-raises a failed part's error
        if done and self.on_progress is not None:
            self.on_progress(self.uploaded)

    # ---------------------------------------------------------------------------------- completing

    def close(self, before_complete: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Upload the rest, complete the upload, check the ETag, store the sha256 as metadata.

        ``before_complete`` gets the chunked digest of the parts (``checksums``; else ``{}``) once every
        part is acknowledged and before ``CompleteMultipartUpload``: a check that raises there leaves no
        object that was ever visible (the ``with`` block aborts the upload)."""
        if self.closed:
            raise ValueError("the upload is closed")
        if self._buffer or self._number == 0:
            rest = bytes(self._buffer)
            self._buffer.clear()
            self._submit(rest)
        while self._pending:
            self._harvest(block=True)
        self._check_cancel()
        self._shutdown()
        sha256 = self._sha.hexdigest() if self._sha is not None else None
        chunked: ChunkedDigest | None = None
        if self._resumable is not None:
            sha256, chunked = self._resumable.result()
        elif self._threaded_chunks is not None:
            chunked = self._threaded_chunks.result()
        if self.known_sha256 is not None and self.known_sha256 != sha256:
            raise TargetError(
                f"{self.where}: the bytes sent hash to {sha256}, not the announced {self.known_sha256} "
                "(the source changed while it was read)",
                "UploadFailed",
            )
        numbers = sorted(self._etags)
        parts: list[dict[str, Any]] = [{"PartNumber": n, "ETag": self._etags[n]} for n in numbers]
        digest: ChunkedDigest | None = None
        if self.checksums:
            for n, part in zip(numbers, parts, strict=True):
                part["ChecksumSHA256"] = base64.b64encode(self._sha256s[n]).decode()
            digest = ChunkedDigest(
                combine([self._sha256s[n] for n in numbers]),
                self.part_size,
                len(numbers),
                self.size,
                self._hashed,
                self._zero_parts,
            )
        if before_complete is not None:
            # before the object exists: once completed, a reader could fetch it before a delete
            before_complete(digest.to_dict() if digest is not None else {})
            self._check_cancel()
        if self.fence is not None:
            self.fence()
        try:
            completed = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
            )
        except Exception as exc:  # PartReplaced: a late part of an earlier run has another ETag
            raise completion_error(self.where, exc, resumed=self.resumed) from exc
        self.completed = True
        etag = str(completed["ETag"]).strip('"')
        if self._etag_is_md5():
            check_multipart_etag(self.where, etag, [self._md5s[n] for n in numbers])
        done: dict[str, Any] = {
            "bucket": self.bucket,
            "key": self.key,
            "etag": etag,
            "sha256": sha256,
            "size": self.size,
            "parts": len(numbers),
        }
        if digest is not None:
            verified = check_composite(self.client, self.bucket, self.key, digest)
            done["digest"] = digest.to_dict() | {"s3_verified": verified}
            store = digests_to_store(sha256, digest, verified)  # one CopyObject at most
            if store and self.store_digest and self.size <= MAX_COPY:
                # a store that keeps checksums computes the copy's own: the whole-object SHA-256
                done["etag"] = self._store_digest(store, checksum=verified)
        elif self.known_sha256 is None and sha256 is not None and self.store_digest:
            done["etag"] = self._store_digest({"sha256": sha256})
        if chunked is not None:  # the sha256-chunked of its bytes, as the file image target records it
            done["digest"] = chunked.to_dict()
        self.closed = True
        return done

    def _store_digest(self, digests: Mapping[str, str], *, checksum: bool = False) -> str:
        """Copy the object onto itself with ``digests`` added to its metadata (:func:`.s3copy.store_digests`);
        return the new ETag."""
        meta = {**self.metadata, **digests}
        if self.checksums:
            meta |= {"digest-algorithm": ALGORITHM, "digest-chunk-size": str(self.part_size)}
        return store_digests(
            self.client, self.bucket, self.key, self.size, meta, self.sse, digests, checksum=checksum
        )

    # ------------------------------------------------------------------------------------ aborting

    def _shutdown(self, *, wait: bool = True) -> None:
        if self._pool is not None:
            # parts not started are dropped; running ones finish (a request cannot be interrupted),
            # waited for unless ``wait`` is False (their daemon threads do not hold the process)
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def detach(self) -> None:
        """Stop without aborting: the upload stays for the task's next run to continue from its
        checkpoint. Parts not started are dropped; running ones are not waited for (S3 may not answer
        one for minutes, and a suspend must end within the worker's grace) and finish in their daemon
        threads with no ``on_part`` call: this run may have lost its task, and the run that took it over
        uploads and checkpoints on its own. Such a part may land after the next run sent it again: the
        same bytes (:class:`.s3resume.PartReplaced` says why), so the same part, or under ETags that are
        not MD5s a Complete S3 refuses (``InvalidPart``: :class:`~.s3resume.PartReplaced`). Never raises."""
        self.closed = True
        self.on_part = None
        if self._sha is not None:
            self._sha.close()
        if self._threaded_chunks is not None:
            self._threaded_chunks.close()
        for fut in self._pending:
            fut.cancel()
        self._shutdown(wait=False)
        self._pending = set()

    def _abort_upload(self, upload_id: str, *, report: bool = False) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)
        except Exception as exc:
            if report:
                log.error("could not abort the multipart upload of %s: %s", self.where, type(exc).__name__)

    def abort(self) -> None:
        """Stop: abort the multipart upload and delete the object if it was completed. Never raises
        (the failure that led here matters more); what cannot be removed is logged."""
        # The writing stops first, as for a kept upload, without waiting for a part in flight: S3 may
        # not answer it for minutes (a stalled connection), and the upload it would join is aborted
        # next (a part S3 still stores after the abort, as it may, aborts the upload again when it lands:
        # :meth:`_upload_part`; a task's next run aborts every upload of its key).
        self._aborted = True  # (a part still in flight aborts the upload again once it lands)
        self.detach()
        if self.upload_id is not None and not self.completed:
            self._abort_upload(self.upload_id, report=True)
        if self.completed:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
            except Exception as exc:
                log.error("could not delete %s: %s", self.where, type(exc).__name__)
        self.upload_id = None
