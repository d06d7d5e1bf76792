"""Fetch a sequence of items with N threads, hand the results over strictly in order, bounded.

:func:`ordered_fetch` is the scheduler under the ranged reader (:mod:`.reader`: one item per byte
range) and the manifest part downloader (:mod:`.parts`: one item per part). Item *k* is started only
while *k* < (items handed over) + ``parallel``, so at most ``parallel`` results are being fetched or
wait, besides the one the caller holds: memory is bounded by ``parallel + 1`` items whatever the
speed of the consumer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from ..errors import Cancelled

T = TypeVar("T")
R = TypeVar("R")

#: how often a waiting thread looks at the cancel and stop events
POLL = 0.2


class LinkedEvent(threading.Event):
    """An event that also reads as set once ``parent`` is set. The streams of one read watch it (their
    sockets are shut down when it is set), so the task's cancel and the read's own end both stop them."""

    def __init__(self, parent: threading.Event | None) -> None:
        super().__init__()
        self._parent = parent

    def is_set(self) -> bool:
        return super().is_set() or (self._parent is not None and self._parent.is_set())

    def wait(self, timeout: float | None = None) -> bool:
        if self._parent is None:
            return super().wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            step = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if step <= 0:
                return False
            super().wait(step)
        return True


def ordered_fetch(
    items: Sequence[T],
    fetch: Callable[[T], R],
    *,
    parallel: int,
    cancel: threading.Event | None,
    stop: threading.Event,
    name: str,
    discard: Callable[[R], None] | None = None,
) -> Generator[tuple[T, R], None, None]:
    """``(item, fetch(item))`` in the order of ``items``, fetched by ``parallel`` daemon threads.

    A fetch that raises stops new items after it; its exception is raised in the caller's thread when
    the caller reaches that item (the results before it are handed over first). When the caller
    stops — exhausted, an exception, ``close()`` of the generator — ``stop`` is set (the fetches'
    streams watch it and shut their sockets down) and the threads are joined. Raises
    :class:`Cancelled` once ``cancel`` is set. Results fetched ahead and never handed over are
    passed to ``discard`` then (to release what they hold).
    """
    if parallel < 1:
        raise ValueError("parallel must be at least 1")
    count = len(items)
    cond = threading.Condition()
    results: dict[int, tuple[bool, Any]] = {}
    claimed, handed, failed_at = 0, 0, count
    finished = False

    def worker() -> None:
        nonlocal claimed, failed_at
        while True:
            with cond:
                while not finished and claimed < failed_at and claimed >= handed + parallel:
                    cond.wait(POLL)
                if finished or claimed >= failed_at:
                    return
                index = claimed
                claimed += 1
            try:
                outcome: tuple[bool, Any] = (True, fetch(items[index]))
            except BaseException as exc:  # raised in the caller's thread, in order
                outcome = (False, exc)
            with cond:
                results[index] = outcome
                if not outcome[0]:
                    failed_at = min(failed_at, index + 1)
                cond.notify_all()

    threads = [
        threading.Thread(target=worker, name=f"{name}-{i}", daemon=True) for i in range(min(parallel, count))
    ]
    for thread in threads:
        thread.start()
    try:
        for index in range(count):
            with cond:
                while index not in results:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("download cancelled")
                    cond.wait(POLL)
                ok, value = results.pop(index)
                handed = index + 1
                cond.notify_all()
            if not ok:
                raise value
            yield items[index], value
    finally:
        with cond:
            finished = True
            cond.notify_all()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for ok, value in results.values():
            if ok and discard is not None:
                discard(value)
        results.clear()
