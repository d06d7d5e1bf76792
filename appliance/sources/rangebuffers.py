"""The buffers of a ranged read, used again once the consumer is done with them: a range of
``range_size`` bytes lands in a buffer of an earlier range instead of fresh pages to fault in. At
most ``parallel + 1`` are kept, as many as a read holds at once (:class:`~.reader.RangeReader`).
"""

from __future__ import annotations

import threading


class RangeBuffers:
    """Spare buffers of ``range_size`` bytes, shared by the threads of one read."""

    def __init__(self, range_size: int, parallel: int) -> None:
        self.range_size, self.parallel = range_size, parallel
        self._spare: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, length: int) -> bytearray:
        """A buffer of ``length`` bytes: a spare one when it is a whole range."""
        with self._lock:
            if length == self.range_size and self._spare:
                return self._spare.pop()
        return bytearray(length)

    def give(self, buf: bytearray) -> None:
        """``buf`` is done with: keep it for a later range (at most parallel + 1 are ever needed),
        unless a view of it is still alive (``readview``): the bytes its holder reads must not be
        overwritten by a later range, so that buffer is left to be freed with its last view."""
        if exported(buf):
            return
        with self._lock:
            if len(buf) == self.range_size and len(self._spare) <= self.parallel:
                self._spare.append(buf)


def exported(buf: bytearray) -> bool:
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
