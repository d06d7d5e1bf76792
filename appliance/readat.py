"""A read-only, seekable file over a ``read_at(offset, length)`` of a known size.

The guest probe reads a disk through such a file whether its bytes come over a pipe from the task
process (:mod:`appliance.guest.piped`) or by ranged GETs of a stored object
(:mod:`appliance.targets.s3read`): the position, ``seek``, ``read`` and ``readinto`` are the same, only
where a range of bytes comes from differs.
"""

from __future__ import annotations

import io
from typing import Any


class ReadAtFile(io.RawIOBase):
    """Subclasses set ``size`` and implement :meth:`read_at`."""

    size: int

    def __init__(self) -> None:
        super().__init__()
        self._pos = 0

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end)."""
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        n = self.size - self._pos if size is None or size < 0 else size
        data = self.read_at(self._pos, max(0, n))
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)
