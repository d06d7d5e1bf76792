"""Downloading an EC2 import upload's parts (once :mod:`.uploadwait` found them all uploaded).

:func:`download_parts` reads the parts in index order, checking each one's length and (for plain
single-PUT S3 ETags) MD5, retrying a bad part from its start, and reporting each verified part so the
caller can checkpoint and resume; :func:`read_part_range` reads a range of one part (a preflight's).

Memory: a part is verified (length, MD5) before any of it is written, so each part in flight is held
whole, in a buffer of :class:`PartBuffers` that is reused for later parts: at most ``parallel + 1`` parts
are in memory (``parallel`` fetched ahead, the one being written), and no new memory is taken per part.
The writer gets each part as read-only views of at most :data:`~.http.CHUNK_SIZE` bytes, valid only
during the call (a writer keeps a copy of what it keeps).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import threading
from collections.abc import Callable
from typing import TypeVar

from ..errors import ImagingError
from ..redact import redact_url
from .http import BodyTooLong, HttpClient, SourceUnavailable, TransferInterrupted
from .httpio import CHUNK_SIZE, sleep_or_cancel
from .manifest import (
    ImportManifest,
    Part,
    PartVerificationFailed,
)
from .neterrors import is_stall
from .ordered import LinkedEvent, ordered_fetch
from .ranges import DEFAULT_PARALLEL, OnRetry, RetryNotice
from .urlfilter import UrlPolicy

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: a single-PUT S3 ETag: the MD5 of the object
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


def _md5_applies(etag: str | None, headers: object) -> bool:
    """Whether ``etag`` is the MD5 of the body: a plain 32-hex ETag (single-part S3 PUT) on an object
    not encrypted with SSE-KMS or SSE-C (whose ETags are not MD5s)."""
    if etag is None or not _PLAIN_MD5.match(etag.lower()):
        return False
    get = getattr(headers, "get", None)
    if get is None:
        return True
    sse = (get("x-amz-server-side-encryption") or "").lower()
    return not sse.startswith("aws:kms") and get("x-amz-server-side-encryption-customer-algorithm") is None


class PartBuffers:
    """The buffers of the parts in flight, reused part after part (module docstring): a buffer handed
    back is kept for a later part (up to ``keep`` of them), so a download takes its memory once instead
    of a new allocation per piece of every part (which the allocator, across the fetching threads, does
    not give back: a slow writer made the task process grow by tens of MiB beyond the parts it held).

    Instrumented: ``in_use`` (bytes of buffers handed out now), ``peak_in_use``, ``allocated`` (buffers
    ever created)."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._spare: list[bytearray] = []
        self._lock = threading.Lock()
        self.in_use = 0
        self.peak_in_use = 0
        self.allocated = 0

    def take(self, length: int) -> bytearray:
        """A buffer of at least ``length`` bytes (a kept one when one is large enough)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._spare) if len(b) >= length]
            buf = self._spare.pop(min(fits, key=lambda i: len(self._spare[i]))) if fits else None
            if buf is None:
                self.allocated += 1
        if buf is None:
            buf = bytearray(length)
        with self._lock:
            self.in_use += len(buf)
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        return buf

    def give(self, buf: bytearray) -> None:
        """``buf`` is free again (nothing refers to its bytes any more)."""
        with self._lock:
            self.in_use -= len(buf)
            if len(self._spare) < self._keep:
                self._spare.append(buf)


def download_parts(
    manifest: ImportManifest,
    write: Callable[[int, memoryview], None],
    policy: UrlPolicy,
    *,
    start_index: int = 0,
    on_part: Callable[[Part, int], None] | None = None,
    cancel: threading.Event | None = None,
    retries: int | None = None,
    http: HttpClient | None = None,
    parallel: int | None = None,
    on_checked: Callable[[Part, str | None], None] | None = None,
    on_retry: OnRetry | None = None,
    buffers: PartBuffers | None = None,
) -> int:
    """Download the parts from ``start_index`` on, in index order, passing ``write(file_offset, chunk)``
    (``chunk``: a view of at most :data:`~.http.CHUNK_SIZE` bytes, valid during the call only).

    ``parallel`` parts (default ``sources.parallel_ranges``) are fetched at a time, each verified
    before it is handed on; ``write`` still sees them one by one, in index order, in the caller's thread.

    Each part must answer 200 with Content-Length and a body of exactly ``end - start + 1`` bytes, and
    its MD5 must match a plain single-part ETag. A failed part (broken connection, short read, wrong
    length or MD5) is downloaded again from its start up to ``retries`` times (default
    ``sources.retries``); ``write`` only ever sees verified parts, each offset once. After each verified
    part ``on_part(part, bytes_done)`` is called, ``bytes_done`` being ``part.end + 1``: resume later
    with ``start_index = part.index + 1``. ``on_retry`` is told of every retry of a part as it happens.
    ``buffers`` (default: a new :class:`PartBuffers`) hold the parts in flight.
    Returns the number of bytes written in this call. Raises :class:`PartVerificationFailed`
    (``SourceIntegrity``), :class:`SourceUnavailable`, :class:`UrlNotAllowed`, :class:`Cancelled`.
    """
    client = http or HttpClient(policy)
    attempts = (retries if retries is not None else client.retries) + 1
    if not 0 <= start_index <= len(manifest.parts):
        raise ValueError(f"start_index {start_index} is outside 0..{len(manifest.parts)}")
    if parallel is None:
        parallel = policy.sources.parallel_ranges if policy.sources else DEFAULT_PARALLEL
    # ``parallel`` parts are downloaded and verified by threads while the caller writes the one
    # before them: network, MD5 and writes overlap, and at most parallel + 1 parts are in memory
    # (each in a reused buffer). Only verified parts reach ``write``, in index order.
    pool = buffers if buffers is not None else PartBuffers(keep=parallel + 1)
    stop = LinkedEvent(cancel)  # set when this call ends: the fetches still running shut down
    fetched = ordered_fetch(
        manifest.parts[start_index:],
        lambda part: _fetch_verified(client, part, attempts, stop, on_retry, pool),
        parallel=parallel,
        cancel=cancel,
        stop=stop,
        name="manifest-parts",
        discard=lambda fetched_part: pool.give(fetched_part[0]),
    )
    written = 0
    with contextlib.closing(fetched):
        for part, (buf, md5) in fetched:
            try:
                if on_checked is not None:
                    on_checked(part, md5)
                view = memoryview(buf).toreadonly()
                for at in range(0, part.length, CHUNK_SIZE):
                    write(part.start + at, view[at : min(at + CHUNK_SIZE, part.length)])
            finally:
                pool.give(buf)
            del buf
            written += part.length
            if on_part is not None:
                on_part(part, part.end + 1)
    expected = manifest.size - (manifest.parts[start_index].start if start_index < len(manifest.parts) else 0)
    if start_index < len(manifest.parts) and written != expected:
        raise PartVerificationFailed(
            f"downloaded {written} bytes but the manifest's remaining size is {expected}"
        )
    return written


def _fetch_verified(
    client: HttpClient,
    part: Part,
    attempts: int,
    cancel: threading.Event | None,
    on_retry: OnRetry | None = None,
    pool: PartBuffers | None = None,
) -> tuple[bytearray, str | None]:
    """The bytes of ``part`` (the first ``part.length`` of a buffer of ``pool``, to give back) once
    their length and MD5 check out, retrying with back-off, and the MD5 checked (None when the ETag
    is not one)."""
    buffers = pool if pool is not None else PartBuffers(keep=0)

    def once() -> tuple[bytearray, str | None]:
        buf = buffers.take(part.length)
        try:
            md5 = _download_part(client, part, buf, cancel)
        except BaseException:
            buffers.give(buf)
            raise
        return buf, md5

    return _retrying(
        once, client, part, part.start, attempts, cancel, on_retry, f"part {part.index} ({part.key})"
    )


def read_part_range(
    client: HttpClient,
    part: Part,
    start: int,
    end: int,
    *,
    retries: int | None = None,
    cancel: threading.Event | None = None,
    on_retry: OnRetry | None = None,
) -> bytes:
    """Bytes ``[start, end)`` of the upload (offsets in the whole upload, within ``part``) by one
    ranged GET of the part (a server ignoring Range answers 200: the range is cut out), retried like a
    part download (``retries``, default ``sources.retries``; back-off; ``on_retry`` told of each):
    what a header-only preflight reads before anything is written."""
    if not part.start <= start < end <= part.end + 1:
        raise ValueError(f"[{start}, {end}) is not inside part {part.index}")
    attempts = (retries if retries is not None else client.retries) + 1
    where = f"part {part.index} ({part.key})"

    def once() -> bytes:
        response = client.get_stream(part.get_url, (start - part.start, end - part.start - 1), cancel=cancel)
        with response:
            if response.status not in (200, 206):
                raise SourceUnavailable(f"{where} answered HTTP {response.status}", status=response.status)
            skip = start - part.start if response.status == 200 else 0
            body = response.read(skip + end - start)
        piece = body[skip : skip + end - start]
        if len(piece) != end - start:
            raise TransferInterrupted(
                f"{where} sent {len(piece)} of {end - start} bytes", received=len(piece)
            )
        return bytes(piece)

    return _retrying(once, client, part, start, attempts, cancel, on_retry, where)


def _retrying(
    fn: Callable[[], _T],
    client: HttpClient,
    part: Part,
    offset: int,
    attempts: int,
    cancel: threading.Event | None,
    on_retry: OnRetry | None,
    where: str,
) -> _T:
    """``fn()``, tried up to ``attempts`` times with the client's jittered exponential back-off while it
    fails transiently (a broken or stalled transfer, a short read, a wrong MD5, a transient HTTP
    status); ``on_retry`` is told of each retry as it happens."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (TransferInterrupted, PartVerificationFailed) as exc:
            failure: ImagingError = exc
        except SourceUnavailable as exc:
            if not exc.transient:
                raise
            failure = exc
        log.info("part %d attempt %d of %d failed: %s", part.index, attempt, attempts, failure.message)
        if on_retry is not None and attempt < attempts:
            notice = RetryNotice(
                where=f"part {part.index}",
                offset=offset,
                message=failure.message,
                attempt=attempt + 1,
                attempts=attempts,
                stalled=is_stall(failure),
            )
            try:
                on_retry(notice)
            except Exception:  # a notice that cannot be delivered must not break the download
                log.exception("the retry callback failed")
        if attempt == attempts:
            what = f"{where} failed after {attempts} attempts: {failure.message}"
            if isinstance(failure, PartVerificationFailed):
                raise PartVerificationFailed(what) from failure
            raise SourceUnavailable(what, status=getattr(failure, "status", None)) from failure
        delay = min(client.backoff_max, client.backoff * 2 ** (attempt - 1))
        sleep_or_cancel(delay / 2 + random.uniform(0, delay / 2), cancel, "download")
    raise AssertionError("unreachable")


