"""Compressed inputs: detection by magic number and capped, sparse, streaming decompression.

An attacker controls the compressed bytes, so decompression must never be able to fill the disk or the memory:

* output is produced in bounded pieces (``max_length`` for gzip/xz/bzip2; small input slices for zstd, whose
  Python binding has no output bound but whose expansion per input byte is bounded by the format);
* the total output is checked against ``max_bytes`` BEFORE each 1 MiB block is written; crossing the cap
  rejects the input with ``SizeLimitExceeded.Decompressed`` (one code for both a genuine oversize disk and a
  decompression bomb: the two cannot be told apart and the user's remedy is the same) and the partial output
  is removed;
* decoder memory is capped (xz ``memlimit``, zstd window limit), so a crafted header cannot demand gigabytes;
* all-zero 1 MiB blocks are skipped with ``seek`` and the file is truncated to length at the end, so the
  mostly empty raw disks in archives stay sparse on disk;
* the output is a partial file (:mod:`appliance.partials`: a hidden name next to the final one, announced
  to the caller's ledger before it exists) renamed into place only when the whole stream is decompressed,
  so what a killed process was writing is swept when its task resumes, never left under the final name.

A truncated or corrupt stream, or trailing garbage, is ``CorruptImage``. Concatenated gzip members, xz
streams, bzip2 streams and zstd frames are decoded in sequence, as the command-line tools do.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from .. import partials
from ..errors import Cancelled, Finding, ImageRejected, UsageError
from ..scratch import is_no_space, no_space_error
from .formats import COMPRESSIONS, SIGNATURE_BYTES, compression_of

#: output granularity: cap checks, progress callbacks and hole detection happen per block
BLOCK_SIZE = 1 << 20
_INPUT_CHUNK = 1 << 20
# zstd can expand ~32768x per input byte (a 4-byte RLE block yields 128 KiB); 512-byte slices bound one
# decompress() call to ~16 MiB of output held in memory.
_ZSTD_INPUT_CHUNK = 512
_ZSTD_MAX_WINDOW = 1 << 27  # zstd's own default limit (128 MiB); "--long=31" archives are refused
_XZ_MEMLIMIT = 512 << 20  # xz -9e needs ~65 MiB; a header demanding more is hostile or exotic
_ZEROS = bytes(BLOCK_SIZE)

# bzip2: "BZh" + level digit + the 48-bit magic of the first block (pi) or of the end of stream (sqrt(pi)).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    OSError,  # gzip.BadGzipFile and bz2's "Invalid data stream" are OSErrors
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
)


def detect_compression(path: Path) -> str | None:
    """``gzip``, ``xz``, ``zstd`` or ``bzip2`` when the file starts with that magic number, else None."""
    with open(path, "rb") as f:
        return compression_of(f.read(SIGNATURE_BYTES))


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


def _pieces(kind: str, src: BinaryIO) -> Iterator[bytes]:
    if kind == "gzip":
        return _gzip(src)
    if kind == "xz":
        return _multistream(src, lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT))
    if kind == "bzip2":
        return _multistream(src, bz2.BZ2Decompressor)
    return _zstd(src)


def _blocks(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Regroup pieces into exact BLOCK_SIZE blocks (the last may be shorter) so holes stay block-aligned."""
    buf = bytearray()
    for piece in pieces:
        buf += piece
        while len(buf) >= BLOCK_SIZE:
            yield bytes(buf[:BLOCK_SIZE])
            del buf[:BLOCK_SIZE]
    if buf:
        yield bytes(buf)


def _bomb(kind: str, max_bytes: int) -> ImageRejected:
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


def _corrupt(kind: str, exc: BaseException) -> ImageRejected:
    return ImageRejected(
        [
            Finding.error(
                "CorruptImage",
                f"the {kind} stream is corrupt or truncated ({exc}); create the archive again and "
                "re-upload it",
            )
        ]
    )


def decompress(
    src: Path,
    dst: Path,
    kind: str,
    max_bytes: int,
    *,
    reserve: Callable[[int, bool], None] | None = None,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
    ledger: partials.Ledger | None = None,
) -> int:
    """Decompress ``src`` (``kind`` from :func:`detect_compression`) into the file ``dst``.

    Returns the decompressed size. Never writes more than ``max_bytes``: the stream is rejected with
    ``SizeLimitExceeded.Decompressed`` as soon as it would exceed that. The output is written to a partial
    of ``dst`` (mode 0600, whose name ``ledger`` learns before it exists) and renamed to ``dst`` when
    complete; ``dst`` must not exist (``FileExistsError``, nothing written). ``on_progress`` receives the
    number of bytes produced so far after each block (never more than ``max_bytes``). ``reserve(n, False)``
    is called before a block of data is written with the bytes written so far including it (zero blocks
    stay holes and are not counted); it raises ``InsufficientScratch`` when scratch cannot hold them (a
    :class:`appliance.scratch.Allowance`).

    Raises ImageRejected (``CorruptImage``) for a bad stream, Cancelled when ``cancel`` is set,
    InsufficientScratch when the scratch quota or the disk cannot hold the output. On every failure the
    partial is removed and nothing is at ``dst``.
    """
    if kind not in COMPRESSIONS:
        raise UsageError(f"unknown compression {kind!r}; use one of {', '.join(COMPRESSIONS)}")
    dst = Path(dst)
    if os.path.lexists(dst):  # the caller's fresh name, in its private directory: it stays fresh
        raise FileExistsError(errno.EEXIST, "the decompressed output already exists", str(dst))
    total = written = 0
    try:
        with partials.partial_file(dst, ledger) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as out:
                blocks = _blocks(_pieces(kind, fin))
                while True:
                    try:
                        block = next(blocks, None)
                    except _DECODE_ERRORS as exc:
                        raise _corrupt(kind, exc) from exc
                    if block is None:
                        break
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"decompression of {src.name} cancelled")
                    if total + len(block) > max_bytes:
                        raise _bomb(kind, max_bytes)
                    if block == _ZEROS if len(block) == BLOCK_SIZE else block.count(0) == len(block):
                        out.seek(len(block), os.SEEK_CUR)
                    else:
                        written += len(block)
                        if reserve is not None:
                            reserve(written, False)
                        out.write(block)
                    total += len(block)
                    if on_progress is not None:
                        on_progress(total)
                out.truncate(total)  # materialises a trailing hole; also the only way the size covers it
            partials.publish(tmp, dst, 0o600)
        return total
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(dst.parent, f"decompressing {src.name} ({total} bytes out)") from exc
        raise
