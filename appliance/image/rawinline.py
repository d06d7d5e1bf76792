"""Plain RAW decoded in this process: the streamed import's pass-through with zero detection.

Every other sequential format is decoded by the confined child of :mod:`appliance.image.streamed`: its
headers, grain markers and compressed data are parsed there. Plain RAW has nothing to parse — its bytes
are the disk, written where they are, all-zero blocks left as holes (:func:`~.decoding.emit`) — so the
child only cost two pipe crossings of every byte (measured: a 1 GiB RAW ImportSnapshot spent about 4 s
in them, four times the download). :class:`InlineRawDecode` does here what the child's
:class:`~.rawstream.RawDecoder` does, with :class:`~.streamed.StreamDecode`'s interface: the same
bounds (the input at most ``max_virtual_size``, exactly ``input_size`` when given), the same errors
(``CorruptImage``, ``SizeLimitExceeded``), the same boundaries (``raw`` at an input offset, with
``data_bytes``; resumed from one checked as untrusted), written to the sink in the feeding thread.
What the bytes are was decided before the first one was fed (the claimed format against the detected
one, in the caller), as for the child.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import Cancelled, ImagingError
from .decoders import BAD_CHECKPOINT, BOUNDARY_EVERY
from .decoding import ZERO_BLOCK, Boundary, Sink, corrupt, emit, offset_state, too_large
from .rawstream import RAW
from .streamed import StreamResult

#: input handed to the sink at once (the child's RAW decoder reads 4 MiB pieces too)
_PIECE = 4 << 20


class InlineRawDecode:
    """One RAW decode into ``sink`` in this process (module docstring). Use as a context manager:
    :meth:`feed` the input in order, then :meth:`finish`."""

    #: the decoder named in boundaries (the child's decoder of that name resumes from them, and back)
    format = RAW
    #: what the errors call the input
    what = "RAW image"

    def __init__(
        self,
        sink: Sink,
        *,
        capacity: int,
        max_virtual_size: int,
        input_size: int | None = None,
        resume: Boundary | None = None,
        boundary_every: int = BOUNDARY_EVERY,
        on_virtual_size: Callable[[int | None], None] | None = None,
        on_boundary: Callable[[Boundary, int], None] | None = None,
        on_output: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.sink, self.cancel = sink, cancel
        self.on_boundary, self.on_output = on_boundary, on_output
        if input_size is not None and input_size > max_virtual_size:
            raise too_large(input_size, max_virtual_size, "image size")
        #: the most input taken: the disk cannot be larger than the target or the limit
        self._limit = min(capacity, max_virtual_size) if input_size is None else input_size
        self._max, self.input_size = max_virtual_size, input_size
        self.offset, self.data_bytes = 0, 0
        if resume is not None:
            try:
                self.data_bytes = offset_state(resume, self.format, input_size)
            except ValueError as exc:  # (the caller checked it already: as the child would refuse it)
                raise ImagingError(
                    f"the checkpoint to resume from is refused: {exc}", code=BAD_CHECKPOINT
                ) from exc
            self.offset = resume.input_offset
        #: bytes of the disk handed to the sink by this run (data and zero ranges)
        self.produced = 0
        self.virtual_size: int | None = input_size
        self._every = boundary_every
        self._next_boundary = self.offset
        self._tail = b""  # input after the last block boundary, not handed over yet
        if on_virtual_size is not None:
            on_virtual_size(input_size)

    def feed(self, data: bytes | memoryview) -> None:
        """Verified input bytes, in input order: written to the sink at their offset. Handed over in
        pieces that end on a :data:`~.decoding.ZERO_BLOCK` boundary of the disk (a shorter tail waits for
        the next bytes), so zero blocks are found where the child finds them, whatever the feed sizes."""
        if self._tail:
            data, self._tail = self._tail + bytes(data), b""
        view = memoryview(data)
        while view:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("decoding the raw image cancelled")
            n = min(len(view), _PIECE)
            if n == len(view):  # the last of these bytes: up to a block boundary, the rest waits
                n -= (self.offset + n) % ZERO_BLOCK
                if n == 0:
                    self._tail = bytes(view)
                    return
            piece = data if n == len(data) and isinstance(data, bytes) else bytes(view[:n])
            view = view[n:]
            self._take(piece)

    def _take(self, piece: bytes) -> None:
        at, n = self.offset, len(piece)
        if at + n > self._limit:
            if self.input_size is not None:
                raise corrupt(self.what, self._limit, f"the input is longer than its size {self._limit}")
            raise too_large(at + n, self._limit, "RAW input")
        self.data_bytes += emit(self.sink, at, piece)
        self.offset += n
        self.produced += n
        if self.on_output is not None:
            self.on_output(self.produced)
        if self.offset >= self._next_boundary:
            if self.on_boundary is not None:
                boundary = Boundary(self.format, self.offset, {"data_bytes": self.data_bytes})
                self.on_boundary(boundary, self.produced)
            self._next_boundary = self.offset + self._every

    def finish(self) -> StreamResult:
        """End of input: the disk is as long as the input (exactly ``input_size`` when given)."""
        if self._tail:
            tail, self._tail = self._tail, b""
            self._take(tail)
        if self.input_size is not None and self.offset != self.input_size:
            raise corrupt(self.what, self.offset, f"the input ends before its size {self.input_size}")
        self.virtual_size = self.offset
        return StreamResult(self.offset, self.offset, self.data_bytes)

    def close(self) -> None:
        """Nothing to stop: no child, no thread."""

    def __enter__(self) -> InlineRawDecode:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
