"""The chunked SHA-256 (:mod:`.chunkdigest`) of an output written at offsets rather than in order: a
streamed decoder's writes to a file or a volume, RAW parts at their offsets, the pieces an export reads from
its source. A write behind the writer's position marks its chunk, hashed again at the end from the written
output, so the digest is always that of what was written; :class:`HashedSink` puts such a digest behind a
decoder's sink."""

from __future__ import annotations

import bisect
import dataclasses
from array import array
from collections.abc import Callable
from typing import Any

from ..image.readbuf import is_pooled
from .chunkdigest import DEFAULT_CHUNK, ChunkedDigest, ChunkedSha256, combine, is_zero


class OffsetChunkedSha256:
    """The chunked digest of an output written at offsets, as a writer sees it: the streamed decoders'
    writes to a file or a volume (grains at their LBAs, ranges never written read as zeros), RAW parts
    at their offsets, the pieces an export reads from its source.

    The writes are taken in the order they come: one in front of the position (:attr:`position`, the
    end of the furthest write) is hashed at once, the gap before it hashed as zeros (a hole the writer
    left) without being read; :meth:`zero` (a range that must read as zeros) costs nothing there. A write
    *behind* the position (an out-of-order grain, a range zeroed after data was written there) would
    change a chunk already hashed: the chunk is marked and hashed again at the end from the written
    output (``reread(start, end)``, e.g. :func:`.chunkdigest.range_digest` of the target), so the result
    is always the digest of what was written. A writer that writes in ascending order (every decoder here
    on an ordinary image) re-reads nothing. Not thread-safe: one writer thread."""

    #: data ranges remembered exactly (to tell whether a later zero range undoes a write: 16 bytes each);
    #: beyond, neighbours are merged across their gaps (a superset: a zero range in such a gap marks its
    #: chunk, hashed again, never a wrong digest) until half of them are left
    MAX_SPANS = 1 << 20

    def __init__(
        self,
        chunk_size: int = DEFAULT_CHUNK,
        *,
        reread: Callable[[int, int], bytes] | None = None,
        threads: int = 0,
        name: str = "chunk-sha256",
    ) -> None:
        self._stream = ChunkedSha256(chunk_size, threads=threads, name=name)
        self.chunk_size = self._stream.chunk_size
        self._reread = reread
        #: the end of the furthest write: everything before it is hashed (gaps as zeros)
        self.position = 0
        self._dirty: set[int] = set()
        # data written, merged, ascending: starts and ends (arrays: a filesystem image has many runs)
        self._starts = array("q")
        self._ends = array("q")
        #: why the digest cannot be had from the writes (a resumed writer); None while it can
        self.gap: str | None = None

    def _mark(self, start: int, end: int) -> None:
        self._dirty.update(range(start // self.chunk_size, (end - 1) // self.chunk_size + 1))

    def _overlaps_data(self, start: int, end: int) -> bool:
        starts, ends = self._starts, self._ends
        for i in range(max(bisect.bisect_right(starts, start) - 1, 0), len(starts)):
            if starts[i] >= end:
                return False
            if ends[i] > start:
                return True
        return False

    def _coarsen(self) -> None:
        """Merge neighbouring data ranges across gaps below a doubling width until at most half of
        :attr:`MAX_SPANS` are left (what they cover only grows)."""
        gap = 4096
        while len(self._starts) > self.MAX_SPANS // 2:
            starts, ends = array("q"), array("q")
            for s, e in zip(self._starts, self._ends, strict=True):
                if ends and s - ends[-1] < gap:
                    ends[-1] = e
                else:
                    starts.append(s)
                    ends.append(e)
            self._starts, self._ends = starts, ends
            gap *= 2

    def _advance(self, offset: int, data: bytes | bytearray | memoryview, zero: bool | None) -> None:
        if offset > self.position:
            self._stream.zeros(offset - self.position)
        n = len(data)
        if zero if zero is not None else is_zero(data):
            self._stream.zeros(n)
        else:
            self._stream.update(data)
            if self._ends and self._ends[-1] == offset:
                self._ends[-1] = offset + n
            else:
                if len(self._starts) >= self.MAX_SPANS:
                    self._coarsen()
                self._starts.append(offset)
                self._ends.append(offset + n)
        self.position = offset + n

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, zero: bool | None = None) -> None:
        """``data`` was written at ``offset``. ``zero``: whether it is all zeros, when the caller found
        out already (None: checked here)."""
        n = len(data)
        if not n:
            return
        end = offset + n
        if offset < self.position:  # (rare: an out-of-order write)
            behind = min(end, self.position)
            if not is_zero(bytes(data[: behind - offset])) or self._overlaps_data(offset, behind):
                self._mark(offset, behind)
            if end <= self.position:
                return
            data, offset = bytes(data[behind - offset :]), behind
        # a pooled read buffer is not refilled while the digest's threads hold it: no copy
        self._advance(offset, data if isinstance(data, bytes) or is_pooled(data) else bytes(data), zero)

    def zero(self, offset: int, length: int) -> None:
        """``[offset, offset + length)`` was made to read as zeros (or left as zeros)."""
        end = min(offset + length, self.position)
        if length > 0 and offset < end and self._overlaps_data(offset, end):
            self._mark(offset, end)

    def unknown(self, reason: str) -> None:
        """The output holds bytes this digest did not see (``reason``): :meth:`result` is then None."""
        self.gap = self.gap or reason

    def result(self, size: int) -> ChunkedDigest | None:
        """The digest of the ``size``-byte output (None when :meth:`unknown` was called). Chunks marked
        by a write behind the position are hashed again with ``reread`` (or the digest is unknown)."""
        try:
            if self.gap is not None:
                return None
            if size < self.position:
                self.unknown(f"the output is {size} bytes but was written up to byte {self.position}")
                return None
            self._stream.zeros(size - self.position)
            digest = self._stream.result()
            if not self._dirty:
                return digest
            if self._reread is None:
                self.unknown("writes came out of order and the output cannot be read back")
                return None
            chunks = self._stream.chunk_digests()
            for index in sorted(self._dirty):
                start = index * self.chunk_size
                chunks[index] = self._reread(start, min(start + self.chunk_size, size))
            return dataclasses.replace(digest, value=combine(chunks), reread_chunks=len(self._dirty))
        finally:
            self.close()

    def close(self) -> None:
        self._stream.close()


class HashedSink:
    """A decoder's sink (``write(offset, data)``, ``zero(offset, length)``: a
    :class:`appliance.targets.rawio.RawWriter`) whose writes also go to an :class:`OffsetChunkedSha256`,
    after the sink took them."""

    def __init__(self, sink: Any, digest: OffsetChunkedSha256) -> None:
        self.sink, self.digest = sink, digest

    def write(self, offset: int, chunk: bytes) -> None:
        self.sink.write(offset, chunk)
        self.digest.write(offset, chunk)

    def zero(self, offset: int, length: int) -> None:
        self.sink.zero(offset, length)
        self.digest.zero(offset, length)