def _download_part(
    client: HttpClient, part: Part, buf: bytearray, cancel: threading.Event | None
) -> str | None:
    """The part into the start of ``buf``; the MD5 its ETag carried and its bytes matched (None: no
    MD5 ETag)."""
    where = f"part {part.index} ({part.key})"
    response = client.get_stream(part.get_url, cancel=cancel)
    with response:
        if response.status != 200:
            raise SourceUnavailable(
                f"{where}: get-url {redact_url(part.get_url)} answered HTTP {response.status}; the part is "
                "missing or the presigned URL expired",
                status=response.status,
            )
        if response.content_length is not None and response.content_length != part.length:
            raise PartVerificationFailed(
                f"{where}: the server sends {response.content_length} bytes, the byte range is {part.length}"
            )
        md5 = hashlib.md5() if _md5_applies(response.etag, response.headers) else None
        received = 0
        # straight from the socket into the part's buffer; MD5 over pieces of up to 1 MiB, which
        # hashlib hashes without the GIL
        with memoryview(buf) as view, contextlib.closing(response.fill(view[: part.length])) as pieces:
            try:
                for n in pieces:
                    if md5 is not None:
                        md5.update(view[received : received + n])
                    received += n
            except BodyTooLong as exc:
                raise PartVerificationFailed(
                    f"{where}: the body is longer than the byte range ({part.length})"
                ) from exc
    if received != part.length:
        raise TransferInterrupted(f"{where}: received {received} of {part.length} bytes", received=received)
    if md5 is not None and md5.hexdigest() != (response.etag or "").lower():
        raise PartVerificationFailed(
            f"{where}: MD5 of the received bytes {md5.hexdigest()} does not match the ETag {response.etag}"
        )
    return md5.hexdigest() if md5 is not None else None
