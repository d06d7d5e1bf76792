"""A source's serial digest taken in a thread of its own, off the thread that writes the bytes.

A streamed import's writing thread does serial work on every byte: the format checks, the write, the
volume's chunked digest, progress. The sha256 of the source (:class:`~.digest.StreamDigest`) is serial
too — one hash over the whole stream, in order — and on the writing thread it added its ~0.6 CPU-s per
GiB (SHA-NI) to that thread's time, while the other CPU had room. :class:`HashingThread` takes it
over: the writer :meth:`~HashingThread.put`\\ s each piece (immutable ``bytes``: the writer goes on
with its buffer) into a bounded queue, and one thread hashes the pieces in the order they were put.
hashlib releases the GIL while it hashes a large buffer, so that thread runs beside the writer.

Order is what makes the digest right: a piece is hashed after every piece put before it, and
:meth:`~HashingThread.call` runs a function in the thread after exactly the pieces put before it (a
checkpoint takes the running state there: the state *of the bytes it claims*, however far the
thread lags). :meth:`~HashingThread.drain` waits until everything put is hashed; an error of the
thread is raised there (and by the next :meth:`~HashingThread.put`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

#: pieces waiting at most (the writer waits beyond that): 32 of the readers' 256 KiB pieces, 8 MiB
DEPTH = 32


class HashingThread:
    """``update(piece)`` of a digest (a :class:`~.digest.StreamDigest`, a hashlib object...) run in a
    thread of its own (module docstring). Use as a context manager, or :meth:`close` on every path."""

    def __init__(
        self, update: Callable[[bytes], Any], *, depth: int = DEPTH, name: str = "source-sha256"
    ) -> None:
        self._update = update
        self._queue: queue.Queue[tuple[bytes | None, Callable[[], Any] | None] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            piece, fn = item
            try:
                if self._error is None:
                    if piece is not None:
                        self._update(piece)
                    if fn is not None:
                        fn()
            except BaseException as exc:  # kept for the writer: raised by its next put or drain
                self._error = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, piece: bytes) -> None:
        """Hash ``piece`` after every piece put before it (``bytes``: the thread keeps a reference
        while it waits; a caller's reused buffer would change under it)."""
        if not isinstance(piece, bytes):
            raise TypeError("HashingThread.put takes bytes (a reused buffer would change while queued)")
        self._raise()
        if piece:
            self._queue.put((piece, None))

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` in the hashing thread once the pieces put before this call are hashed (and
        before any piece put after it)."""
        self._raise()
        self._queue.put((None, fn))

    def drain(self) -> None:
        """Wait until every piece put (and function called) is done; raise the thread's error."""
        if not self._closed:
            self._queue.join()
        self._raise()

    def close(self) -> None:
        """Stop the thread (what is still queued is done first)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def __enter__(self) -> HashingThread:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
