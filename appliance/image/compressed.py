"""The gzip, xz, bzip2 and zstd decoders, bounded, and the confined child of
:func:`appliance.image.decompress.decompress` that runs them on attacker-controlled bytes.

The decoders (:func:`pieces`, regrouped by :func:`blocks`) are also what the sequential RAW decoder
(:mod:`appliance.image.rawstream`) runs in the streaming decoder's child. The child (:func:`main`) reads the
compressed input on stdin and writes the decoded bytes on stdout in blocks of :data:`BLOCK_SIZE`, stopping
past ``--max-bytes`` (a decompression bomb: ``SizeLimitExceeded.Decompressed``), and reports its end on
stderr as one JSON object (``{"total": N}`` or ``{"error": CODE, "message": ...}``). Decoder memory is
capped (xz ``memlimit``, zstd window limit); output is produced in bounded pieces (``max_length`` for
gzip/xz/bzip2; small input slices for zstd, whose Python binding has no output bound but whose expansion per
input byte is bounded by the format). Concatenated gzip members, xz streams, bzip2 streams and zstd frames
are decoded in sequence, as the command-line tools do; a truncated or corrupt stream, or trailing garbage,
is ``CorruptImage``.

It imports nothing of the appliance but its errors and format names, so a process that parses hostile bytes
starts small (about 40 ms of imports against 225 ms for :mod:`appliance.image.decompress`) and holds no
configuration, store or writable file.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol

import zstandard

from ..errors import Finding, ImageRejected
from .formats import COMPRESSIONS

#: output granularity: cap checks, progress callbacks and hole detection happen per block
BLOCK_SIZE = 1 << 20
_INPUT_CHUNK = 1 << 20
# zstd can expand ~32768x per input byte (a 4-byte RLE block yields 128 KiB); 512-byte slices bound one
# decompress() call to ~16 MiB of output held in memory.
_ZSTD_INPUT_CHUNK = 512
_ZSTD_MAX_WINDOW = 1 << 27  # zstd's own default limit (128 MiB); "--long=31" archives are refused
_XZ_MEMLIMIT = 512 << 20  # xz -9e needs ~65 MiB; a header demanding more is hostile or exotic
# bzip2: "BZh" + level digit + the 48-bit magic of the first block (pi) or of the end of stream (sqrt(pi)).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    OSError,  # gzip.BadGzipFile and bz2's "Invalid data stream" are OSErrors
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
)


class _MaxLengthDecompressor(Protocol):
    # read-only, as lzma's and bz2's decompressors have them
    @property
    def eof(self) -> bool: ...
    @property
    def needs_input(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


def _multistream(src: BinaryIO, factory: Callable[[], _MaxLengthDecompressor]) -> Iterator[bytes]:
    """Pieces of at most BLOCK_SIZE bytes from concatenated xz/bzip2 streams (``max_length`` bound)."""
    dec = factory()
    started = False
    while True:
        if dec.eof:
            data = dec.unused_data or src.read(_INPUT_CHUNK)
            if not data:
                return
            dec, started = factory(), False
        elif dec.needs_input:
            data = src.read(_INPUT_CHUNK)
            if not data:
                if started:
                    raise EOFError("the compressed stream ends before its end-of-stream marker (truncated)")
                return
        else:
            data = b""  # drain output buffered inside the decoder
        started = started or bool(data)
        out = dec.decompress(data, BLOCK_SIZE)
        if out:
            yield out


def _gzip(src: BinaryIO) -> Iterator[bytes]:
    # GzipFile.read(n) decodes with max_length internally and handles multiple members.
    reader = gzip.GzipFile(fileobj=src, mode="rb")
    while piece := reader.read(BLOCK_SIZE):
        yield piece


def _zstd(src: BinaryIO) -> Iterator[bytes]:
    # stream_reader() bounds output but silently stops at a truncated frame; decompressobj() reports eof, so
    # feed it small slices (see _ZSTD_INPUT_CHUNK) and check that the last frame was complete.
    dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    dec = dctx.decompressobj()
    fed = False
    pending = b""
    while True:
        data = pending or src.read(_ZSTD_INPUT_CHUNK)
        pending = b""
        if not data:
            if fed and not dec.eof:
                raise EOFError("the zstd stream ends in the middle of a frame (truncated)")
            return
        if dec.eof:  # a further frame follows
            dec, fed = dctx.decompressobj(), False
        fed = True
        out = dec.decompress(data)
        if out:
            yield out
        if dec.eof:
            pending = dec.unused_data


def pieces(kind: str, src: BinaryIO) -> Iterator[bytes]:
    if kind == "gzip":
        return _gzip(src)
    if kind == "xz":
        return _multistream(src, lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT))
    if kind == "bzip2":
        return _multistream(src, bz2.BZ2Decompressor)
    return _zstd(src)


def blocks(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Regroup pieces into exact BLOCK_SIZE blocks (the last may be shorter) so holes stay block-aligned."""
    buf = bytearray()
    for piece in pieces:
        if not buf and len(piece) == BLOCK_SIZE:
            # already a block (the gzip reader's read(BLOCK_SIZE) gives whole ones across members):
            # regrouping would copy every byte of the disk three times for nothing
            yield piece
            continue
        buf += piece
        while len(buf) >= BLOCK_SIZE:
            with memoryview(buf) as view:
                block = bytes(view[:BLOCK_SIZE])
            del buf[:BLOCK_SIZE]
            yield block
    if buf:
        yield bytes(buf)


def bomb(kind: str, max_bytes: int) -> ImageRejected:
    return ImageRejected(
        [
            Finding.error(
                "SizeLimitExceeded.Decompressed",
                f"the {kind} data expands to more than {max_bytes} bytes, the decompression limit "
                "(limits.max_decompressed_size); decompression was stopped and nothing was kept. "
                "Upload the image uncompressed or in a sparse format such as qcow2, or raise the limit",
            )
        ]
    )


def corrupt(kind: str, exc: BaseException) -> ImageRejected:
    return ImageRejected(
        [
            Finding.error(
                "CorruptImage",
                f"the {kind} stream is corrupt or truncated ({exc}); create the archive again and "
                "re-upload it",
            )
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """The confined child: decode stdin onto stdout in blocks, report its end on stderr (module docstring)."""
    parser = argparse.ArgumentParser(prog="appliance.image.compressed")
    parser.add_argument("--kind", required=True, choices=COMPRESSIONS)
    parser.add_argument("--max-bytes", type=int, required=True)
    args = parser.parse_args(argv)

    def report(obj: dict[str, Any]) -> None:
        sys.stderr.write(json.dumps(obj) + "\n")
        sys.stderr.flush()

    fin = os.fdopen(0, "rb", closefd=False)
    total = 0
    try:
        decoded = blocks(pieces(args.kind, fin))
        while True:
            try:
                block = next(decoded, None)
            except DECODE_ERRORS as exc:
                raise corrupt(args.kind, exc) from exc
            if block is None:
                break
            if total + len(block) > args.max_bytes:
                raise bomb(args.kind, args.max_bytes)
            _write_all(1, block)
            total += len(block)
    except ImageRejected as exc:
        report({"error": exc.code, "message": exc.message})
    except BrokenPipeError:
        return 1  # the parent stopped reading (cancelled, or its disk is full)
    except MemoryError:
        report(
            {
                "error": "UnsafeImage.ResourceLimit",
                "message": f"the {args.kind} decoder needed more memory than allowed",
            }
        )
    else:
        report({"total": total})
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
