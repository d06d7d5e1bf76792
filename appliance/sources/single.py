"""The fallback of :mod:`.reader`: a source read as one stream, handed over in blocks of ``range_size``.

Used when the source does not serve byte ranges (an answer of the whole object, no
``Accept-Ranges``), or gives no size or validator to check ranges against (chunked without a length,
no ETag nor Last-Modified). A stream that breaks or stalls is opened again with ``Range`` from the
first byte not yet handed over (``If-Range`` with the validator); a server that answers with the whole
object then has its first bytes skipped, only when they are provably the bytes read before: the same
validator, or — without one — the same SHA-256 as the bytes handed over (a running hash is kept for
that). On resume from a saved position, the range before it is checked the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from typing import Protocol

from .blockstream import Block
from .http import SourceIntegrity, SourceUnavailable, TransferInterrupted
from .origins import Origin, Response
from .rangecheck import source_changed
from .ranges import ReaderSettings, ReaderStats, ReadPosition, Validator, parse_content_range, too_large
from .retrier import Retrier


class Reading(Protocol):
    """What this module uses of :class:`.reader.RangeReader` (which imports this module)."""

    origin: Origin
    settings: ReaderSettings
    stats: ReaderStats
    validator: Validator
    size: int | None
    stop: threading.Event
    retrier: Retrier


class _Skipped:
    """Checks re-sent bytes ``[at, handed)`` against what is known of them."""

    def __init__(self, begin: int, running: hashlib._Hash | None, tail: ReadPosition | None) -> None:
        #: (start, end, hash being built, expected digest)
        self.checks: list[tuple[int, int, hashlib._Hash, str]] = []
        if running is not None:
            self.checks.append((begin, -1, hashlib.sha256(), running.hexdigest()))
        if tail is not None:
            self.checks.append((tail.offset - tail.tail, tail.offset, hashlib.sha256(), tail.tail_sha256))

    def feed(self, data: bytes, position: int) -> None:
        end = position + len(data)
        for start, stop, sha, _ in self.checks:
            lo, hi = max(position, start), end if stop < 0 else min(end, stop)
            if lo < hi:
                sha.update(data[lo - position : hi - position])

    def differs(self) -> int | None:
        """The start of the first region whose bytes differ, or None."""
        return next((start for start, _, sha, want in self.checks if sha.hexdigest() != want), None)


def _body_start(reader: Reading, response: Response, handed: int) -> int:
    """Where ``response``'s body starts: ``handed`` for a 206, 0 for the whole object (of the same
    version); :class:`SourceChanged` otherwise."""
    etag, known = response.etag, reader.validator.etag
    if etag and known and etag != known:
        raise source_changed(reader.origin.where, handed, f"its ETag is now {etag}, it was {known}")
    partial = parse_content_range(response.status, response.headers.get("Content-Range"))
    if partial is None:
        length = response.content_length
        if reader.size is not None and length is not None and length != reader.size:
            raise source_changed(
                reader.origin.where, handed, f"it is {length} bytes now, it was {reader.size}"
            )
        if handed and reader.validator and reader.origin.validator(response) != reader.validator:
            raise source_changed(reader.origin.where, handed, "its ETag or Last-Modified differs")
        return 0
    first, _last, total = partial
    if total is not None and reader.size is not None and total != reader.size:
        raise source_changed(reader.origin.where, handed, f"it is {total} bytes now, it was {reader.size}")
    if first != handed:
        raise SourceIntegrity(f"{reader.origin.where} resumed at {first}, not at {handed}")
    return first


def _resume(reader: Reading, handed: int) -> Response:
    """GET from ``handed`` on, only if the object is the same (else the whole object). Without a
    validator a Range could join two versions: the whole object then, its first bytes checked."""
    validator = reader.validator
    start = handed if validator else 0
    return reader.origin.get(start, None, if_range=validator or None, cancel=reader.stop)


def read_single(
    reader: Reading, head: Response | None, begin: int, tail: ReadPosition | None
) -> Iterator[Block]:
    """Blocks ``(offset, bytes)`` from ``begin`` on; ``head`` is the open first answer. ``tail``: the
    saved position whose range before it the re-sent bytes must match."""
    rs = reader.settings.range_size
    stats = reader.stats
    handed = begin
    running = hashlib.sha256() if not reader.validator else None
    response, failures, position = head, 0, begin
    buf = bytearray()
    try:
        while True:
            try:
                if response is None:
                    if reader.size is not None and handed >= reader.size:
                        return
                    response = reader.retrier.attempt(lambda at=handed: _resume(reader, at), handed)  # type: ignore[misc]
                with response:
                    position = _body_start(reader, response, handed)
                    skipped = _Skipped(begin, running, tail) if position < handed else None
                    with contextlib.closing(response.iter_chunks()) as body:
                        for chunk in body:
                            stats.add(received=len(chunk))
                            if position < handed:  # re-sent bytes: check them, hand over the rest
                                assert skipped is not None
                                n = min(len(chunk), handed - position)
                                skipped.feed(chunk[:n], position)
                                position += n
                                chunk = chunk[n:]
                                if position == handed:
                                    bad = skipped.differs()
                                    if bad is not None:
                                        raise source_changed(
                                            reader.origin.where,
                                            bad,
                                            "bytes sent again differ from those read",
                                        )
                                    tail = None
                            if reader.size is not None and position + len(chunk) > reader.size:
                                raise SourceIntegrity(
                                    f"{reader.origin.where} sent more than its declared {reader.size} bytes"
                                )
                            cap = reader.settings.max_size
                            if cap is not None and position + len(chunk) > cap:
                                raise too_large(reader.origin.where, cap)
                            while chunk:
                                piece, chunk = chunk[: rs - len(buf)], chunk[rs - len(buf) :]
                                buf += piece
                                position += len(piece)
                                stats.add(buffered=len(piece))
                                if len(buf) == rs:
                                    if running is not None:
                                        running.update(buf)
                                    full, buf = buf, bytearray()
                                    yield handed, full
                                    handed += len(full)
                                    failures = 0
                if position < handed:
                    raise TransferInterrupted(f"{reader.origin.where} ended before offset {handed}")
                if reader.size is not None and position < reader.size:
                    raise TransferInterrupted(
                        f"{reader.origin.where} ended after {position} of {reader.size} bytes",
                        received=position,
                    )
                if buf:
                    full, buf = buf, bytearray()
                    yield handed, full
                return
            except SourceUnavailable as exc:
                stats.add(buffered=-len(buf))
                buf = bytearray()
                response = None
                if exc.status == 412:
                    raise source_changed(
                        reader.origin.where, handed, "it no longer matches what was read before"
                    ) from exc
                if not exc.transient:
                    raise
                failures = reader.retrier.failed(exc, failures, position)
    finally:
        stats.add(buffered=-len(buf))
        if response is not None:
            response.close()
