"""The threads a multipart upload sends its parts in (:class:`.s3stream.MultipartWriter`): a fixed pool of
*daemon* threads with the part of :class:`concurrent.futures.ThreadPoolExecutor`'s interface the writer
uses (``submit``, ``shutdown``), and the one wait for their futures that a cancel ends (:func:`wait_first`).

Why not the executor itself: its threads are joined when the interpreter exits, so one part whose
request S3 never answers (a stalled connection) would hold a task's process after its task was
cancelled or suspended, until botocore's read timeout and retries gave up, minutes later, while the
worker's shutdown grace is seconds. An aborted upload does not need its parts any more (S3 refuses a
part of an aborted upload when it lands), and a kept one's next run sends them again, so
:meth:`PartPool.shutdown` can leave a running part to its thread, and the process exits without it.
For the same reason whoever waits for a part waits with :func:`wait_first`, which looks at the task's
cancel every :data:`CANCEL_POLL` seconds.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Set
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, TypeVar

from ..errors import Cancelled

T = TypeVar("T")

#: seconds between two looks at the cancel while a part is waited for (S3 may never answer one)
CANCEL_POLL = 0.1


def wait_first(
    futures: Set[Future[T]], cancel: threading.Event | None, what: str, *, block: bool = True
) -> tuple[set[Future[T]], set[Future[T]]]:
    """``(done, not done)`` of ``futures`` once one at least is done (``block``; else as they are now,
    and nothing to wait for: two empty sets). :class:`Cancelled` ("``what`` cancelled") as soon as
    ``cancel`` is set while none is: a part S3 does not answer (a stalled connection) must not hold a
    cancel or a suspend."""
    if not futures:
        return set(), set()
    while True:
        done, pending = wait(futures, timeout=CANCEL_POLL if block else 0, return_when=FIRST_COMPLETED)
        if done or not block:
            return done, pending
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"{what} cancelled")


class PartPool:
    """At most ``max_workers`` daemon threads named ``thread_name_prefix-N`` running submitted calls."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self._max = max(1, max_workers)
        self._prefix = thread_name_prefix
        self._queue: _Queue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        # the threads end once the pool is shut down, or dropped without a shutdown (an upload
        # abandoned by its caller): they hold the queue, never the pool
        self._wake = weakref.finalize(self, _wake_all, self._queue, self._threads)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in a thread of the pool; its :class:`Future`."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("submit after shutdown")
            self._queue.put((future, fn, args))
            if len(self._threads) < self._max:
                thread = threading.Thread(
                    target=_work,
                    args=(self._queue,),
                    name=f"{self._prefix}-{len(self._threads)}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """No more calls; ``cancel_futures``: the calls not started are cancelled; ``wait``: return once
        the running ones have ended (else they end in their threads, which do not hold the process)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._wake()
        if wait:
            for thread in threads:
                thread.join()


_Queue = queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None]


def _work(calls: _Queue) -> None:
    """A thread of a pool: run the calls of ``calls`` until a None."""
    while (item := calls.get()) is not None:
        future, fn, args = item
        if not future.set_running_or_notify_cancel():
            continue
        try:
            result = fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        del item, future, fn, args  # (a part's bytes are not kept while the thread waits)


def _wake_all(calls: _Queue, threads: list[threading.Thread]) -> None:
    """One None per thread: each ends after the calls already queued."""
    for _ in threads:
        calls.put(None)
