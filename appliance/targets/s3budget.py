"""The part size and memory bound of a streamed multipart upload (:class:`.s3stream.MultipartWriter`).

Memory: about ``(threads + 1) x part_size``, or at most ``memory`` bytes of part buffers when the
caller gives that budget (the part being filled and the parts in flight: fewer parts go up at once,
never fewer than one; :attr:`PartBudget.peak_buffered` counts the most that were held). S3 allows
10,000 parts: a writer told the size grows its part size to fit (:func:`fitted_part_size`); one that
cannot know it (``grow``: a decompressed stream) doubles its part size every :data:`GROW_EVERY` parts
instead.
"""

from __future__ import annotations

import threading

from .s3parts import MAX_PARTS

#: parts between two doublings of the part size of a stream of unknown size (``grow``)
GROW_EVERY = 1000


def fitted_part_size(part_size: int, expected_size: int) -> int:
    """``part_size``, grown (in whole MiB) so that ``expected_size`` bytes fit in 10,000 parts."""
    return max(part_size, -(-expected_size // MAX_PARTS // (1 << 20)) * (1 << 20))


class PartBudget:
    """The part size, the parts in flight and the bytes of part buffers held by one upload."""

    def __init__(self, part_size: int, threads: int, memory: int | None, *, grow: bool) -> None:
        self.part_size, self.threads, self.grow = part_size, max(1, threads), grow
        #: parts in flight at most: ``threads``, fewer once grown parts would hold more memory than
        #: ``threads`` parts of the first size (a long stream of unknown size)
        self.in_flight = self.threads
        self._budget = self.threads * part_size
        #: the most bytes of part buffers held at once, when given: the part being filled and the
        #: parts in flight (one part in flight at least, so at least two parts' worth)
        self.memory = memory
        if memory is not None:
            self.in_flight = max(1, min(self.threads, memory // part_size - 1))
            self._budget = self.in_flight * part_size
        #: bytes of part buffers held now (the part being filled, the parts not yet uploaded) and at most
        self.buffered = 0
        self.peak_buffered = 0
        self._lock = threading.Lock()

    def count(self, delta: int) -> None:
        """Part buffers held change by ``delta`` bytes (in any thread)."""
        with self._lock:
            self.buffered += delta
            self.peak_buffered = max(self.peak_buffered, self.buffered)

    def cut(self, number: int) -> int:
        """Part ``number`` was cut: the size of the next part. Doubled every :data:`GROW_EVERY` parts
        (``grow``): 10,000 parts starting at 5 MiB then cover about 5 TiB, and memory grows only for a
        stream that long. Fewer grown parts are in flight, so the uploads hold about as much as
        ``threads`` parts of the first size (plus the part being filled)."""
        if self.grow and number % GROW_EVERY == 0:
            self.part_size *= 2
            if self.memory is not None:
                self.in_flight = max(1, min(self.threads, self.memory // self.part_size - 1))
            else:
                self.in_flight = max(1, min(self.threads, self._budget // self.part_size))
        return self.part_size
