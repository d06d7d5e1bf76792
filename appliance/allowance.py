"""A scratch reservation that follows a writer which does not know its size in advance (a chunked
download without Content-Length, a decompressor): :class:`Allowance` grows the task's reservation
(:class:`appliance.scratch.TaskScratch`) as the bytes arrive, a step ahead of them, and shrinks it to
what the output holds when the work is done.
"""

from __future__ import annotations

from .errors import InsufficientScratch
from .scratch import TaskScratch

#: how far an :class:`Allowance` reserves ahead of the bytes it has been asked to cover
ALLOWANCE_STEP = 64 << 20


class Allowance:
    """A reservation that follows a writer: :meth:`cover` before writing, :meth:`shrink_to` when done.

    ``cover(n, exact=True)`` reserves exactly ``n`` (the writer knows its whole size). Without
    ``exact`` the reservation grows ``step`` bytes ahead of ``n``, so that a stream of small writes
    takes the lock rarely; when the headroom does not fit, exactly ``n`` is tried, so the writer fails
    with ``InsufficientScratch`` only when the quota or the disk cannot hold the bytes themselves.
    """

    def __init__(self, scratch: TaskScratch, purpose: str, step: int = ALLOWANCE_STEP) -> None:
        self.scratch = scratch
        self.step = step
        self.nbytes = 0
        self.id = scratch.reserve(0, purpose)

    def cover(self, nbytes: int, exact: bool = False) -> None:
        """Make the reservation hold at least ``nbytes``; ``InsufficientScratch`` when it cannot."""
        if nbytes <= self.nbytes:
            return
        if not exact:
            try:
                self._set(nbytes + self.step)
                return
            except InsufficientScratch:
                pass  # the headroom does not fit; the bytes themselves may
        self._set(nbytes)

    def shrink_to(self, nbytes: int) -> None:
        """Hold no more than ``nbytes`` (what the output turned out to occupy)."""
        if nbytes < self.nbytes:
            self._set(max(nbytes, 0))

    def release(self) -> None:
        self.scratch.release(self.id)
        self.nbytes = 0

    def _set(self, nbytes: int) -> None:
        self.scratch.resize(self.id, nbytes)
        self.nbytes = nbytes
