"""A file-like object over blocks of bytes handed over in order: what a ranged read looks like to its
consumer (:class:`~.reader.RangeReader` is one).

A block is ``(offset, bytearray)``; the stream reads them strictly one after the other. It holds one
block at a time: when the consumer asks for a byte past the end of the current block, the block is
released (:meth:`BlockStream._block_done`, where the reader checkpoints) and the next one is taken.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

from .httpio import CHUNK_SIZE

#: a block handed to the consumer: its start offset in the object and its bytes
Block = tuple[int, bytearray]


class BlockStream(io.RawIOBase):
    """``read(n)``, ``readinto(b)``, ``readview(n)``, ``iter_chunks()`` and ``tell()`` over the
    blocks."""

    def __init__(self, offset: int = 0) -> None:
        super().__init__()
        self._blocks: Iterator[Block] = iter(())
        self._block: Block | None = None
        self._at = 0  # read position in the current block
        self._offset = offset  # the offset of the next byte the consumer gets

    # -- hooks ------------------------------------------------------------------------------------

    def open(self) -> BlockStream:
        """Make :attr:`_blocks` ready (the reader sends its first GET here)."""
        return self

    def _block_done(self, start: int, buf: bytearray) -> None:
        """The consumer has read all of ``buf`` (bytes from ``start``): called before it is dropped."""

    def _at_end(self) -> None:
        """No block is left: raise when that is too early."""

    def _released(self, buf: bytearray) -> None:
        """``buf`` is dropped unread (the stream is closed)."""

    # -- reading ----------------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._offset

    def readinto(self, b: Any) -> int:
        """Copy the next bytes into ``b``; 0 at the end of the object."""
        want = memoryview(b).cast("B")
        piece = self._take(len(want))
        want[: len(piece)] = piece
        return len(piece)

    def read(self, size: int | None = -1) -> bytes:
        """At most ``size`` bytes (the whole rest when negative); b"" at the end of the object."""
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(CHUNK_SIZE * 32), b""))
        return bytes(self._take(size))

    def readview(self, size: int) -> memoryview:
        """A read-only view of up to ``size`` next bytes, not copied (empty at the end of the object).

        Its bytes stay as they are for as long as the view is alive: a block's buffer is used again
        only once no view of it is left (:meth:`_released`). Release the view (``with view:``) or
        drop it when done with it: one that is kept keeps its block's memory."""
        return self._take(size).toreadonly()

    def iter_chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The rest of the object in chunks of at most ``chunk_size`` bytes (like a response body)."""
        while chunk := self.read(chunk_size):
            yield chunk

    def _take(self, size: int) -> memoryview:
        """A view of up to ``size`` next bytes (empty at the end), valid until the next call."""
        self.open()
        if size <= 0:
            return memoryview(b"")
        while True:
            block = self._current()
            if block is None:
                return memoryview(b"")
            buf = block[1]
            n = min(size, len(buf) - self._at)
            if n > 0:
                view = memoryview(buf)[self._at : self._at + n]
                self._at += n
                self._offset += n
                return view

    def _current(self) -> Block | None:
        """The block holding the next byte: the current one, or the next when it was read to its end."""
        if self._block is not None and self._at < len(self._block[1]):
            return self._block
        if self._block is not None:
            start, buf = self._block
            self._block = None
            self._block_done(start, buf)
        if self.closed:
            raise ValueError("read of a closed stream")
        block = next(self._blocks, None)
        self._block, self._at = block, 0
        if block is None:
            self._at_end()
        return block

    def close(self) -> None:
        if self.closed:
            return
        with contextlib.suppress(Exception):
            close = getattr(self._blocks, "close", None)
            if close is not None:
                close()
        if self._block is not None:
            self._released(self._block[1])
            self._block = None
        super().close()
