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
from collections.abc import Callable, Iterable, Iterator
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
        # a file gets each hole by its length, never read nor hashed; a sink that takes only bytes (an
        # upload) gets a chunk with no data as zeros, unread
        planned = _sparse_plan if holes is not None else _chunk_plan
        # (generators, twice over the data map: a list of a 16 TiB volume's chunks would be 300 MiB)
        plan = planned(fd, size)
        data = ((pos, n) for pos, n, is_hole in planned(fd, size) if not is_hole)
        pool = ReadPool(CHUNK, POOL, direct=direct)
        if direct is None:
            _copy(fd, plan, pool, None, _announce(fd, data), sink, holes, tracker, cancel, on_read)
            return
        # O_DIRECT reads are synchronous: a thread reads the data ahead into the pool instead of the
        # kernel's read-ahead (and nothing is announced: that would fill the cache the reads avoid)
        with contextlib.closing(read_ahead(pool, fd, data, READ_AHEAD // CHUNK)) as reads:
            _copy(fd, plan, pool, reads, itertools.repeat(None), sink, holes, tracker, cancel, on_read)

    return produce


#: what is copied, in order: ``(pos, n, is_hole)``
Plan = Iterator[tuple[int, int, bool]]


def _sparse_plan(fd: int, size: int) -> Plan:
    """The source's holes whole, its data ranges in reads of :data:`CHUNK` (the data map of
    :func:`appliance.targets.rawio.segments`)."""
    for start, end, is_data in segments(fd, size):
        if is_data:
            yield from ((pos, min(CHUNK, end - pos), False) for pos in range(start, end, CHUNK))
        else:
            yield start, end - start, True


def _chunk_plan(fd: int, size: int) -> Plan:
    """Each :data:`CHUNK` of the source, a hole being a chunk with no data in its data map."""
    data = [(start, end) for start, end, is_data in segments(fd, size) if is_data]
    i = 0
    for pos in range(0, size, CHUNK):
        n = min(CHUNK, size - pos)
        while i < len(data) and data[i][1] <= pos:
            i += 1
        yield pos, n, not (i < len(data) and data[i][0] < pos + n)


def _copy(
    fd: int,
    plan: Plan,
    pool: ReadPool,
    reads: Iterator[bytes | bytearray | memoryview] | None,
    ahead: Iterator[None],
    sink: ByteSink,
    holes: Callable[[int], None] | None,
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes | bytearray | memoryview], object] | None,
) -> None:
    """Every piece of ``plan`` written to ``sink``: a hole to ``holes`` by its length (else as zeros, at
    most a :data:`CHUNK`), the data read (from ``reads`` when a read-ahead thread reads it, else here,
    ``ahead`` advanced once per read). What a buffered read cached is dropped behind it: the export reads
    each byte once, and GiBs of cached source would cost fresh page-cache pages."""
    for pos, n, is_hole in plan:
        if cancel is not None and cancel.is_set():
            raise Cancelled("export cancelled")
        if is_hole:
            if holes is not None:
                holes(n)
            else:
                sink.write(_ZERO[:n])
            tracker.update(pos + n)
            continue
        next(ahead, None)
        chunk = next(reads) if reads is not None else pool.read(fd, n, pos)
        if len(chunk) != n:
            raise TargetError(f"the source shrank while it was exported (at byte {pos})", "TargetWriteFailed")
        if on_read is not None:
            on_read(pos, chunk)
        sink.write(chunk)
        if reads is None:  # (a read with O_DIRECT cached nothing)
            pagecache.drop_range(fd, pos, n)
        del chunk  # (a pooled buffer is free again once the sink's consumers are done with it)
        tracker.update(pos + n)


#: bytes of the source's data announced ahead of the read (``POSIX_FADV_WILLNEED``)
READ_AHEAD = 4 * CHUNK


def _announce(fd: int, pieces: Iterable[tuple[int, int]]) -> Iterator[None]:
    """A generator to advance once per read of ``pieces`` (``(pos, n)``, ascending): each step asks the
    kernel to read the source's data up to :data:`READ_AHEAD` bytes beyond the read, across the holes
    between data ranges (where the kernel's own read-ahead starts again), as qemu-img keeps several reads
    in flight."""
    later = iter(pieces)
    window: list[tuple[int, int]] = []
    for piece in later:  # the first reads ahead at once, then one more with every read
        window.append(piece)
        if sum(n for _, n in window) >= READ_AHEAD:
            break
    for at, n in window:
        _will_need(fd, at, n)
    for at, n in later:
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
