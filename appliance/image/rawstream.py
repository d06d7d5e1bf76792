"""Sequential decoders for RAW disks: plain, and gzip / xz / zstd / bzip2 compressed.

Plain RAW is a pass-through with zero detection (all-zero chunks become ``zero`` ranges, so the output
stays sparse); any input offset is a clean boundary. The compressed kinds reuse
:mod:`appliance.image.compressed`'s bounded decoders (output produced in pieces of at most 1 MiB; xz
``memlimit``, zstd window limit; concatenated members/streams/frames; truncation and trailing garbage are
``CorruptImage``) and its cap: crossing ``limits.max_decompressed_size`` is
``SizeLimitExceeded.Decompressed`` before the block is written. A compressed stream has no clean boundary
after its start (the decoder state is inside the C library).

gzip is decoded by ISA-L (``isal.igzip``: the gzip module's reader over ISA-L's inflate, bounded reads,
CRC and length checked, truncation an error), at less than half zlib's CPU time here. rapidgzip (a
parallel decoder) was measured too (bench/decoders.py): slower than ISA-L on two cores, and it returns
a truncated gzip stream's bytes without an error, which this decoder must refuse.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from isal import igzip

from ..errors import UsageError
from . import compressed as cz
from .decoding import (
    Boundary,
    DecodeLimits,
    Decoder,
    DecodeResult,
    Progress,
    Reader,
    Sink,
    corrupt,
    emit,
    offset_state,
    too_large,
)
from .formats import COMPRESSIONS

RAW = "raw"
_CHUNK = 4 << 20


class RawDecoder(Decoder):
    """RAW bytes, written where they are. ``input_size`` (the object's length) is the virtual size: the
    input must be exactly that long; without it the size is known at the end."""

    format = RAW

    def __init__(
        self, src: BinaryIO, limits: DecodeLimits, *, input_size: int | None = None, offset: int = 0
    ) -> None:
        super().__init__()
        self.limits = limits
        if input_size is not None:
            if input_size > limits.max_virtual_size:
                raise too_large(input_size, limits.max_virtual_size, "image size")
            self.virtual_size = input_size
        self._r = Reader(src, offset, "RAW image")

    @classmethod
    def resume(
        cls, src: BinaryIO, boundary: Boundary, limits: DecodeLimits, *, input_size: int | None = None
    ) -> RawDecoder:
        """Continue from ``boundary``; ``src`` yields the input from ``boundary.input_offset``."""
        data_bytes = offset_state(boundary, RAW, input_size)  # ValueError for a tampered one
        dec = cls(src, limits, input_size=input_size, offset=boundary.input_offset)
        dec.data_bytes = data_bytes
        return dec

    @classmethod
    def restore(
        cls, src: BinaryIO, state: dict[str, Any], limits: DecodeLimits, *, input_size: int | None = None
    ) -> RawDecoder:
        """Continue from a :meth:`checkpoint`, checked as untrusted (ValueError)."""
        return cls.resume(src, _boundary(state), limits, input_size=input_size)

    def boundary(self) -> Boundary:
        return Boundary(RAW, self._r.offset, {"data_bytes": self.data_bytes})

    def decode(
        self,
        sink: Sink,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> DecodeResult:
        r = self._r
        limit = self.virtual_size if self.virtual_size is not None else self.limits.max_virtual_size
        while True:
            self.check_cancel(cancel)
            at = r.offset
            chunk = r.read(min(_CHUNK, max(limit - at, 0) + 1))
            if not chunk:
                break
            if at + len(chunk) > limit:
                if self.virtual_size is not None:
                    raise corrupt("RAW image", limit, f"the input is longer than its size {limit}")
                raise too_large(at + len(chunk), limit, "RAW input")
            _emit(sink, at, chunk, self)
            if on_progress is not None:
                on_progress(Progress(r.offset, self.data_bytes))
        if self.virtual_size is not None and r.offset != self.virtual_size:
            raise corrupt("RAW image", r.offset, f"the input ends before its size {self.virtual_size}")
        self.virtual_size = r.offset
        return DecodeResult(RAW, r.offset, r.offset, self.data_bytes)


def _boundary(state: dict[str, Any]) -> Boundary:
    try:
        return Boundary.from_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a decoder checkpoint: {exc}") from exc


def _emit(sink: Sink, at: int, chunk: bytes, dec: Decoder) -> None:
    dec.data_bytes += emit(sink, at, chunk)


def _isal_gzip(src: BinaryIO) -> Iterator[bytes]:
    # as compressed._gzip, with ISA-L: read(n) bounds each piece, members are decoded in sequence
    reader = igzip.GzipFile(fileobj=src, mode="rb")
    while piece := reader.read(cz.BLOCK_SIZE):
        yield piece


class CompressedDecoder(Decoder):
    """A compressed RAW disk (``kind`` in gzip, xz, zstd, bzip2), capped at
    ``limits.max_decompressed_size``; the virtual size is the decompressed size, known at the end."""

    def __init__(self, src: BinaryIO, kind: str, limits: DecodeLimits) -> None:
        super().__init__()
        if kind not in COMPRESSIONS:
            raise UsageError(f"unknown compression {kind!r}; use one of {', '.join(COMPRESSIONS)}")
        self.format = kind
        self.limits = limits
        self._r = Reader(src, 0, f"{kind} stream")
        self._out = 0

    def boundary(self) -> Boundary | None:
        return Boundary(self.format, 0) if self._out == 0 else None

    def decode(
        self,
        sink: Sink,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> DecodeResult:
        kind, cap = self.format, self.limits.max_decompressed_size
        src: BinaryIO = self._r  # type: ignore[assignment]  # Reader has the read() the decoders use
        blocks = cz.blocks(_isal_gzip(src) if kind == "gzip" else cz.pieces(kind, src))
        while True:
            self.check_cancel(cancel)
            try:
                block = next(blocks, None)
            except cz.DECODE_ERRORS as exc:
                raise cz.corrupt(kind, exc) from exc
            if block is None:
                break
            if self._out + len(block) > cap:
                raise cz.bomb(kind, cap)
            _emit(sink, self._out, block, self)
            self._out += len(block)
            if on_progress is not None:
                on_progress(Progress(self._r.offset, self.data_bytes))
        self.virtual_size = self._out
        return DecodeResult(kind, self._out, self._r.offset, self.data_bytes)
