"""A streamed S3 multipart upload: bytes written in order, parts uploaded in parallel as they fill, every
part's ETag checked against its MD5, the object's sha256 stored as user metadata; any failure or cancel
aborts the upload and leaves nothing in the bucket.

:class:`MultipartWriter` is a forward-only byte sink (``write(data)``), so a writer that never seeks
(:func:`appliance.image.vmdkwriter.write_stream_vmdk`, a tar stream of an OVA, a RAW disk read in order)
goes to S3 without a scratch copy. Memory: about ``(threads + 1) x part_size``. S3 allows 10,000 parts: a
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
from .chunkdigest import ALGORITHM, ChunkedDigest, combine, is_zero
from .hashing import ThreadedSha256

log = logging.getLogger(__name__)

MIN_PART = 5 << 20
MAX_PARTS = 10_000
#: CopyObject's limit; larger objects are copied part by part
MAX_COPY = 5 << 30
COPY_PART = 1 << 30
#: parts between two doublings of the part size of a stream of unknown size (``grow_parts``)
GROW_EVERY = 1000


def _error(operation: str, exc: Exception) -> TargetError:
    """``UploadFailed`` naming the operation and S3's error code, never a library's whole text."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return TargetError(f"{operation} failed: {err.get('Code')}: {err.get('Message')}", "UploadFailed")
    return TargetError(f"{operation} failed: {type(exc).__name__}", "UploadFailed")


def multipart_etag(part_md5s: list[bytes]) -> str:
    """S3's ETag of a multipart object made of parts with these MD5 digests."""
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


