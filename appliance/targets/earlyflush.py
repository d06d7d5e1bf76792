"""A volume's flush started as soon as its disk is written, and awaited when the volume is handed over.

Between the write of an imported disk and the hand-over, a task validates the guest on the volume
(reading it through the page cache, which holds what the volume will hold), runs hooks and records
provenance. The flush (fsync) of what was written has no reason to wait for those: :func:`start` runs
it in a thread of the task process while they run; :func:`finish`, called by ``volume.finalize``
before its own flush, waits for it and raises its error as the coded storage error a flush at
hand-over would have raised. A flush error is kept for :func:`finish` rather than left to the
hand-over's own fsync because Linux reports a writeback error once per open file: the hand-over opens
the volume again and would not see it.

A task that fails before the hand-over calls :func:`discard` before it deletes the volume. A task
process that dies loses the thread with everything else; the task resumed elsewhere flushes at
hand-over as before (nothing pending in its process).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .base import storage_error

_lock = threading.Lock()
_pending: dict[str, _Flush] = {}


class _Flush(threading.Thread):
    """fsync of its own duplicate of a writer's descriptor (the writer may close its own meanwhile)."""

    def __init__(self, fd: int, path: str) -> None:
        super().__init__(name=f"volume-flush {Path(path).name}", daemon=True)
        # a duplicate shares the open file and so the writeback errors of the writes made through it
        self.fd = os.dup(fd)
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self.fd)


def _key(path: str | Path) -> str:
    return os.path.realpath(path)


def start(fd: int, path: str | Path) -> None:
    """Start flushing the volume at ``path`` written through ``fd``. A flush of it still pending is
    awaited first; one that failed stays, for :func:`finish` to raise."""
    key = _key(path)
    with _lock:
        previous = _pending.get(key)
    if previous is not None:
        previous.join()
        if previous.error is not None:
            return
    flush = _Flush(fd, key)
    flush.start()
    with _lock:
        _pending[key] = flush


def finish(path: str | Path, where: str) -> None:
    """Wait for the flush :func:`start` began for ``path``, if any; its error as the coded storage
    error (``InsufficientStorage``, ``TargetWriteFailed``) of ``where``. A failed flush stays pending,
    so that a hand-over tried again fails again (its own fsync would not see the error)."""
    key = _key(path)
    with _lock:
        flush = _pending.get(key)
    if flush is None:
        return
    flush.join()
    if flush.error is not None:
        raise storage_error(flush.error, where) from flush.error
    with _lock:
        if _pending.get(key) is flush:
            del _pending[key]


def discard(path: str | Path) -> None:
    """Forget the flush of ``path`` (the volume is about to be deleted), after it ended."""
    with _lock:
        flush = _pending.pop(_key(path), None)
    if flush is not None:
        flush.join()
