"""Waiting for an EC2 import upload and downloading its parts.

The legacy ImportVolume/ImportInstance calls name a manifest URL that usually does not exist yet:
euca2ools presigns it, creates the task, and only then PUTs the manifest and the parts. So
:func:`wait_for_manifest` polls the manifest URL (404 or S3's 403 for a missing key mean "not yet"), then
HEADs each part until it is there (several at a time, answers taken in index order), all with
exponential back-off, until the task's deadline.
:func:`download_parts` then reads the parts in index order, checking each one's length and (for plain
single-PUT S3 ETags) MD5, retrying a bad part from its start, and reporting each verified part so the
caller can checkpoint and resume.

Memory: a part is verified (length, MD5) before any of it is written, so each part in flight is held
whole, in a buffer of :class:`PartBuffers` that is reused for later parts: at most ``parallel + 1`` parts
are in memory (``parallel`` fetched ahead, the one being written), and no new memory is taken per part.
The writer gets each part as read-only views of at most :data:`~.http.CHUNK_SIZE` bytes, valid only
during the call (a writer keeps a copy of what it keeps).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import random
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ..errors import Cancelled, ImagingError
from ..redact import redact_url
from .http import (
    CHUNK_SIZE,
    BodyTooLong,
    HttpClient,
    SourceUnavailable,
    TransferInterrupted,
    is_stall,
    sleep_or_cancel,
)
from .manifest import (
    MAX_MANIFEST_BYTES,
    ImportManifest,
    ManifestInvalid,
    Part,
    PartVerificationFailed,
    parse_manifest,
)
from .ordered import LinkedEvent, ordered_fetch
from .ranges import DEFAULT_PARALLEL, OnRetry, RetryNotice
from .urlfilter import UrlNotAllowed, UrlPolicy

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: a single-PUT S3 ETag: the MD5 of the object
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
#: S3 error codes on a presigned GET that will never turn into the manifest by waiting
_FATAL_S3_CODES = frozenset(
    {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AuthorizationQueryParametersError"}
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _remaining(deadline: dt.datetime) -> float:
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=dt.UTC)
    return (deadline - _now()).total_seconds()


def _s3_error(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 XML error body, or ("", "") when it is not one."""
    try:
        root = SafeET.fromstring(body[:65536], forbid_dtd=True)
    except (DefusedXmlException, ET.ParseError):
        return "", ""
    return (root.findtext("Code") or "").strip(), (root.findtext("Message") or "").strip()


