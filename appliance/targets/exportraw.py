"""The RAW side of an export: the source disk opened (a regular file or a block device) and its bytes
produced for a sink in reads of :data:`CHUNK` (a file destination gets the holes by length, never read
nor hashed; a sink without ``write_zeros`` gets zero chunks where ``SEEK_DATA`` finds holes). A cold
source is read with O_DIRECT into the pool's aligned buffers (``direct``: :mod:`appliance.image.readbuf`),
a cached one through the page cache."""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import pagecache
from ..errors import Cancelled, UsageError
from ..image.readbuf import ReadPool, read_ahead
from ..image.vmdkwriter import ByteSink
from ..progress import ProgressTracker
from .base import TargetError
from .rawio import segments

#: bytes of the source read at a time
CHUNK = 4 << 20
_ZERO = bytes(CHUNK)
#: reused read buffers per export, at most: what the chunked digest's threads may hold queued
#: (``chunkdigest.QUEUE_BYTES`` each, two CPUs here) and are hashing, plus the one being read; beyond it a
#: read gets a fresh buffer (:class:`appliance.image.readbuf.ReadPool`)
POOL = 24


def _source_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError("the export source must be a regular file or a block device")
    return st.st_size


@contextlib.contextmanager
def open_source(source: Path) -> Iterator[tuple[int, int]]:
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open the export source {source}: {exc.strerror}") from exc
    try:
        yield fd, _source_size(fd)
    finally:
        os.close(fd)


def raw_producer(
    fd: int,
    size: int,
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes | bytearray | memoryview], object] | None = None,
    *,
    direct: int | None = None,
) -> Callable[[ByteSink], None]:
    def produce(sink: ByteSink) -> None:
        holes: Callable[[int], None] | None = getattr(sink, "write_zeros", None)
        if holes is not None:  # a file: each hole given by its length, never read nor hashed
            _raw_sparse(fd, size, sink, holes, tracker, cancel, on_read, direct)
            return
        # a sink that takes only bytes (an upload): a chunk with no data is written as zeros, unread
        pool = ReadPool(CHUNK, POOL, direct=direct)
        plan = _chunks(fd, size)
        if direct is None:
            _dense(fd, plan, pool, None, sink, tracker, cancel, on_read)
            return
        # O_DIRECT reads are synchronous: a thread reads the data chunks ahead into the pool
        wanted = ((pos, n) for pos, n, is_hole in plan if not is_hole)
        with contextlib.closing(read_ahead(pool, fd, wanted, READ_AHEAD // CHUNK)) as reads:
            _dense(fd, plan, pool, reads, sink, tracker, cancel, on_read)

    return produce


def _chunks(fd: int, size: int) -> list[tuple[int, int, bool]]:
    """``(pos, n, is_hole)`` of each :data:`CHUNK` of the source, a hole being a chunk with no data in the
    source's data map (:func:`appliance.targets.rawio.segments`)."""
    data = [(start, end) for start, end, is_data in segments(fd, size) if is_data]
    plan, i = [], 0
    for pos in range(0, size, CHUNK):
        n = min(CHUNK, size - pos)
        while i < len(data) and data[i][1] <= pos:
            i += 1
        plan.append((pos, n, not (i < len(data) and data[i][0] < pos + n)))
    return plan


def _dense(
    fd: int,
    plan: list[tuple[int, int, bool]],
    pool: ReadPool,
    reads: Iterator[bytes | bytearray | memoryview] | None,
    sink: ByteSink,
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes | bytearray | memoryview], object] | None,
) -> None:
    """Every chunk of ``plan`` written to ``sink``: a hole as zeros, the rest read (from ``reads`` when a
    read-ahead thread reads them, else here)."""
    for pos, n, is_hole in plan:
        if cancel is not None and cancel.is_set():
            raise Cancelled("export cancelled")
        if is_hole:
            chunk: bytes | bytearray | memoryview = _ZERO[:n]
        else:
            chunk = next(reads) if reads is not None else pool.read(fd, n, pos)
        if len(chunk) != n:
            raise TargetError(f"the source shrank while it was exported (at byte {pos})", "TargetWriteFailed")
        if on_read is not None and not is_hole:
            on_read(pos, chunk)
        sink.write(chunk)
        if reads is None and not is_hole:  # (a read with O_DIRECT cached nothing)
            pagecache.drop_range(fd, pos, n)
        del chunk  # (a pooled buffer is free again once the sink's consumers are done with it)
        tracker.update(pos + n)


