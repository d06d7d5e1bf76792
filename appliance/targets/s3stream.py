"""A streamed S3 multipart upload: bytes written in order, parts uploaded in parallel as they fill, every
part's ETag checked against its MD5, the object's sha256 stored as user metadata; any failure or cancel
aborts the upload and leaves nothing in the bucket.

:class:`MultipartWriter` is a forward-only byte sink (``write(data)``), so a writer that never seeks
(:func:`appliance.image.vmdkwriter.write_stream_vmdk`, a tar stream of an OVA, a RAW disk read in order)
goes to S3 without a scratch copy. Memory: about ``(threads + 1) x part_size``, or at most ``memory``
bytes of part buffers when the caller gives that budget (the part being filled and the parts in flight:
fewer parts go up at once, never fewer than one; :attr:`MultipartWriter.peak_buffered` counts the
most that were held). S3 allows 10,000 parts: a
writer told the size (``expected_size``) grows its part size to fit; one that cannot know it
(``grow_parts``: a decompressed stream) doubles its part size every 1,000 parts instead.

Digests and checks:

* each part is sent with ``Content-MD5`` (S3 refuses a part whose bytes differ) and its returned ETag
  must be that MD5 (where S3 says so: not under SSE-KMS, whose ETags are not MD5s);
* the completed object's ETag must be S3's multipart form, ``md5(md5(part 1) ‖ … ‖ md5(part N))-N``;
* the sha256 of every byte written is computed on the way, in a thread of its own
  (:class:`~appliance.targets.hashing.ThreadedSha256`). S3 takes metadata when an upload starts: a
  caller that knows the sha256 beforehand passes ``sha256`` (checked against the bytes at the end);
  otherwise the object is copied onto itself with the digest as metadata once it is complete (a
  server-side copy: ``CopyObject`` up to 5 GiB, ``UploadPartCopy`` beyond: :func:`server_copy`), and
  read back (HeadObject); with ``store_digest=False`` it is not (a caller that copies the completed
  object to its final key, :mod:`.s3staged`, stores the digest with that copy);
* with ``checksums`` (the exports), every part also carries its SHA-256 (``ChecksumSHA256``, the upload
  created with ``ChecksumAlgorithm=SHA256``: S3 refuses a part whose bytes differ), computed in the
  part's upload thread (an all-zero part takes the cached digest of a zero part, MD5 likewise); the
  object's digest is then the chunked SHA-256 of its parts (:mod:`.chunkdigest`), which is S3's
  composite checksum: ``HeadObject(ChecksumMode=ENABLED)`` must answer the same ``base64-N`` value
  (where the store reports one). ``full_sha256=False`` skips the serial whole-object sha256: the
  object's metadata then carries the algorithm and part size from the start (``digest-algorithm``,
  ``digest-chunk-size``) and no copy is made when the store itself verified the composite checksum;
  a store that reports none gets the chunked value by the copy (``sha256-chunked``, ``digest-chunks``).
  Exports copy only objects up to 5 GiB (a single ``CopyObject`` keeps the object's checksum); a
  larger one keeps its digests in the task's record and in S3's checksum, not in its metadata.

:meth:`MultipartWriter.abort` (called on any exception inside ``with``) aborts the multipart upload and
deletes the object if it was already completed, so a cancelled export leaves no object and no incomplete
upload behind.

Resumable uploads (``resumable=True``, a streamed import into the S3 image target,
:mod:`appliance.steps.s3_checkpoint`): the sha256 and the ``sha256-chunked`` of the bytes written
(:class:`~appliance.sources.savedhash.SavedHash`, :class:`~.savedchunks.SavedChunkedSha256`) run in the
writer's thread as each part is cut, and their states at the end of every part are kept until the
acknowledged prefix passes it (:meth:`MultipartWriter.uploaded_prefix`), so a checkpoint can name the
parts completed so far — their count and a digest of their ETags, constant in size — with the digest
states at their end. A writer made with ``resume`` (:class:`ResumedUpload`, its parts listed by
``ListParts`` and checked against the record by :func:`verify_parts`) continues that multipart upload
after its last recorded part instead of creating one. ``chunked`` (the S3 image target) records the
``sha256-chunked`` of a writer that is not resumable too (a stream of unknown size), hashed in threads.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any

from ..errors import Cancelled
from .base import TargetError
from .chunkdigest import ALGORITHM, ChunkedDigest, ChunkedSha256, combine, is_zero
from .hashing import ThreadedSha256
from .s3copy import MAX_COPY, store_digests
from .s3parts import MAX_PARTS, MIN_PART, multipart_etag, upload_error
from .s3resume import ResumableDigests, ResumedUpload

log = logging.getLogger(__name__)

#: parts between two doublings of the part size of a stream of unknown size (``grow_parts``)
GROW_EVERY = 1000


@functools.lru_cache(maxsize=4)
def _zero_part_digests(length: int) -> tuple[bytes, bytes]:
    """``(md5, sha256)`` of a part of ``length`` zero bytes (once per length and process)."""
    z = bytes(length)
    return hashlib.md5(z).digest(), hashlib.sha256(z).digest()


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
            part_size = max(part_size, -(-expected_size // MAX_PARTS // (1 << 20)) * (1 << 20))
        self.client, self.bucket, self.key = client, bucket, key
        self.where = f"s3://{bucket}/{key}"
        self.part_size, self.threads = part_size, max(1, threads)
        #: parts in flight at most: ``threads``, fewer once grown parts would hold more memory than
        #: ``threads`` parts of the first size (a long stream of unknown size)
        self._in_flight = self.threads
        self._budget = self.threads * part_size
        #: the most bytes of part buffers held at once, when given: the part being filled and the
        #: parts in flight (one part in flight at least, so at least two parts' worth)
        self.memory = memory
        if memory is not None:
            self._in_flight = max(1, min(self.threads, memory // part_size - 1))
            self._budget = self._in_flight * part_size
        #: bytes of part buffers held now (the part being filled, the parts not yet uploaded) and at most
        self.buffered = 0
        self.peak_buffered = 0
        self.known_sha256 = sha256
        self.metadata = dict(metadata or {})
        self.sse = dict(sse or {})
        self.on_progress, self.cancel, self.fence = on_progress, cancel, fence
        #: False: leave the sha256 out of the object (a caller copying it elsewhere stores it there)
        self.store_digest = store_digest
        #: True (a stream of unknown size): the part size doubles every GROW_EVERY parts
        self.grow_parts = grow_parts
        self._buffer = bytearray()
        self.checksums = checksums
        self.full_sha256 = full_sha256 or sha256 is not None
        self.resumable = resumable
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
        self._pool: ThreadPoolExecutor | None = None
        self._number = 0
        self.size = 0
        self.uploaded = 0
        self.completed = False
        self.closed = False
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
            self._count(n)
            self._submit(data)  # a whole part as it came: no copy
            return n
        # the buffer is filled up to one part at a time, so it never holds more than a part while a
        # full part waits for its turn to go up
        view = memoryview(data)
        while view:
            take = view[: self.part_size - len(self._buffer)]
            self._buffer += take
            self._count(len(take))
            view = view[len(take) :]
            if len(self._buffer) >= self.part_size:
                part = bytes(self._buffer)
                self._buffer.clear()  # its bytes stay counted: they moved to the part
                self._submit(part)
        return n

    def _count(self, delta: int) -> None:
        """Part buffers held change by ``delta`` bytes (the counter behind :attr:`peak_buffered`)."""
        with self._lock:
            self.buffered += delta
            self.peak_buffered = max(self.peak_buffered, self.buffered)

    def _grow(self) -> None:
        """Double the part size every :data:`GROW_EVERY` parts (``grow_parts``): 10,000 parts starting
        at 5 MiB then cover about 5 TiB, and memory grows only for a stream that long. Fewer grown
        parts are in flight, so the uploads hold about as much as ``threads`` parts of the first size
        (plus the part being filled)."""
        if self.grow_parts and self._number % GROW_EVERY == 0:
            self.part_size *= 2
            if self.memory is not None:
                self._in_flight = max(1, min(self.threads, self.memory // self.part_size - 1))
            else:
                self._in_flight = max(1, min(self.threads, self._budget // self.part_size))

    def _submit(self, data: bytes) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="s3-part")
        while len(self._pending) >= self._in_flight:
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
        self._grow()
        self._harvest(block=False)

    def _upload_part(self, number: int, data: bytes) -> int:
        extra: dict[str, str] = {}
        if data and is_zero(data):  # a hole of a RAW disk: nothing to hash
            md5, sha = _zero_part_digests(len(data))
            with self._lock:
                self._zero_parts += 1
        else:
            md5 = hashlib.md5(data).digest()
            sha = hashlib.sha256(data).digest() if self.checksums else b""
            with self._lock:
                self._hashed += len(data) if self.checksums else 0
        if self.checksums:
            self._sha256s[number] = sha
            extra["ChecksumSHA256"] = base64.b64encode(sha).decode("ascii")
        try:
            resp = self.client.upload_part(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=data,
                ContentMD5=base64.b64encode(md5).decode("ascii"),
                **extra,
            )
        except Exception as exc:
            raise upload_error(f"UploadPart {number} of {self.where}", exc) from exc
        etag = str(resp["ETag"])
        if self._etag_is_md5() and etag.strip('"') != md5.hex():
            raise TargetError(
                f"UploadPart {number} of {self.where}: S3 answered ETag {etag}, not the part's MD5 "
                f"{md5.hex()}: the part was damaged on its way",
                "UploadFailed",
            )
        self._md5s[number] = md5
        self._etags[number] = etag
        self._count(-len(data))
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

    def _etag_is_md5(self) -> bool:
        return not str(self.sse.get("ServerSideEncryption", "")).startswith("aws:kms")

    def _harvest(self, *, block: bool) -> None:
        if not self._pending:
            return
        done, self._pending = wait(self._pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
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
        except Exception as exc:
            raise upload_error(f"CompleteMultipartUpload {self.where}", exc) from exc
        self.completed = True
        etag = str(completed["ETag"]).strip('"')
        if self._etag_is_md5():
            expected = multipart_etag([self._md5s[n] for n in numbers])
            if etag != expected:
                raise TargetError(
                    f"{self.where}: S3 answered ETag {etag} for the completed object, not {expected}",
                    "UploadFailed",
                )
        done: dict[str, Any] = {
            "bucket": self.bucket,
            "key": self.key,
            "etag": etag,
            "sha256": sha256,
            "size": self.size,
            "parts": len(numbers),
        }
        if digest is not None:
            verified = self._check_composite(digest)
            done["digest"] = digest.to_dict() | {"s3_verified": verified}
            # the object's metadata gets what was not known when the upload started: the whole-object
            # sha256, or (a store that keeps no checksum) the chunked value; one CopyObject at most
            store: dict[str, str] = {} if sha256 is None else {"sha256": sha256}
            if not verified:
                store |= {"sha256-chunked": digest.hexdigest, "digest-chunks": str(digest.chunks)}
            if store and self.store_digest and self.size <= MAX_COPY:
                # a store that keeps checksums computes the copy's own: the whole-object SHA-256
                done["etag"] = self._store_digest(store, checksum=verified)
        elif self.known_sha256 is None and sha256 is not None and self.store_digest:
            done["etag"] = self._store_digest({"sha256": sha256})
        if chunked is not None:  # the sha256-chunked of its bytes, as the file image target records it
            done["digest"] = chunked.to_dict()
        self.closed = True
        return done

    def _check_composite(self, digest: ChunkedDigest) -> bool:
        """Whether S3 reports the object's composite SHA-256 checksum (``UploadFailed`` when it differs
        from ``digest``: the store holds other bytes than were sent); False when it reports none."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key, ChecksumMode="ENABLED")
        except Exception as exc:
            raise upload_error(f"HeadObject {self.where}", exc) from exc
        reported = head.get("ChecksumSHA256")
        if not reported:
            return False
        # S3 answers base64-N for a composite checksum (some stores leave out the -N)
        value, _, count = str(reported).partition("-")
        if value != digest.s3_checksum.partition("-")[0] or count not in ("", str(digest.chunks)):
            raise TargetError(
                f"{self.where}: S3 reports the checksum {reported}, not the {digest.s3_checksum} of the "
                "parts sent",
                "UploadFailed",
            )
        return True

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

    def _shutdown(self) -> None:
        if self._pool is not None:
            # parts not started are dropped; running ones finish (a request cannot be interrupted)
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def detach(self) -> None:
        """Stop without aborting: the upload stays for the task's next run to continue from its
        checkpoint. Parts not started are dropped, running ones finish (a request cannot be
        interrupted) with no ``on_part`` call: this run may have lost its task, and the run that took it
        over uploads and checkpoints on its own. Never raises."""
        self.closed = True
        self.on_part = None
        if self._sha is not None:
            self._sha.close()
        if self._threaded_chunks is not None:
            self._threaded_chunks.close()
        for fut in self._pending:
            fut.cancel()
        self._shutdown()
        self._pending = set()

    def abort(self) -> None:
        """Stop: abort the multipart upload and delete the object if it was completed. Never raises
        (the failure that led here matters more); what cannot be removed is logged."""
        self.detach()  # the writing stops first, as for a kept upload; then the upload goes
        if self.upload_id is not None and not self.completed:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except Exception as exc:
                log.error("could not abort the multipart upload of %s: %s", self.where, type(exc).__name__)
        if self.completed:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
            except Exception as exc:
                log.error("could not delete %s: %s", self.where, type(exc).__name__)
        self.upload_id = None