@functools.lru_cache(maxsize=4)
def _zero_part_digests(length: int) -> tuple[bytes, bytes]:
    """``(md5, sha256)`` of a part of ``length`` zero bytes (once per length and process)."""
    z = bytes(length)
    return hashlib.md5(z).digest(), hashlib.sha256(z).digest()


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
    ) -> None:
        if part_size < MIN_PART:
            raise ValueError(f"part size {part_size} is below S3's minimum of {MIN_PART}")
        if checksums and grow_parts:  # the chunked digest's chunks are parts of one size
            raise ValueError("per-part checksums need parts of one size: not with grow_parts")
        if expected_size is not None:  # 10,000 parts at most: grow the part (whole MiB)
            part_size = max(part_size, -(-expected_size // MAX_PARTS // (1 << 20)) * (1 << 20))
        self.client, self.bucket, self.key = client, bucket, key
        self.where = f"s3://{bucket}/{key}"
        self.part_size, self.threads = part_size, max(1, threads)
        #: parts in flight at most: ``threads``, fewer once grown parts would hold more memory than
        #: ``threads`` parts of the first size (a long stream of unknown size)
        self._in_flight = self.threads
        self._budget = self.threads * part_size
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
        self._sha: ThreadedSha256 | None = ThreadedSha256("s3-sha256") if self.full_sha256 else None
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
        try:
            self.upload_id: str | None = client.create_multipart_upload(
                Bucket=bucket, Key=key, Metadata=meta, **self.sse, **extra
            )["UploadId"]
        except Exception as exc:
            raise _error(f"CreateMultipartUpload {self.where}", exc) from exc

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
            self._submit(data)  # a whole part as it came: no copy
            return n
        self._buffer += data
        while len(self._buffer) >= self.part_size:
            with memoryview(self._buffer) as view, view[: self.part_size] as head:
                part = bytes(head)
            del self._buffer[: self.part_size]
            self._submit(part)
        return n

    def _grow(self) -> None:
        """Double the part size every :data:`GROW_EVERY` parts (``grow_parts``): 10,000 parts starting
        at 5 MiB then cover about 5 TiB, and memory grows only for a stream that long. Fewer grown
        parts are in flight, so the uploads hold about as much as ``threads`` parts of the first size
        (plus the part being filled)."""
        if self.grow_parts and self._number % GROW_EVERY == 0:
            self.part_size *= 2
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
            raise _error(f"UploadPart {number} of {self.where}", exc) from exc
        etag = str(resp["ETag"])
        if self._etag_is_md5() and etag.strip('"') != md5.hex():
            raise TargetError(
                f"UploadPart {number} of {self.where}: S3 answered ETag {etag}, not the part's MD5 "
                f"{md5.hex()}: the part was damaged on its way",
                "UploadFailed",
            )
        self._md5s[number] = md5
        self._etags[number] = etag
        return len(data)

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

    def close(self) -> dict[str, Any]:
        """Upload the rest, complete the upload, check the ETag, store the sha256 as metadata."""
        if self.closed:
            raise ValueError("the upload is closed")
        if self._buffer or self._number == 0:
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        while self._pending:
            self._harvest(block=True)
        self._check_cancel()
        self._shutdown()
        sha256 = self._sha.hexdigest() if self._sha is not None else None
        if self.known_sha256 is not None and self.known_sha256 != sha256:
            raise TargetError(
                f"{self.where}: the bytes sent hash to {sha256}, not the announced {self.known_sha256} "
                "(the source changed while it was read)",
                "UploadFailed",
            )
        if self.fence is not None:
            self.fence()
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
        try:
            completed = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
            )
        except Exception as exc:
            raise _error(f"CompleteMultipartUpload {self.where}", exc) from exc
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
        self.closed = True
        return done

    def _check_composite(self, digest: ChunkedDigest) -> bool:
        """Whether S3 reports the object's composite SHA-256 checksum (``UploadFailed`` when it differs
        from ``digest``: the store holds other bytes than were sent); False when it reports none."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key, ChecksumMode="ENABLED")
        except Exception as exc:
            raise _error(f"HeadObject {self.where}", exc) from exc
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
        """Copy the object onto itself with ``digests`` added to its metadata; return the new ETag.
        ``checksum``: the copy gets S3's SHA-256 checksum of the whole object (a copy is one part), which
        must then be the ``sha256`` of ``digests``."""
        meta = {**self.metadata, **digests}
        if self.checksums:
            meta |= {"digest-algorithm": ALGORITHM, "digest-chunk-size": str(self.part_size)}
        source = {"Bucket": self.bucket, "Key": self.key}
        try:
            if self.size <= MAX_COPY:
                resp = self.client.copy_object(
                    Bucket=self.bucket,
                    Key=self.key,
                    CopySource=source,
                    Metadata=meta,
                    MetadataDirective="REPLACE",
                    **self.sse,
                    **({"ChecksumAlgorithm": "SHA256"} if checksum else {}),
                )
                etag = str(resp["CopyObjectResult"]["ETag"]).strip('"')
            else:
                etag = server_copy(self.client, self.bucket, self.key, self.key, self.size, meta, self.sse)
            head = self.client.head_object(
                Bucket=self.bucket, Key=self.key, **({"ChecksumMode": "ENABLED"} if checksum else {})
            )
        except TargetError:
            raise
        except Exception as exc:
            raise _error(f"storing the sha256 of {self.where}", exc) from exc
        stored = head.get("Metadata", {})
        if any(stored.get(k) != v for k, v in digests.items()) or int(head["ContentLength"]) != self.size:
            raise TargetError(f"{self.where}: the stored object does not carry its sha256", "UploadFailed")
        reported = head.get("ChecksumSHA256")
        if checksum and reported and digests.get("sha256"):
            whole = base64.b64encode(bytes.fromhex(digests["sha256"])).decode("ascii")
            if reported != whole:
                raise TargetError(
                    f"{self.where}: S3 reports the checksum {reported} for the copy, not {whole}",
                    "UploadFailed",
                )
        return etag

    # ------------------------------------------------------------------------------------ aborting

    def _shutdown(self) -> None:
        if self._pool is not None:
            # parts not started are dropped; running ones finish (a request cannot be interrupted)
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def abort(self) -> None:
        """Stop: abort the multipart upload and delete the object if it was completed. Never raises
        (the failure that led here matters more); what cannot be removed is logged."""
        self.closed = True
        if self._sha is not None:
            self._sha.close()
        for fut in self._pending:
            fut.cancel()
        self._shutdown()
        self._pending = set()
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