def _raw_sparse(
    fd: int,
    size: int,
    sink: ByteSink,
    holes: Callable[[int], None],
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes | bytearray | memoryview], object] | None = None,
    direct: int | None = None,
) -> None:
    """The disk's data ranges written, its holes given to ``holes`` by length. The reads ahead are
    announced (:func:`_announce`): the kernel's read-ahead starts again at every data range after a hole,
    so without it the disk waits while this thread hashes and writes. What was read is dropped from the
    page cache behind the reads (:func:`appliance.pagecache.drop_range`): the export reads each
    byte once, and GiBs of cached source would cost fresh page-cache pages. With ``direct`` (the source
    opened with O_DIRECT, :func:`appliance.image.readbuf.open_direct`) the reads bypass the page cache
    and nothing is announced (that would fill the cache the reads avoid)."""
    pool = ReadPool(CHUNK, POOL, direct=direct)
    ranges = list(segments(fd, size))
    data = [(start, end) for start, end, is_data in ranges if is_data]
    ahead = _announce(fd, data) if direct is None else itertools.repeat(None)
    # O_DIRECT reads are synchronous: a thread reads READ_AHEAD bytes ahead into the pool instead
    if direct is None:
        _copy(fd, ranges, pool, None, ahead, sink, holes, tracker, cancel, on_read)
        return
    with contextlib.closing(read_ahead(pool, fd, _pieces(data), READ_AHEAD // CHUNK)) as reads:
        _copy(fd, ranges, pool, reads, ahead, sink, holes, tracker, cancel, on_read)


def _pieces(data: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The reads of :data:`CHUNK` that cover the data ranges ``data``, in order."""
    return ((pos, min(CHUNK, end - pos)) for start, end in data for pos in range(start, end, CHUNK))


def _copy(
    fd: int,
    ranges: list[tuple[int, int, bool]],
    pool: ReadPool,
    reads: Iterator[bytes | bytearray | memoryview] | None,
    ahead: Iterator[None],
    sink: ByteSink,
    holes: Callable[[int], None],
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes | bytearray | memoryview], object] | None,
) -> None:
    pos = 0
    for start, end, is_data in ranges:
        if not is_data:
            holes(end - start)
            pos = end
            tracker.update(pos)
            continue
        while pos < end:
            if cancel is not None and cancel.is_set():
                raise Cancelled("export cancelled")
            n = min(CHUNK, end - pos)
            next(ahead, None)
            chunk = next(reads) if reads is not None else pool.read(fd, n, pos)
            if len(chunk) != n:
                raise TargetError(
                    f"the source shrank while it was exported (at byte {pos})", "TargetWriteFailed"
                )
            if on_read is not None:
                on_read(pos, chunk)
            sink.write(chunk)
            if reads is None:  # (a read with O_DIRECT cached nothing)
                pagecache.drop_range(fd, pos, n)
            pos += n
            tracker.update(pos)


#: bytes of the source's data announced ahead of the read (``POSIX_FADV_WILLNEED``)
READ_AHEAD = 4 * CHUNK


def _announce(fd: int, data: list[tuple[int, int]]) -> Iterator[None]:
    """A generator to advance once per read of :data:`CHUNK` of ``data`` (its ranges, ascending): each
    step asks the kernel to read the source's data up to :data:`READ_AHEAD` bytes beyond the read, across
    the holes between ranges, as qemu-img keeps several reads in flight."""
    pieces = ((pos, min(CHUNK, end - pos)) for start, end in data for pos in range(start, end, CHUNK))
    window: list[tuple[int, int]] = []
    for piece in pieces:  # the first reads ahead at once, then one more with every read
        window.append(piece)
        if sum(n for _, n in window) >= READ_AHEAD:
            break
    for at, n in window:
        _will_need(fd, at, n)
    for at, n in pieces:
        yield
        _will_need(fd, at, n)
    while True:
        yield


def _will_need(fd: int, at: int, n: int) -> None:
    with contextlib.suppress(OSError):  # only a hint
        os.posix_fadvise(fd, at, n, os.POSIX_FADV_WILLNEED)


def file_producer(path: Path, cancel: threading.Event | None) -> Callable[[ByteSink], None]:
    def produce(sink: ByteSink) -> None:
        with open(path, "rb", buffering=0) as f:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("export cancelled")
                chunk = f.read(CHUNK)
                if not chunk:
                    return
                sink.write(chunk)

    return produce
