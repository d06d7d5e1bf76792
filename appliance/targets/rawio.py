"""Byte-level writing of RAW disk data: sparse-aware copies, positional writes of arriving parts,
zeroing without writing zeros, flushing; every ``OSError`` becomes a coded target error.

Writers everywhere (the volume targets, the import steps, the file image target) use these, so a
full disk, a hole and a block device are handled the same way.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import pagecache
from ..errors import ImagingError, UsageError
from ..image.decoding import zeros
from ..progress import ProgressCallback, ProgressTracker
from .base import TargetError, Volume, check_cancel, storage_error

CHUNK = 4 * 1024 * 1024
_ZEROS = bytes(CHUNK)
#: ioctl numbers from <linux/fs.h>
BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
FICLONE = 0x40049409
#: fallocate(2) mode bits from <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def disk_size(path: Path) -> int:
    """Bytes of the regular file or block device at ``path`` (a block device's ``st_size`` is 0: its end
    is where ``lseek`` finds it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def block_device_size(fd: int) -> int:
    """Size in bytes of the block device open as ``fd`` (BLKGETSIZE64)."""
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return struct.unpack("Q", buf)[0]


def segments(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, is_data)`` ranges covering ``[0, size)`` of the file open as ``fd``.

    Uses SEEK_DATA/SEEK_HOLE; where the filesystem cannot tell, everything is data.
    """
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                yield pos, size, False
                return
            yield pos, size, True
            return
        data = min(data, size)
        if data > pos:
            yield pos, data, False
        if data >= size:
            return
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        yield data, hole, True
        pos = hole


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        n = os.pwrite(fd, buf, offset)
        buf = buf[n:]
        offset += n


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range of a regular file (it then reads as zeros); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def zero_range(fd: int, offset: int, length: int, is_block: bool) -> None:
    """Make ``[offset, offset+length)`` read as zeros on a destination that is not known to be zeroed."""
    if is_block:
        try:
            # Lets the device zero efficiently (a loop device punches holes in its backing file).
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                raise
    elif _punch_hole(fd, offset, length):
        return
    end = offset + length
    while offset < end:
        n = min(CHUNK, end - offset)
        pwrite_all(fd, memoryview(_ZEROS)[:n], offset)
        offset += n


def copy_sparse(
    src_fd: int,
    dst_fd: int,
    size: int,
    *,
    dst_zeroed: bool,
    dst_is_block: bool = False,
    hasher: Any | None = None,
    on_bytes: Callable[[int], object] | None = None,
    cancel: threading.Event | None = None,
) -> int:
    """Copy ``size`` bytes from ``src_fd`` to ``dst_fd`` (same offsets), skipping what need not be written.

    Holes and all-zero chunks of the source are skipped when the destination already reads as zeros
    (``dst_zeroed``); otherwise they are zeroed on it. ``hasher`` (a hashlib object) sees every byte,
    holes included. ``on_bytes`` gets the offset reached; ``cancel`` is checked per chunk. Returns the
    number of bytes actually written.
    """
    written = 0
    hole_view = memoryview(_ZEROS)
    for start, end, is_data in segments(src_fd, size):
        pos = start
        while pos < end:
            check_cancel(cancel, "copy")
            n = min(CHUNK, end - pos)
            if is_data:
                chunk = os.pread(src_fd, n, pos)
                if len(chunk) != n:
                    raise TargetError(
                        f"source shrank while copying (short read at {pos})", "TargetWriteFailed"
                    )
                if hasher is not None:
                    hasher.update(chunk)
                if chunk == _ZEROS[:n]:
                    if not dst_zeroed:
                        zero_range(dst_fd, pos, n, dst_is_block)
                else:
                    pwrite_all(dst_fd, memoryview(chunk), pos)
                    written += n
            else:
                if hasher is not None:
                    hasher.update(hole_view[:n])
                if not dst_zeroed:
                    zero_range(dst_fd, pos, n, dst_is_block)
            pos += n
            if on_bytes is not None:
                on_bytes(pos)
    return written


def hash_file(path: Path, cancel: threading.Event | None = None) -> tuple[str, int]:
    """``(sha256 hex, size)`` of ``path``, reading only its data ranges (holes hash as zeros)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for start, end, is_data in segments(fd, size):
            pos = start
            while pos < end:
                check_cancel(cancel, "hashing")
                n = min(CHUNK, end - pos)
                h.update(os.pread(fd, n, pos) if is_data else memoryview(_ZEROS)[:n])
                pos += n
    finally:
        os.close(fd)
    return h.hexdigest(), size


def write_raw(
    volume: Volume,
    source: Path,
    *,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> int:
    """Write the RAW image ``source`` onto ``volume`` from offset 0; returns the image size in bytes.

    Sparse-aware: holes and zero chunks are skipped on a zeroed volume (``info["zeroed"]``) and
    zeroed otherwise, so stale data on a reused device never shows through. Progress is reported in
    phase ``writing``. Raises :class:`UsageError` if the image is larger than the volume,
    :class:`InsufficientStorage` when the storage fills up, :class:`Cancelled` on ``cancel``. Does not
    flush: :meth:`VolumeTarget.finalize` does.
    """
    size = source.stat().st_size
    if size > volume.size:
        raise UsageError(f"the image ({size} bytes) is larger than volume {volume.id} ({volume.size} bytes)")
    tracker = ProgressTracker("writing", size, on_progress)
    src_fd = os.open(source, os.O_RDONLY)
    try:
        try:
            dst_fd = os.open(volume.path, os.O_WRONLY)
        except OSError as exc:
            raise storage_error(exc, f"volume {volume.id} ({volume.path})") from exc
        try:
            is_block = stat.S_ISBLK(os.fstat(dst_fd).st_mode)
            copy_sparse(
                src_fd,
                dst_fd,
                size,
                dst_zeroed=bool(volume.info.get("zeroed")),
                dst_is_block=is_block,
                on_bytes=tracker.update,
                cancel=cancel,
            )
        except OSError as exc:
            raise storage_error(exc, f"volume {volume.id} ({volume.path})") from exc
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    tracker.finish()
    return size


def fsync_path(path: Path, where: str) -> None:
    """Flush ``path`` (a file or block device) to stable storage; ENOSPC/EIO become coded errors."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise storage_error(exc, where) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise storage_error(exc, where) from exc
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RawWriter:
    """Positional writes of a RAW image into a file or onto a block device, as parts arrive.

    All-zero chunks are not written: on a destination known to read as zeros (``zeroed``: a fresh
    sparse file, a zeroed volume) they are skipped, elsewhere zeroed efficiently (a punched hole,
    BLKZEROOUT), so they cost nothing and stale data never shows through. An ``OSError`` becomes the
    coded error ``error(exc)`` returns (a full target is ``InsufficientStorage``, full scratch
    ``InsufficientScratch``: the caller knows which storage it is writing); None lets it through.
    """

    def __init__(
        self,
        path: Path,
        *,
        zeroed: bool,
        error: Callable[[OSError], ImagingError | None],
        create: bool = False,
    ) -> None:
        self.path = path
        self.zeroed = zeroed
        self._error = error
        self.fd = -1
        with self._coded():
            self.fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
            self.is_block = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        # the volume's pages leave the page cache as they are written (appliance.pagecache)
        self._behind = pagecache.WriteBehind(self.fd)

    @contextmanager
    def _coded(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            coded = self._error(exc)
            if coded is None:
                raise
            raise coded from exc

    def __enter__(self) -> RawWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def read(self, offset: int, length: int) -> bytes:
        """What is at ``[offset, offset + length)`` now (re-reading verified parts after a restart)."""
        with self._coded():
            return os.pread(self.fd, length, offset)

    def write(self, offset: int, chunk: bytes | memoryview, *, zero: bool | None = None) -> None:
        """Put ``chunk`` at ``offset``; an all-zero chunk is a hole or zeroed, never written out.
        ``zero``: whether the chunk is all zeros, when the caller found out already (None: checked
        here; a check costs a pass over a zero chunk)."""
        with self._coded():
            if zero if zero is not None else chunk == zeros(len(chunk)):  # memcmp-fast for bytes
                if not self.zeroed:
                    zero_range(self.fd, offset, len(chunk), self.is_block)
                return
            pwrite_all(self.fd, memoryview(chunk), offset)
        self._behind.wrote(len(chunk))

    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros (e.g. past the end of the image)."""
        if self.zeroed or length <= 0:
            return
        with self._coded():
            zero_range(self.fd, offset, length, self.is_block)

    def flush(self) -> None:
        with self._coded():
            os.fsync(self.fd)
        self._behind.done()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
