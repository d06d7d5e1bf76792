"""How bulk streams treat the page cache: a conversion reads a cold source around it, and whatever
writes GiBs once (qemu-img's output, a volume written as parts arrive, a download into scratch)
leaves the cache behind the writer; plus whether a file is cached already.

Why: such a stream's pages are read or written once. Kept in the page cache they evict what other
tasks work from, and on a virtual machine whose freed memory the hypervisor takes back (free page
reporting, ballooning: the Firecracker VMs of the project's CI, and common in clouds) every new
page-cache page is fresh memory the host must fault in first. There bare ``qemu-img convert`` of the
4 GiB benchmark disk (qcow2 → raw, 1.5 GiB of data, cache dropped, flush included) took 3.8-4.7 s
in one hour and 2.0-2.4 s in another; with the output dropped behind the writer 1.7-2.7 s, and with
the source also read with O_DIRECT 1.2-1.3 s (idle, interleaved; vhd and vhdx inputs alike;
bench/README.md).

* :class:`DropBehind` calls ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the output every
  :data:`INTERVAL` seconds while another process (qemu-img) writes it. Linux starts the writeback of
  the file's dirty pages and drops the pages already clean, so the output occupies a few intervals'
  worth of cache instead of its whole size, and the final flush has little left to write. It is
  advice: a dirty page is never dropped, so nothing written can be lost; the caller still flushes,
  then :func:`drop` lets go of the rest.
* :class:`WriteBehind` does the same for a writer in this process (a volume written as parts
  arrive, a download into scratch), every :data:`WRITE_BEHIND_EVERY` bytes.
* :func:`mostly_cached` samples whether a file's pages are in the cache (``mincore``), reading
  nothing: a source still cached (decoded into scratch a moment ago) is read from there; a cold one
  is read with O_DIRECT (qemu-img ``-T none``,
  :func:`appliance.image.convertcmd.use_direct_input`; the RAW and VHD exports' own reads by the same
  rule, :func:`appliance.image.readbuf.open_direct`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

#: seconds between two drop-behind calls. At the ~1 GB/s qemu-img writes here an interval holds
#: ~50 MB; every 0.25 s measured 2.8-3.1 s against 1.7-2.7 s every 0.05 s (qcow2 → raw, 4 GiB)
INTERVAL = 0.05
#: bytes a :class:`WriteBehind` writer writes between two calls (every 128 MiB measured alike)
WRITE_BEHIND_EVERY = 32 << 20
#: windows sampled by :func:`mostly_cached`, and the size of each
SAMPLES = 16
_WINDOW = 64 << 10
_PAGE = mmap.PAGESIZE
# mmap and mincore straight from libc: Python's mmap objects give no address for a read-only mapping
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


class DropBehind:
    """While in its ``with`` block, drop ``path``'s written pages from the page cache behind a writer
    in another process. ``path`` may not exist yet: it is opened as soon as the writer creates it.

    Errors of the advice itself are logged once and end the loop; they never fail the conversion
    (the advice only ever saves memory and time).
    """

    def __init__(self, path: Path, interval: float = INTERVAL) -> None:
        self.path = path
        self.interval = interval
        self.calls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DropBehind:
        self._thread = threading.Thread(target=self._run, name="drop-behind", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        fd: int | None = None
        try:
            while not self._stop.is_set():
                if fd is None:
                    with contextlib.suppress(FileNotFoundError):
                        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                if fd is not None:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    self.calls += 1
                self._stop.wait(self.interval)
        except OSError as exc:
            log.debug("drop-behind of %s stopped: %s", self.path, exc)
        finally:
            if fd is not None:
                os.close(fd)


class WriteBehind:
    """For a writer in this process: after every ``every`` bytes it wrote, one
    ``posix_fadvise(DONTNEED)`` over its file starts the writeback of what is dirty and drops what is
    clean, so the file holds a few ``every`` of cache instead of its size; :meth:`done` after the
    writer's flush drops the rest. Writing 1 GiB into a new file and fsyncing it measured 4.97 s wall
    and 1.84 s of system time without, 1.58 s and 0.32 s with a call every 32 MiB (interleaved, busy
    machine). Advice only: its errors are ignored, and a dirty page is never dropped.
    """

    def __init__(self, fd: int, every: int = WRITE_BEHIND_EVERY) -> None:
        self.fd = fd
        self.every = every
        self._pending = 0

    def wrote(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending >= self.every:
            self._pending = 0
            self._advise()

    def done(self) -> None:
        self._pending = 0
        self._advise()

    def _advise(self) -> None:
        drop_range(self.fd)


def drop_range(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to drop ``fd``'s cached pages of ``[offset, offset + length)`` (``length`` 0: to
    the end). Dirty pages are not dropped but their writeback starts, so a later call drops them.
    Advice only: errors are ignored."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def drop(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache now (after its flush: all of them). Advice
    only: errors are logged, never raised."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("no drop of %s: %s", path, exc)
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        log.debug("no drop of %s: %s", path, exc)
    finally:
        os.close(fd)


def mostly_cached(path: Path, samples: int = SAMPLES) -> bool:
    """Whether at least half of the pages in ``samples`` windows spread over ``path`` are in the page
    cache now, asked of the kernel with ``mincore`` on a mapping of each window: nothing is read, so
    asking twice gives the same answer. A file that cannot be opened or mapped (a block device, an
    empty file) counts as not cached: the caller then reads around the cache, correct either way.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return False
        resident = total = 0
        for i in range(samples):
            offset = (size * i // samples) // _PAGE * _PAGE
            length = min(_WINDOW, size - offset)
            got = _resident_pages(fd, offset, length)
            if got is None:
                return False
            resident += got
            total += -(-length // _PAGE)
        return resident * 2 >= total
    finally:
        os.close(fd)


def _resident_pages(fd: int, offset: int, length: int) -> int | None:
    """Pages of ``fd`` in ``[offset, offset + length)`` that are in the page cache (None: not known)."""
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr in (None, _MAP_FAILED):
        return None
    try:
        pages = -(-length // _PAGE)
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(addr), length, vec) != 0:
            return None
        return sum(b & 1 for b in vec)
    finally:
        _libc.munmap(ctypes.c_void_p(addr), length)
