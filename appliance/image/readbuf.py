"""Reused read buffers for the export producers.

:class:`ReadPool`: a bounded pool of fixed-size buffers the RAW and VHD producers read the source into
(``preadv``) instead of allocating a fresh ``bytes`` for every read. A fresh multi-MiB buffer is faulted in
page by page on first touch, and on this kind of machine (a guest that hands freed pages back to its
hypervisor) that first touch is the dearest part of a read: tens of thousands of minor faults and their
system CPU per GiB exported.

The consumers of a read (the chunked digest's threads, the whole-object sha256, the source check) keep
what they are given and hash it later, in other threads. A pooled buffer is therefore refilled only when
nothing but the pool refers to it: its reference count is the pool's own, every memoryview of it having
been released (a view holds a reference to the buffer it views). Consumers that may keep a buffer without
copying it ask :func:`is_pooled`; everything else they get (a caller's own ``bytearray``) they copy, as
before. When every pooled buffer is still held, the read falls back to a fresh ``bytes``: never a wait,
never a buffer refilled under a reader.

The producers also drop what they read from the page cache (:func:`appliance.pagecache.drop_range`):
fresh page-cache pages cost the same first-touch faults as fresh buffers.
"""

from __future__ import annotations

import os
import sys


class PooledBuffer(bytearray):
    """A buffer of a :class:`ReadPool`: refilled only once nothing else refers to it, so a consumer may
    keep it (or a memoryview of it) instead of copying it."""


def is_pooled(data: object) -> bool:
    """Whether ``data`` is a pooled buffer or a view of one (kept safely without a copy)."""
    if isinstance(data, memoryview):
        data = data.obj
    return isinstance(data, PooledBuffer)


def _idle_count() -> int:
    """The reference count a buffer held only by a list shows through ``sys.getrefcount(items[i])`` (2 on
    CPython 3.11: the list's and the call's argument), measured the way :meth:`ReadPool._free` asks, so a
    version that counts the argument differently still finds its buffers free."""
    items = [PooledBuffer(0)]
    return sys.getrefcount(items[0])


_IDLE = _idle_count()


class ReadPool:
    """At most ``count`` reusable buffers of ``size`` bytes (see the module docstring). :meth:`read` reads
    ``n`` bytes at ``pos``: into a free pooled buffer when ``n`` is the pool's size, else (a short piece, or
    every buffer still held) into a fresh ``bytes``."""

    def __init__(self, size: int, count: int) -> None:
        self.size, self.count = size, count
        self._buffers: list[PooledBuffer] = []
        #: reads served by a pooled buffer and by a fresh ``bytes`` (for tests and measurements)
        self.reused = self.fresh = 0

    def _free(self) -> PooledBuffer | None:
        for i in range(len(self._buffers)):
            # only the pool's list (and the call's argument) refers to it: anything more is a consumer (a
            # queued memoryview, a hashing thread's local) that has not finished with it
            if sys.getrefcount(self._buffers[i]) == _IDLE:
                return self._buffers[i]
        if len(self._buffers) < self.count:
            self._buffers.append(PooledBuffer(self.size))
            return self._buffers[-1]
        return None

    def read(self, fd: int, n: int, pos: int) -> bytes | PooledBuffer:
        """``n`` bytes of ``fd`` at ``pos`` (fewer at its end: the caller checks the length)."""
        buf = self._free() if n == self.size else None
        if buf is None:
            self.fresh += 1
            return os.pread(fd, n, pos)
        got = os.preadv(fd, [buf], pos)
        if got != n:  # the source ended early: what was read, as the caller's length check expects
            return bytes(memoryview(buf)[:got])
        self.reused += 1
        return buf
