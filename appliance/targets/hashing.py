"""SHA-256 of a byte stream computed in a thread of its own, beside the thread that reads and writes the
bytes (hashlib releases the GIL on buffers of more than 2 KiB, so the digest overlaps the I/O instead of
adding to it): on the 4 GiB benchmark disk the output's digest is the largest single cost of a RAW export.
"""

from __future__ import annotations

import hashlib
import queue
import threading

from ..image.readbuf import is_pooled

#: private chunks waiting for the hashing thread, at most (the writer waits beyond that); shared chunks
#: (:meth:`ThreadedSha256.update` with ``shared=True``: an immutable buffer that lives anyway, such as
#: the cached zero chunk a sparse disk's holes read as) cost no memory and do not count, so the writer
#: runs ahead through holes while the thread hashes them
QUEUE_CHUNKS = 4
_ZERO = bytes(4 << 20)
_Piece = bytes | bytearray | memoryview


class ThreadedSha256:
    """``update(data)`` queues ``data`` (copied if it is not ``bytes``: the caller may reuse its buffer);
    :meth:`hexdigest` waits for the thread and returns the digest; :meth:`close` stops the thread (call it
    on every path: a writer that fails stops hashing)."""

    def __init__(self, name: str = "sha256") -> None:
        self._sha = hashlib.sha256()
        self._queue: queue.SimpleQueue[tuple[_Piece, bool] | None] = queue.SimpleQueue()
        self._room = threading.Semaphore(QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            chunk, private = item
            self._sha.update(chunk)
            if private:
                self._room.release()

    def update(self, data: bytes | bytearray | memoryview, *, shared: bool = False) -> None:
        """Queue ``data``; ``shared``: ``data`` is an immutable ``bytes`` that stays alive anyway (it is
        not counted against :data:`QUEUE_CHUNKS`)."""
        if self._digest is not None or not self._thread.is_alive():
            raise ValueError("update of a finished digest")
        if shared and isinstance(data, bytes):
            self._queue.put((data, False))
            return
        self._room.acquire()
        # a pooled read buffer is not refilled while the queue holds it; any other buffer may be reused
        self._queue.put((data if isinstance(data, bytes) or is_pooled(data) else bytes(data), True))

    def hexdigest(self) -> str:
        if self._digest is None:
            self.close()
            self._digest = self._sha.hexdigest()
        return self._digest

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class OffsetSha256:
    """The whole sha256 of a disk read at ascending offsets, the ranges not read (holes) as zeros: what
    an export's writer reads of its source, hashed on the way (:class:`ThreadedSha256`). A read behind
    the position cannot be taken in order: :attr:`gap` says so and :meth:`result` is then None."""

    def __init__(self, name: str = "source-sha256") -> None:
        self._sha = ThreadedSha256(name)
        self.position = 0
        self.gap: str | None = None

    def _zeros(self, n: int) -> None:
        while n:
            m = min(n, len(_ZERO))
            self._sha.update(_ZERO if m == len(_ZERO) else _ZERO[:m], shared=m == len(_ZERO))
            n -= m

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.gap is not None:
            return
        if offset < self.position:
            self.gap = f"a read at byte {offset}, behind byte {self.position}"
            return
        self._zeros(offset - self.position)
        self._sha.update(data)
        self.position = offset + len(data)

    def result(self, size: int) -> str | None:
        try:
            if self.gap is not None or size < self.position:
                return None
            self._zeros(size - self.position)
            return self._sha.hexdigest()
        finally:
            self.close()

    def close(self) -> None:
        self._sha.close()
