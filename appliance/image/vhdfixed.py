"""A one-pass decoder of fixed VHD: the disk's bytes as they are, then a 512-byte footer.

Footer (big-endian; offsets in bytes within the last 512 bytes of the file; Microsoft "Virtual Hard Disk
Image Format Specification", as qemu's ``block/vpc.c`` and oslo's inspector read it)::

     0  8  cookie               b"conectix"
     8  4  features
    12  4  file format version  0x00010000
    16  8  data offset          0xffffffffffffffff for a fixed disk
    24  4  time stamp
    28  4  creator application
    32  4  creator version
    36  4  creator host OS
    40  8  original size
    48  8  current size         the virtual size: must equal the data before the footer
    56  4  disk geometry
    60  4  disk type            2 = fixed (3 dynamic, 4 differencing: not this decoder)
    64  4  checksum             one's complement of the byte sum of the footer with this field zero
    68 16  unique id
    84  1  saved state
    85 427 reserved

There is no header: the format shows only at the end. With the input's size known (``input_size``, e.g.
from Content-Length) the data length and so the virtual size are known before the first write; with the
footer given up front too (``footer``: a suffix-range read, see :func:`appliance.image.inspect.preflight`)
it is verified before any byte is written, and the footer at the end of the stream must be the same bytes.
Without the size the decoder holds the last 512 bytes back until the input ends. A bad footer is
``CorruptImage``; the caller drops the output (nothing of an unverified VHD is kept).
Any offset inside the data is a clean boundary.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from .decoding import (
    SECTOR,
    ZERO_BLOCK,
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

FORMAT = "vhd-fixed"
COOKIE = b"conectix"
FIXED = 2
VERSION = 0x00010000
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
_WHAT = "fixed VHD"
_CHUNK = 4 << 20


def footer_problem(footer: bytes, data_length: int) -> str | None:
    """Why ``footer`` is not the valid footer of a fixed VHD of ``data_length`` bytes (None: it is)."""
    if len(footer) != SECTOR or not footer.startswith(COOKIE):
        return "no footer cookie 'conectix' in the last 512 bytes"
    (version,) = struct.unpack_from(">I", footer, 12)
    (data_offset,) = struct.unpack_from(">Q", footer, 16)
    (current_size,) = struct.unpack_from(">Q", footer, 48)
    disk_type, checksum = struct.unpack_from(">II", footer, 60)
    expected = ~sum(footer[:64] + b"\0\0\0\0" + footer[68:]) & 0xFFFFFFFF
    if checksum != expected:
        return f"footer checksum {checksum:#010x}, computed {expected:#010x}"
    if version != VERSION:
        return f"file format version {version:#x}"
    if disk_type != FIXED or data_offset != NO_DATA_OFFSET:
        return f"disk type {disk_type} is not a fixed disk"
    if current_size != data_length:
        return f"the footer's size {current_size} differs from the {data_length} bytes of data"
    return None


class VhdFixedDecoder(Decoder):
    format = FORMAT

    def __init__(
        self,
        src: BinaryIO,
        limits: DecodeLimits,
        *,
        input_size: int | None = None,
        footer: bytes | None = None,
        offset: int = 0,
    ) -> None:
        super().__init__()
        self.limits = limits
        self._footer = footer
        if footer is not None and input_size is None:
            raise ValueError("a footer given up front needs the input size")
        if input_size is not None:
            if input_size < SECTOR:
                raise corrupt(_WHAT, 0, f"an input of {input_size} bytes has no room for a footer")
            size = input_size - SECTOR
            if size > limits.max_virtual_size:
                raise too_large(size, limits.max_virtual_size, "VHD size")
            if footer is not None:
                problem = footer_problem(footer, size)
                if problem is not None:
                    raise corrupt(_WHAT, size, problem)
            self.virtual_size = size
        self._r = Reader(src, offset, _WHAT)
        self._emitted = offset

    @classmethod
    def resume(
        cls,
        src: BinaryIO,
        boundary: Boundary,
        limits: DecodeLimits,
        *,
        input_size: int | None = None,
        footer: bytes | None = None,
    ) -> VhdFixedDecoder:
        # ValueError for a tampered one; never past the data: the footer is always read and checked
        end = input_size - SECTOR if input_size is not None else None
        data_bytes = offset_state(boundary, FORMAT, end)
        dec = cls(src, limits, input_size=input_size, footer=footer, offset=boundary.input_offset)
        dec.data_bytes = data_bytes
        return dec

    @classmethod
    def restore(
        cls,
        src: BinaryIO,
        state: dict[str, Any],
        limits: DecodeLimits,
        *,
        input_size: int | None = None,
        footer: bytes | None = None,
    ) -> VhdFixedDecoder:
        """Continue from a :meth:`checkpoint`, checked as untrusted (ValueError)."""
        try:
            boundary = Boundary.from_dict(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a decoder checkpoint: {exc}") from exc
        return cls.resume(src, boundary, limits, input_size=input_size, footer=footer)

    def boundary(self) -> Boundary:
        return Boundary(FORMAT, self._emitted, {"data_bytes": self.data_bytes})

    def _emit(self, sink: Sink, chunk: bytes) -> None:
        self.data_bytes += emit(sink, self._emitted, chunk)
        self._emitted += len(chunk)

    def decode(
        self,
        sink: Sink,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> DecodeResult:
        r = self._r
        held = b""
        size = self.virtual_size
        while True:
            self.check_cancel(cancel)
            want = _CHUNK if size is None else min(_CHUNK, size - r.offset)
            if want <= 0:
                break
            chunk = r.read(want)
            if not chunk:
                break
            if size is None:  # hold the last 512 bytes back, emit whole zero-detection blocks
                chunk = held + chunk
                cut = (len(chunk) - SECTOR) // ZERO_BLOCK * ZERO_BLOCK
                held, chunk = chunk[cut:], chunk[:cut]
            if chunk:
                self._emit(sink, chunk)
            if on_progress is not None:
                on_progress(Progress(r.offset, self.data_bytes))
        if size is not None:
            if r.offset < size:
                raise corrupt(_WHAT, r.offset, f"the input ends before its size {size + SECTOR}")
            held = r.read(SECTOR)
            if r.read(1):
                raise corrupt(_WHAT, r.offset - 1, "the input is longer than its size")
        if size is None and len(held) > SECTOR:
            self._emit(sink, held[:-SECTOR])
            held = held[-SECTOR:]
        data_length = self._emitted
        if len(held) != SECTOR:
            raise corrupt(_WHAT, r.offset, "the input ends before a complete footer")
        problem = footer_problem(held, data_length)
        if problem is None and self._footer is not None and held != self._footer:
            problem = "the footer differs from the one read before the download"
        if problem is not None:
            raise corrupt(_WHAT, data_length, problem)
        self.virtual_size = data_length
        return DecodeResult(FORMAT, data_length, r.offset, self.data_bytes)
