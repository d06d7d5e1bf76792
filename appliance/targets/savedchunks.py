"""The ``sha256-chunked`` of a byte stream (:mod:`.chunkdigest`'s definition) whose running state can be
saved in a checkpoint and loaded again: the chunked digest of a resumable upload.

The state is of constant size whatever the stream's length: the outer hash runs over the chunk digests as
each chunk ends (``sha256(d_1 ‖ d_2 ‖ …)`` is itself a stream), so the digests of finished chunks need not
be kept; the inner hash covers the chunk being filled. Both are :class:`~appliance.sources.savedhash.
SavedHash` states. A chunk that has received only zeros so far is not hashed (a hole of a RAW disk): its
zeros are counted and fed to the inner hash only if data follows in the same chunk, and a chunk of zeros
only takes the cached digest of a zero chunk.

The hashing is serial, in the caller's thread (the writer's, as it cuts parts): a state is the state at
one offset of the stream.
"""

from __future__ import annotations

from typing import Any

from ..image.decoding import zeros
from ..sources.savedhash import SavedHash
from .chunkdigest import DEFAULT_CHUNK, ChunkedDigest, check_chunk_size, is_zero, zero_chunk_digest

#: zeros fed to the inner hash at a time (a chunk whose data follows zeros)
_ZERO_STEP = 4 << 20


class SavedChunkedSha256:
    """A ``sha256-chunked`` of bytes appended in order (:meth:`update`), its state saved by :meth:`state`
    and put back by :meth:`load` (module docstring)."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        self._outer = SavedHash("sha256")
        self._inner = SavedHash("sha256")
        self.size = 0
        self.chunks = 0  # chunks finished
        self._filled = 0  # bytes of the chunk being filled
        self._zeros = 0  # of them, zeros not yet fed to the inner hash
        self._started = False  # whether the inner hash has been fed (data came in this chunk)
        self.hashed_bytes = 0
        self.zero_chunks = 0

    def update(self, data: bytes) -> None:
        """Append ``data``."""
        at = 0
        while at < len(data):
            n = min(len(data) - at, self.chunk_size - self._filled)
            piece = data if n == len(data) else data[at : at + n]
            if not self._started and is_zero(piece):
                self._zeros += n
            else:
                self._feed_zeros()
                self._inner.update(piece)
                self.hashed_bytes += n
                self._started = True
            self._filled += n
            self.size += n
            at += n
            if self._filled == self.chunk_size:
                self._end_chunk()

    def _feed_zeros(self) -> None:
        step = zeros(min(_ZERO_STEP, self._zeros)) if self._zeros else b""
        while self._zeros:
            n = min(self._zeros, len(step))
            self._inner.update(step if n == len(step) else step[:n])
            self.hashed_bytes += n
            self._zeros -= n

    def _end_chunk(self) -> None:
        if self._started:
            self._feed_zeros()
            digest = bytes.fromhex(self._inner.hexdigest())
            self._inner = SavedHash("sha256")
        else:
            digest = zero_chunk_digest(self._filled)
            self.zero_chunks += 1
        self._outer.update(digest)
        self.chunks += 1
        self._filled = self._zeros = 0
        self._started = False

    def result(self) -> ChunkedDigest:
        """The digest of everything appended (the last chunk may be short; an empty stream is one chunk,
        as :class:`~.chunkdigest.ChunkedSha256` has it). The running state is kept."""
        outer = SavedHash("sha256")
        outer.load(self._outer.state(), 32 * self.chunks)
        chunks = self.chunks
        if self._filled or chunks == 0:
            if self._started:
                inner = SavedHash("sha256")
                inner.load(self._inner.state(), self._filled - self._zeros)
                step = zeros(min(_ZERO_STEP, self._zeros)) if self._zeros else b""
                left = self._zeros
                while left:
                    n = min(left, len(step))
                    inner.update(step if n == len(step) else step[:n])
                    left -= n
                outer.update(bytes.fromhex(inner.hexdigest()))
            else:
                outer.update(zero_chunk_digest(self._filled))
            chunks += 1
        return ChunkedDigest(
            bytes.fromhex(outer.hexdigest()),
            self.chunk_size,
            chunks,
            self.size,
            self.hashed_bytes,
            self.zero_chunks,
        )

    def state(self) -> dict[str, Any]:
        """The running state (JSON-able, of constant size)."""
        return {
            "chunk_size": self.chunk_size,
            "outer": self._outer.state(),
            "inner": self._inner.state() if self._started else None,
            "zeros": self._zeros,
        }

    @classmethod
    def load(cls, state: Any, size: int) -> SavedChunkedSha256:
        """The digest whose :meth:`state` was ``state`` after exactly ``size`` bytes. ValueError (or
        KeyError, TypeError) for a state that is not one at that size."""
        if not isinstance(state, dict):
            raise ValueError("a chunked digest state is not an object")
        chunk_size, zeros_, inner = state["chunk_size"], state["zeros"], state["inner"]
        if type(chunk_size) is not int or type(zeros_) is not int or type(size) is not int or size < 0:
            raise ValueError("a chunked digest state without its chunk size and zero count")
        made = cls(chunk_size)
        made.chunks, made._filled = divmod(size, chunk_size)
        if not 0 <= zeros_ <= made._filled or (inner is None and zeros_ != made._filled):
            raise ValueError("a chunked digest state whose zero count does not fit its offset")
        made._outer.load(str(state["outer"]), 32 * made.chunks)
        if inner is not None:
            made._inner.load(str(inner), made._filled - zeros_)
            made._started = True
        made._zeros, made.size = zeros_, size
        return made
