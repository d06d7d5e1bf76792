"""The RAW side of an export: the source disk opened (a regular file or a block device) and its bytes
produced for a sink in reads of :data:`CHUNK` (a file destination gets the holes by length, never read
nor hashed; a sink without ``write_zeros`` gets zero chunks where ``SEEK_DATA`` finds holes)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import Cancelled, UsageError
from ..image.vmdkwriter import ByteSink
from ..progress import ProgressTracker
from .base import TargetError
from .rawio import segments

#: bytes of the source read at a time
CHUNK = 4 << 20
_ZERO = bytes(CHUNK)


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
    on_read: Callable[[int, bytes], object] | None = None,
) -> Callable[[ByteSink], None]:
    def produce(sink: ByteSink) -> None:
        holes: Callable[[int], None] | None = getattr(sink, "write_zeros", None)
        if holes is not None:  # a file: each hole given by its length, never read nor hashed
            _raw_sparse(fd, size, sink, holes, tracker, cancel, on_read)
            return
        pos = 0
        while pos < size:
            if cancel is not None and cancel.is_set():
                raise Cancelled("export cancelled")
            n = min(CHUNK, size - pos)
            try:
                is_hole = os.lseek(fd, pos, os.SEEK_DATA) >= pos + n
            except OSError as exc:  # ENXIO: only a hole after pos; else no SEEK_DATA here
                is_hole = exc.errno == errno.ENXIO
            chunk = _ZERO[:n] if is_hole else os.pread(fd, n, pos)
            if len(chunk) != n:
                raise TargetError(
                    f"the source shrank while it was exported (at byte {pos})", "TargetWriteFailed"
                )
            if on_read is not None and not is_hole:
                on_read(pos, chunk)
            sink.write(chunk)
            pos += n
            tracker.update(pos)

    return produce


def _raw_sparse(
    fd: int,
    size: int,
    sink: ByteSink,
    holes: Callable[[int], None],
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes], object] | None = None,
) -> None:
    """The disk's data ranges written, its holes given to ``holes`` by length."""
    pos = 0
    for start, end, is_data in segments(fd, size):
        if not is_data:
            holes(end - start)
            pos = end
            tracker.update(pos)
            continue
        while pos < end:
            if cancel is not None and cancel.is_set():
                raise Cancelled("export cancelled")
            n = min(CHUNK, end - pos)
            chunk = os.pread(fd, n, pos)
            if len(chunk) != n:
                raise TargetError(
                    f"the source shrank while it was exported (at byte {pos})", "TargetWriteFailed"
                )
            if on_read is not None:
                on_read(pos, chunk)
            sink.write(chunk)
            pos += n
            tracker.update(pos)


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
