"""One reader for every source: parallel ranged GETs, each verified, read back in order, resumable.

Public API (the rest of the package is the machinery)::

    reader = open_reader(source, policy, cancel=cancel, start=saved, checkpoint=save)
    with reader:                              # opens: the first GET; reader.size, reader.etag known
        while chunk := reader.read(1 << 20):  # a file-like object (io.RawIOBase: read, readinto, tell)
            consume(chunk)                    # or reader.readview(n): the bytes, not copied
    reader.stats                              # requests, bytes received, peak_buffered, retries, stalls

``source`` is ``{"url": "https://…" | "s3://bucket/key"}`` or ``{"bucket", "key"}`` (UserBucket); an
https URL (presigned manifest parts included) goes through the SSRF policy and pinned client of
:mod:`.http`, every redirect re-checked; an S3 object through boto3 with ``sources.s3``. A new kind
of source is an :class:`~.origins.Origin` given to :class:`RangeReader` directly.
``reader.iter_chunks()`` serves code written for an HTTP response's body. Import manifest parts go
through the same scheduler in :func:`.parts.download_parts` (``parallel`` parts, each MD5-checked).

How it reads. The first GET asks for the first ``range_size`` bytes. When the answer is a 206 that
tells the object's size and it has a validator (a strong ETag, else Last-Modified), the rest is read
as ranges of ``range_size`` bytes by ``parallel`` threads (:func:`.ordered.ordered_fetch`), each a
GET with ``If-Match`` (S3 ``IfMatch``; ``If-Unmodified-Since`` for a date), checked for its status,
``Content-Range``, size, ETag and length. Range *k* starts only while *k* is fewer than ``parallel``
ranges ahead of the one being read, so at most ``parallel + 1`` ranges are in memory
(``stats.peak_buffered`` counts the bytes). Otherwise (an answer of the whole object, no validator,
no size) the source is read as one stream, in pieces of ``range_size``, which a log line says; a
stream that breaks is resumed with ``Range`` and ``If-Range``, and a server that answers with the
whole object again has its first bytes skipped — only when they provably are the same (same
validator, or the same SHA-256 as what was read).

Size bounds (``settings.max_size``, the download limit). The object's size comes from the first
answer's ``Content-Range`` (its ``Content-Length`` when it is the whole object): a larger source is
refused with ``SizeLimitExceeded.Download`` before its body is read. A source read as one stream
without a size is cut off, with the same code, as soon as its bytes pass the limit. A ranged answer
must be exactly the range asked (``Content-Range`` and ``Content-Length``), of the same total, and
no longer than announced; anything else is ``SourceIntegrity`` (not retried).

Verification and failure. An object replaced mid-read (412, another ETag or size) fails with
``Source.Changed`` (:class:`~appliance.errors.SourceChanged`): bytes already read cannot be taken
back. A failed range (broken, short, 5xx, stalled) is retried for its missing remainder with
exponential back-off, up to ``retries`` more times. The stall watchdog is the connection's read
timeout: no byte for ``stall_seconds`` abandons the attempt; when the last of the K attempts of a
range stalled, the read fails with ``Source.Stalled`` (:class:`~appliance.errors.SourceStalled`)
naming the redacted URL and the offset of the first byte not received. The reader does not hash the
whole object: ``reader.md5_etag`` (an S3 single-part ETag) is there for a caller that wants to.

Checkpoints and resume. Once the consumer has read a whole range, and at least ``checkpoint_every``
bytes past the previous checkpoint, ``checkpoint(position)`` is called in the consumer's thread (at
its next read) with a :class:`~.ranges.ReadPosition`: every byte before ``position.offset`` was read
and what the consumer did with it is done; it carries the object's size, validator and the SHA-256
of the range before the offset. Save it (``to_dict``) with the consumer's state at that offset.
``start=ReadPosition.from_dict(saved)`` resumes: that range is fetched again and must hash the same,
under the same validator and size; then reading continues at ``position.offset`` (``reader.tell()``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..errors import SourceChanged, SourceStalled
from .blockstream import Block, BlockStream
from .http import BodyTooLong, HttpClient, SourceIntegrity, SourceUnavailable, TransferInterrupted
from .neterrors import is_stall
from .ordered import LinkedEvent, ordered_fetch
from .origins import Origin, Response, origin_for
from .ranges import (
    OnRetry,
    ReaderSettings,
    ReaderStats,
    ReadPosition,
    RetryNotice,
    Span,
    Validator,
    back_off,
    parse_content_range,
    too_large,
)
from .single import read_single
from .urlfilter import UrlPolicy

log = logging.getLogger(__name__)

__all__ = ["RangeReader", "ReadPosition", "ReaderSettings", "ReaderStats", "open_reader"]


class RangeReader(BlockStream):
    """Reads one :class:`~.origins.Origin` (see the module docstring). Open it (``with``), read it
    once. ``size`` (None when the source does not say), ``etag``, ``validator``, ``ranged`` (parallel
    ranges, else one stream) and ``md5_etag`` are known once it is open."""

    def __init__(
        self,
        origin: Origin,
        settings: ReaderSettings | None = None,
        *,
        cancel: threading.Event | None = None,
        start: ReadPosition | None = None,
        checkpoint: Callable[[ReadPosition], None] | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        super().__init__(start.offset if start else 0)
        #: told of every retry (a task event: a stall shows as it happens)
        self.on_retry = on_retry
        self.origin = origin
        self.settings = settings or ReaderSettings()
        self.cancel = cancel
        self.start = start
        self._checkpoint = checkpoint
        #: set when the read ends (or the task is cancelled): every stream of the read shuts down
        self.stop: threading.Event = LinkedEvent(cancel)
        self.stats = ReaderStats()
        self.size: int | None = None
        self.etag: str | None = None
        self.validator = Validator()
        self.ranged = False
        self.md5_etag: str | None = None
        self._last_checkpoint = self._offset
        self._opened = False
        #: the first answer, until the blocks take it (closed with the reader when they never do)
        self._first: Response | None = None
        #: range buffers the consumer is done with, used again (no fresh pages to fault in per range)
        self._spare: list[bytearray] = []
        self._spare_lock = threading.Lock()

    # -- opening --------------------------------------------------------------------------------

    def open(self) -> RangeReader:
        """Send the first GET (on resume: fetch and check the range before the position). Idempotent."""
        if self._opened:
            return self
        self._opened = True
        try:
            self._blocks = self._open_resumed(self.start) if self.start else self._open_fresh()
        except BaseException:
            self.close()
            raise
        return self

    def _open_fresh(self) -> Iterator[Block]:
        rs = self.settings.range_size
        try:
            head = self.attempt(lambda: self.origin.get(0, rs - 1, cancel=self.stop), 0)
        except SourceUnavailable as exc:
            if exc.status != 416:
                raise
            head = self.attempt(lambda: self.origin.get(0, None, cancel=self.stop), 0)  # empty: no byte 0
        self.etag = head.etag
        self.validator = self.origin.validator(head)
        self.md5_etag = self.origin.md5_etag(head)
        partial = parse_content_range(head.status, head.headers.get("Content-Range"))
        try:
            self._check_first(head, partial)
        except BaseException:
            head.close()
            raise
        if partial is not None and partial[2] is not None and self.validator:
            self.size, self.ranged = partial[2], True
            first = Span(0, 0, partial[1] + 1)
            spans = [first, *(Span(i + 1, s.start, s.end) for i, s in enumerate(self._plan(first.end)))]
            self._first = head
            return self._parallel(spans, head)
        if partial is not None:  # ranges, but no size or nothing to tell versions apart
            head.close()
            head = self.attempt(lambda: self.origin.get(0, None, cancel=self.stop), 0)
            self.validator = self.origin.validator(head)
        self.size = head.content_length
        try:
            self._check_size(self.size)
        except BaseException:
            head.close()
            raise
        log.info(
            "%s is read as one stream: %s",
            self.origin.where,
            "it does not serve byte ranges" if partial is None else "it has no size or validator for ranges",
        )
        self._first = head
        return read_single(self, head, 0, None)

    def _open_resumed(self, position: ReadPosition) -> Iterator[Block]:
        tail = Span(-1, position.offset - position.tail, position.offset)
        self.validator = position.validator
        head = self.attempt(
            lambda: self.origin.get(tail.start, tail.end - 1, if_match=position.validator, cancel=self.stop),
            tail.start,
        )
        self.etag = head.etag
        self.md5_etag = self.origin.md5_etag(head)
        if head.etag and position.etag and head.etag != position.etag:
            head.close()
            raise self.changed(tail.start, f"its ETag is now {head.etag}, it was {position.etag}")
        partial = parse_content_range(head.status, head.headers.get("Content-Range"))
        self.size = partial[2] if partial is not None else head.content_length
        if position.size is not None and self.size is not None and self.size != position.size:
            head.close()
            raise self.changed(tail.start, f"it is {self.size} bytes now, it was {position.size}")
        try:
            self._check_size(self.size)
        except BaseException:
            head.close()
            raise
        if partial is None or self.size is None:
            log.info("%s is read as one stream: it no longer serves byte ranges", self.origin.where)
            if partial is not None:  # a range of unknown total: start over from the position
                head.close()
            self._first = head
            return read_single(self, head if partial is None else None, position.offset, position)
        data = self.fetch(tail, head)
        same = hashlib.sha256(data).hexdigest() == position.tail_sha256
        self._released(data)
        if not same:
            raise self.changed(tail.start, "the bytes before the saved position differ")
        self.ranged = True
        return self._parallel(self._plan(position.offset), None)

    def _check_size(self, size: int | None) -> None:
        """Refuse a source that says it is larger than ``settings.max_size``, before its body is read."""
        cap = self.settings.max_size
        if cap is not None and size is not None and size > cap:
            raise too_large(self.origin.where, cap, size)

    def _check_first(self, head: Response, partial: tuple[int, int, int | None] | None) -> None:
        """The first answer: a whole object of an acceptable ``Content-Length``, or exactly the range
        asked (bytes 0..range_size-1, or the whole object when it is smaller), of a consistent
        ``Content-Range`` and an acceptable size."""
        if partial is None:
            self._check_size(head.content_length)
            return
        first, last, total = partial
        if first != 0:
            raise SourceIntegrity(f"{self.origin.where} answered the first GET with bytes from {first}")
        if last < first or (total is not None and last >= total):
            raise SourceIntegrity(
                f"{self.origin.where} answered with an impossible Content-Range "
                f"(bytes {first}-{last}/{total})"
            )
        self._check_size(total)
        if self.settings.max_size is not None and last >= self.settings.max_size:
            raise too_large(self.origin.where, self.settings.max_size)
        wanted = min(self.settings.range_size, total) - 1 if total is not None else last
        if last != wanted:
            raise SourceIntegrity(
                f"{self.origin.where} answered bytes {first}-{last} for a request of bytes 0-{wanted}"
            )
        length = head.content_length
        if length is not None and length != last - first + 1:
            raise SourceIntegrity(
                f"{self.origin.where} announced {length} bytes for the range {first}-{last}"
            )

    def _plan(self, begin: int) -> list[Span]:
        assert self.size is not None
        rs = self.settings.range_size
        return [Span(i, s, min(s + rs, self.size)) for i, s in enumerate(range(begin, self.size, rs))]

    # -- failures -------------------------------------------------------------------------------

    def changed(self, offset: int, why: str) -> SourceChanged:
        return SourceChanged(
            f"{self.origin.where} changed while it was being read (at offset {offset}: {why}); make sure "
            "the image is not overwritten while it is imported, then import it again"
        )

    def failed(self, exc: SourceUnavailable, failures: int, offset: int) -> int:
        """Count a failed attempt that stopped at ``offset``: raise when it was the last one (a stall
        as :class:`SourceStalled`), else log, back off and return the new count."""
        stalled = is_stall(exc)
        failures += 1
        if failures > self.settings.retries:
            if stalled:
                raise SourceStalled(
                    f"{self.origin.where} stalled at offset {offset}: no data for "
                    f"{self.settings.stall_seconds:g} seconds, {failures} times; check that the source "
                    "is reachable and serving, then import again"
                ) from exc
            raise exc
        self.stats.add(retries=1, stalls=int(stalled))
        notice = RetryNotice(
            where=self.origin.where,
            offset=offset,
            message=f"no data for {self.settings.stall_seconds:g}s (stalled)" if stalled else exc.message,
            attempt=failures + 1,
            attempts=self.settings.retries + 1,
            stalled=stalled,
        )
        log.info("%s", notice.text())
        if self.on_retry is not None:
            try:
                self.on_retry(notice)
            except Exception:  # a notice that cannot be delivered must not break the read
                log.exception("the retry callback failed")
        back_off(self.settings, failures, self.stop)
        return failures

    def attempt(self, send: Callable[[], Response], offset: int) -> Response:
        """``send()`` (one GET), retried on transient failures; a failed precondition is a change."""
        failures = 0
        while True:
            try:
                self.stats.add(requests=1)
                return send()
            except SourceUnavailable as exc:
                if exc.status == 412:
                    raise self.changed(offset, "it no longer matches what was read before") from exc
                if not exc.transient:
                    raise
                failures = self.failed(exc, failures, offset)

    # -- one range ------------------------------------------------------------------------------

    def fetch(self, span: Span, head: Response | None = None) -> bytearray:
        """The verified bytes of ``span`` (in a worker thread), retried for what is missing."""
        buf = self._buffer(span.length)
        view = memoryview(buf)
        got, failures = 0, 0
        try:
            while True:
                offset = span.start + got
                try:
                    if head is not None:
                        response, head = head, None
                    else:
                        response = self.attempt(
                            lambda at=offset: self.origin.get(  # type: ignore[misc]
                                at, span.end - 1, if_match=self.validator, cancel=self.stop
                            ),
                            offset,
                        )
                    with response:
                        self._check_range(response, offset, span.end - 1)
                        # straight from the socket into the range's buffer: no bytes object per piece
                        with contextlib.closing(response.fill(view[got : span.length])) as pieces:
                            try:
                                for n in pieces:
                                    got += n
                                    self.stats.add(received=n, buffered=n)
                            except BodyTooLong as exc:
                                raise SourceIntegrity(
                                    f"{self.origin.where} sent more than the range at {span.start}"
                                ) from exc
                    if got < span.length:
                        raise TransferInterrupted(
                            f"{self.origin.where}: the range at {span.start} ended after {got} of "
                            f"{span.length} bytes",
                            received=got,
                        )
                    return buf
                except SourceUnavailable as exc:
                    if not exc.transient:
                        raise
                    failures = self.failed(exc, failures, span.start + got)
        except BaseException:
            self.stats.add(buffered=-got)
            view.release()
            self._recycle(buf)
            raise
        finally:
            view.release()

    def _buffer(self, length: int) -> bytearray:
        with self._spare_lock:
            if length == self.settings.range_size and self._spare:
                return self._spare.pop()
        return bytearray(length)

    def _recycle(self, buf: bytearray) -> None:
        """``buf`` is done with: keep it for a later range (at most parallel + 1 are ever needed),
        unless a view of it is still alive (``readview``): the bytes its holder reads must not be
        overwritten by a later range, so that buffer is left to be freed with its last view."""
        if _exported(buf):
            return
        with self._spare_lock:
            if len(buf) == self.settings.range_size and len(self._spare) <= self.settings.parallel:
                self._spare.append(buf)

    def _check_range(self, response: Response, start: int, end: int) -> None:
        """A ranged answer must be exactly bytes ``start``..``end`` of the same object."""
        etag, known = response.etag, self.validator.etag
        if etag and known and etag != known:
            raise self.changed(start, f"its ETag is now {etag}, it was {known}")
        partial = parse_content_range(response.status, response.headers.get("Content-Range"))
        if partial is None:
            raise SourceUnavailable(
                f"{self.origin.where} answered a ranged GET at {start} with the whole object", transient=True
            )
        first, last, total = partial
        if total is not None and total != self.size:
            raise self.changed(start, f"it is {total} bytes now, it was {self.size}")
        if (first, last) != (start, end):
            raise SourceIntegrity(
                f"{self.origin.where} answered bytes {first}-{last} for a request of bytes {start}-{end}"
            )
        length = response.content_length
        if length is not None and length != end - start + 1:
            raise SourceIntegrity(f"{self.origin.where} announced {length} bytes for the range {start}-{end}")

    def _parallel(self, spans: list[Span], head: Response | None) -> Iterator[Block]:
        first = spans[0].index if spans else 0

        def fetch(span: Span) -> bytearray:
            return self.fetch(span, head if span.index == first else None)

        blocks = ordered_fetch(
            spans,
            fetch,
            parallel=self.settings.parallel,
            cancel=self.cancel,
            stop=self.stop,
            name="ranges",
            discard=self._released,
        )
        try:
            with contextlib.closing(blocks):
                for span, buf in blocks:
                    yield span.start, buf
        finally:
            if head is not None:
                head.close()

    # -- the consumer's side ------------------------------------------------------------------------

    def _block_done(self, start: int, buf: bytearray) -> None:
        """The consumer has read ``buf`` (bytes from ``start``): release it; checkpoint when due."""
        end = start + len(buf)
        due = end - self._last_checkpoint >= self.settings.checkpoint_every
        last = self.size is not None and end >= self.size
        if self._checkpoint is not None and buf and due and not last:
            self._last_checkpoint = end
            v = self.validator
            sha = hashlib.sha256(buf).hexdigest()
            self._checkpoint(ReadPosition(end, self.size, v.etag, v.last_modified, len(buf), sha))
        self._released(buf)

    def _at_end(self) -> None:
        if self.size is not None and self._offset != self.size:
            raise SourceIntegrity(f"{self.origin.where}: read {self._offset} bytes, it declared {self.size}")

    def _released(self, buf: bytearray) -> None:
        self.stats.add(buffered=-len(buf))
        self._recycle(buf)

    def close(self) -> None:
        self.stop.set()  # first: the fetches shut their sockets down, so closing the blocks is quick
        super().close()
        if self._first is not None:
            self._first.close()  # a no-op when the blocks read and closed it
            self._first = None

    def __enter__(self) -> RangeReader:
        self.open()
        return self


def _exported(buf: bytearray) -> bool:
    """Whether a buffer view of ``buf`` (a memoryview, a slice of one) is alive: a bytearray cannot
    change its size while one is. Trying costs nothing: one byte off and back within its
    allocation."""
    if not buf:
        return False
    try:
        last = buf.pop()
    except BufferError:
        return True
    buf.append(last)
    return False


def open_reader(
    source: Mapping[str, Any],
    policy: UrlPolicy,
    s3cfg: Mapping[str, Any] | None = None,
    *,
    cancel: threading.Event | None = None,
    start: ReadPosition | None = None,
    checkpoint: Callable[[ReadPosition], None] | None = None,
    settings: ReaderSettings | None = None,
    http: HttpClient | None = None,
    on_retry: OnRetry | None = None,
) -> RangeReader:
    """A :class:`RangeReader` of ``source`` (not open yet: ``with`` or :meth:`~RangeReader.open`).
    ``settings`` default to ``policy.sources`` (``parallel_ranges``, ``range_size``,
    ``stall_seconds``, ``retries``); ``s3cfg`` to ``policy.sources.s3``. Raises
    :class:`~.urlfilter.UrlNotAllowed`, :class:`~appliance.errors.UsageError` for a bad source.
    ``on_retry`` is told of every retry (:class:`~.ranges.RetryNotice`)."""
    settings = settings or ReaderSettings.from_sources(policy.sources)
    origin = origin_for(source, policy, s3cfg, settings=settings, http=http)
    return RangeReader(origin, settings, cancel=cancel, start=start, checkpoint=checkpoint, on_retry=on_retry)
