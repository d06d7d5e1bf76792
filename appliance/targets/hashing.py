"""SHA-256 of a byte stream computed in a thread of its own, beside the thread that reads and writes the
bytes (hashlib releases the GIL on buffers of more than 2 KiB, so the digest overlaps the I/O instead of
adding to it): on the 4 GiB benchmark disk the output's digest is the largest single cost of a RAW export.
"""

from __future__ import annotations

import hashlib
import queue
import threading

#: chunks waiting for the hashing thread, at most (the writer waits beyond that)
QUEUE_CHUNKS = 4


class ThreadedSha256:
    """``update(data)`` queues ``data`` (copied if it is not ``bytes``: the caller may reuse its buffer);
    :meth:`hexdigest` waits for the thread and returns the digest; :meth:`close` stops the thread (call it
    on every path: a writer that fails stops hashing)."""

    def __init__(self, name: str = "sha256") -> None:
        self._sha = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._sha.update(chunk)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._digest is not None or not self._thread.is_alive():
            raise ValueError("update of a finished digest")
        self._queue.put(data if isinstance(data, bytes) else bytes(data))

    def hexdigest(self) -> str:
        if self._digest is None:
            self.close()
            self._digest = self._sha.hexdigest()
        return self._digest

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