class _Backoff:
    """Poll interval doubling from ``first`` up to ``cap``; reset when progress is made."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = first, max(cap, first)
        self.current = first

    def next(self) -> float:
        value = self.current
        self.current = min(self.cap, self.current * 2)
        return value

    def reset(self) -> None:
        self.current = self.first


def _wait(backoff: _Backoff, deadline: dt.datetime, cancel: threading.Event | None) -> None:
    delay = min(backoff.next(), max(0.0, _remaining(deadline)))
    # a little jitter so many tasks started together do not poll the object store in lock-step
    sleep_or_cancel(delay * random.uniform(0.9, 1.0), cancel, "waiting for the upload")


def wait_for_manifest(
    url: str,
    policy: UrlPolicy,
    *,
    deadline: dt.datetime,
    cancel: threading.Event | None = None,
    on_wait: Callable[[str], None] | None = None,
    poll_interval: float | None = None,
    max_interval: float | None = None,
    http: HttpClient | None = None,
) -> ImportManifest:
    """Wait until the manifest at ``url`` and every part it lists are uploaded; return the manifest.

    A 404, or S3's 403 for a key that does not exist yet, means "not uploaded yet": the URL is polled
    every ``poll_interval`` seconds, doubling up to ``max_interval`` (defaults: ``sources.manifest_poll_*``).
    Then each part's head-url is HEADed until it answers 200 (euca2ools uploads parts after the
    manifest): ``sources.parallel_ranges`` HEADs at a time, their answers taken in index order.
    ``on_wait`` gets a short status before each wait. Raises
    :class:`SourceUnavailable` ("the import manifest was not uploaded before the task expired") at
    ``deadline`` (aware datetime; naive means UTC), :class:`ManifestInvalid`, :class:`UrlNotAllowed` for
    a disallowed manifest or part URL, :class:`Cancelled` within about a second of ``cancel``.
    """
    client = http or HttpClient(policy)
    sources = policy.sources
    first = poll_interval or (sources.manifest_poll_interval if sources else 5.0)
    cap = max_interval or (sources.manifest_poll_max_interval if sources else 60.0)
    backoff = _Backoff(first, cap)
    notify = on_wait or (lambda _msg: None)

    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled("waiting for the import manifest cancelled")
        data, answer = _try_get_manifest(client, url, cancel)
        if data is not None:
            manifest = parse_manifest(data)
            break
        if _remaining(deadline) <= 0:
            raise SourceUnavailable(
                f"the import manifest was not uploaded before the task expired (last answer from "
                f"{redact_url(url)}: {answer}); upload the disk image (e.g. euca-resume-import) and import "
                "again"
            )
        notify(f"waiting for the import manifest to be uploaded ({answer})")
        _wait(backoff, deadline, cancel)

    _check_part_urls(manifest, policy)
    backoff.reset()
    count = len(manifest.parts)
    index = 0
    width = sources.parallel_ranges if sources else DEFAULT_PARALLEL
    # the parts' HEADs go ``width`` at a time (one after the other they were ~0.4 s of a 2 GiB
    # ImportVolume's 205 parts, before any byte moved); their answers are taken in index order, so
    # the first part not there yet, or the first refusal, is the one a sequential wait would meet
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="part-heads") as pool:
        while index < count:
            if cancel is not None and cancel.is_set():
                raise Cancelled("waiting for the import upload cancelled")
            batch = manifest.parts[index : index + 2 * width]
            answers = [pool.submit(_part_present, client, part, cancel) for part in batch]
            present, answer = True, ""
            try:
                for future in answers:
                    present, answer = future.result()
                    if not present:
                        break
                    index += 1
            finally:
                for future in answers:
                    future.cancel()  # the HEADs past a missing part are asked again after the wait
            if present:
                backoff.reset()
                continue
            part = manifest.parts[index]
            if _remaining(deadline) <= 0:
                raise SourceUnavailable(
                    f"part {index + 1} of {count} ({part.key}) was not uploaded before the task expired "
                    f"(last answer: {answer}); finish the upload (e.g. euca-resume-import) and import again"
                )
            notify(f"waiting for part {index + 1} of {count} to be uploaded ({answer})")
            _wait(backoff, deadline, cancel)
    return manifest


def _try_get_manifest(
    client: HttpClient, url: str, cancel: threading.Event | None
) -> tuple[bytes | None, str]:
    """(body, "") when the manifest is there, else (None, why not yet). Raises for permanent failures."""
    try:
        response = client.get_stream(url, cancel=cancel)
    except SourceUnavailable as exc:
        return None, exc.message  # the object store is down or flaky: keep waiting until the deadline
    with response:
        if response.status == 200:
            try:
                body = response.read(MAX_MANIFEST_BYTES)
            except TransferInterrupted as exc:
                return None, exc.message
            if len(body) > MAX_MANIFEST_BYTES:
                raise ManifestInvalid(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
            return body, ""
        try:
            body = response.read(65536)
        except TransferInterrupted:
            body = b""
    code, message = _s3_error(body)
    answer = f"HTTP {response.status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if response.status == 404:
        return None, answer
    if response.status == 403 and code not in _FATAL_S3_CODES and "expired" not in message.lower():
        # S3 answers 403 for a missing key when the signer may not list the bucket
        return None, answer
    raise SourceUnavailable(
        f"the import manifest URL {redact_url(url)} cannot be read ({answer}); check that the presigned URL "
        "is valid and not expired",
        status=response.status,
    )


def _part_present(client: HttpClient, part: Part, cancel: threading.Event | None) -> tuple[bool, str]:
    try:
        response = client.head(part.head_url, cancel=cancel)
    except SourceUnavailable as exc:
        return False, exc.message
    with response:
        status, length = response.status, response.content_length
    if status == 200:
        if length is not None and length != part.length:
            raise PartVerificationFailed(
                f"part {part.index} ({part.key}) is {length} bytes but the manifest says {part.length}; the "
                "uploaded parts do not belong to this manifest (delete them and upload again)"
            )
        return True, ""
    if status in (403, 404):
        return False, f"HEAD answered {status}"
    raise SourceUnavailable(
        f"part {part.index} head-url {redact_url(part.head_url)} answered HTTP {status}", status=status
    )


def _check_part_urls(manifest: ImportManifest, policy: UrlPolicy) -> None:
    """Every part URL must pass the policy; each distinct scheme://host:port is resolved once."""
    seen: dict[str, None] = {}
    for part in manifest.parts:
        for name, url in (("head-url", part.head_url), ("get-url", part.get_url)):
            origin = url.split("/", 3)[:3]
            key = "/".join(origin)
            if key in seen:
                continue
            try:
                policy.check(url)
            except UrlNotAllowed as exc:
                # the same class: an unresolvable part host stays Source.Unreachable
                raise type(exc)(f"part {part.index} {name}: {exc.message}") from exc
            seen[key] = None


# --------------------------------------------------------------------------------------------- download


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
