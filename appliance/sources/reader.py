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

Checks and failures. A larger source than ``settings.max_size`` (the download limit) is refused
from its declared size before its body is read, one read as a stream without a size as soon as its
bytes pass the limit; every answer is checked by :mod:`.rangecheck` (an object replaced mid-read:
``Source.Changed``); a failed range is retried for its missing remainder by :mod:`.retrier` (back-off,
the stall watchdog, ``Source.Stalled``). The reader does not hash the whole object:
``reader.md5_etag`` (an S3 single-part ETag) is there for a caller that wants to.

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

from .blockstream import Block, BlockStream
from .http import BodyTooLong, HttpClient, SourceIntegrity, SourceUnavailable, TransferInterrupted
from .ordered import LinkedEvent, ordered_fetch
from .origins import Origin, Response, origin_for
from .rangebuffers import RangeBuffers
from .rangecheck import check_first, check_range, check_size, source_changed
from .ranges import (
    OnRetry,
    ReaderSettings,
    ReaderStats,
    ReadPosition,
    Span,
    Validator,
    parse_content_range,
    plan,
)
from .retrier import Retrier
from .single import read_single
from .urlfilter import UrlPolicy

log = logging.getLogger(__name__)


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
        self.origin = origin
        self.settings = settings or ReaderSettings()
        self.cancel = cancel
        self.start = start
        self._checkpoint = checkpoint
        #: set when the read ends (or the task is cancelled): every stream of the read shuts down
        self.stop: threading.Event = LinkedEvent(cancel)
        self.stats = ReaderStats()
        #: the retries of every GET of the read and its stall watchdog
        self.retrier = Retrier(origin.where, self.settings, self.stop, stats=self.stats, on_retry=on_retry)
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
        self._buffers = RangeBuffers(self.settings.range_size, self.settings.parallel)

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
            head = self.retrier.attempt(lambda: self.origin.get(0, rs - 1, cancel=self.stop), 0)
        except SourceUnavailable as exc:
            if exc.status != 416:
                raise
            head = self.retrier.attempt(
                lambda: self.origin.get(0, None, cancel=self.stop), 0
            )  # empty: no byte 0
        self.etag = head.etag
        self.validator = self.origin.validator(head)
        self.md5_etag = self.origin.md5_etag(head)
        partial = parse_content_range(head.status, head.headers.get("Content-Range"))
        try:
            check_first(self.origin.where, head, partial, self.settings)
        except BaseException:
            head.close()
            raise
        if partial is not None and partial[2] is not None and self.validator:
            self.size, self.ranged = partial[2], True
            first = Span(0, 0, partial[1] + 1)
            spans = [
                first,
                *(Span(i + 1, s.start, s.end) for i, s in enumerate(plan(first.end, self.size, rs))),
            ]
            self._first = head
            return self._parallel(spans, head)
        if partial is not None:  # ranges, but no size or nothing to tell versions apart
            head.close()
            head = self.retrier.attempt(lambda: self.origin.get(0, None, cancel=self.stop), 0)
            self.validator = self.origin.validator(head)
        self.size = head.content_length
        try:
            check_size(self.origin.where, self.settings.max_size, self.size)
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
        head = self.retrier.attempt(
            lambda: self.origin.get(tail.start, tail.end - 1, if_match=position.validator, cancel=self.stop),
            tail.start,
        )
        self.etag = head.etag
        self.md5_etag = self.origin.md5_etag(head)
        if head.etag and position.etag and head.etag != position.etag:
            head.close()
            raise source_changed(
                self.origin.where, tail.start, f"its ETag is now {head.etag}, it was {position.etag}"
            )
        partial = parse_content_range(head.status, head.headers.get("Content-Range"))
        self.size = partial[2] if partial is not None else head.content_length
        if position.size is not None and self.size is not None and self.size != position.size:
            head.close()
            raise source_changed(
                self.origin.where, tail.start, f"it is {self.size} bytes now, it was {position.size}"
            )
        try:
            check_size(self.origin.where, self.settings.max_size, self.size)
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
            raise source_changed(self.origin.where, tail.start, "the bytes before the saved position differ")
        self.ranged = True
        return self._parallel(plan(position.offset, self.size, self.settings.range_size), None)

    # -- one range ------------------------------------------------------------------------------

    def fetch(self, span: Span, head: Response | None = None) -> bytearray:
        """The verified bytes of ``span`` (in a worker thread), retried for what is missing."""
        buf = self._buffers.take(span.length)
        view = memoryview(buf)
        got, failures = 0, 0
        try:
            while True:
                offset = span.start + got
                try:
                    if head is not None:
                        response, head = head, None
                    else:
                        response = self.retrier.attempt(
                            lambda at=offset: self.origin.get(  # type: ignore[misc]
                                at, span.end - 1, if_match=self.validator, cancel=self.stop
                            ),
                            offset,
                        )
                    with response:
                        check_range(
                            self.origin.where, response, offset, span.end - 1, self.validator, self.size
                        )
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
                    failures = self.retrier.failed(exc, failures, span.start + got)
        except BaseException:
            self.stats.add(buffered=-got)
            view.release()
            self._buffers.give(buf)
            raise
        finally:
            view.release()

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
        self._buffers.give(buf)

    def close(self) -> None:
        self.stop.set()  # first: the fetches shut their sockets down, so closing the blocks is quick
        super().close()
        if self._first is not None:
            self._first.close()  # a no-op when the blocks read and closed it
            self._first = None

    def __enter__(self) -> RangeReader:
        self.open()
        return self


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
