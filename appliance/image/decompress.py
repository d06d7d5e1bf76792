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
  mostly empty raw disks in archives stay sparse on disk.

A truncated or corrupt stream, or trailing garbage, is ``CorruptImage``. Concatenated gzip members, xz
streams, bzip2 streams and zstd frames are decoded in sequence, as the command-line tools do.

The decoders are C libraries (zlib, liblzma, libbz2, libzstd) fed attacker-controlled bytes, so they never
run in the caller's process: :func:`decompress` starts this module as a child
(``python -I -c ... --kind KIND --max-bytes N``) under the confinement policy of :mod:`appliance.confine`
(``limits.decompress_*``: CPU seconds scaled to the output cap, address space; no network, a parent-death
signal, an empty private working directory). The child gets exactly three descriptors: the compressed
input on stdin and the output file on stdout, both opened by the parent (the output exclusively, never
through a symlink), and stderr, on which it reports one JSON object per line: ``{"done": N}`` after each
block, then ``{"total": N}`` or ``{"error": CODE, "message": ..., "done": N}``. A child stopped by a limit
becomes ``UnsafeImage.ResourceLimit``.
"""

from __future__ import annotations

import argparse
import bz2
import errno
import gzip
import json
import lzma
import os
import select
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from .. import config as config_mod
from .. import confine
from ..config import Limits
from ..errors import Cancelled, Finding, ImageRejected, ImagingError, InsufficientScratch, UsageError
from .formats import COMPRESSIONS

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
_BZIP2_BLOCK_MAGICS = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")

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
        head = f.read(10)
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0" and head[4:10] in _BZIP2_BLOCK_MAGICS:
        return "bzip2"
    return None


class _MaxLengthDecompressor(Protocol):
    eof: bool
    needs_input: bool
    unused_data: bytes

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


# The child imports appliance from the same tree as the parent, whether installed or not; -I keeps the


# environment and the working directory out of its import path.
_CHILD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from appliance.image.decompress import main; sys.exit(main())"
)
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
#: how much of the child's non-JSON stderr (a traceback) is kept for the error message
_STDERR_KEEP = 2000
#: signals that mean a limit stopped the child (RLIMIT_CPU sends SIGXCPU, then SIGKILL at the hard limit)
_LIMIT_SIGNALS = (signal.SIGXCPU, signal.SIGKILL)


class _Full(Exception):
    """The disk filled up after ``done`` bytes."""

    def __init__(self, done: int) -> None:
        super().__init__(done)
        self.done = done


def _stream(
    fin: BinaryIO, out: BinaryIO, kind: str, max_bytes: int, on_block: Callable[[int], None] | None = None
) -> int:
    """Decode ``fin`` into ``out`` (a regular file at offset 0) block by block; returns the size.

    Raises ImageRejected (``CorruptImage``, ``SizeLimitExceeded.Decompressed``) or :class:`_Full`.
    """
    total = 0
    try:
        blocks = _blocks(_pieces(kind, fin))
        while True:
            try:
                block = next(blocks, None)
            except _DECODE_ERRORS as exc:
                raise _corrupt(kind, exc) from exc
            if block is None:
                break
            if total + len(block) > max_bytes:
                raise _bomb(kind, max_bytes)
            if block == _ZEROS if len(block) == BLOCK_SIZE else block.count(0) == len(block):
                out.seek(len(block), os.SEEK_CUR)
            else:
                out.write(block)
            total += len(block)
            if on_block is not None:
                on_block(total)
        out.truncate(total)  # materialises a trailing hole; also the only way the size covers it
        out.flush()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _Full(total) from exc
        raise
    return total


def main(argv: list[str] | None = None) -> int:
    """The confined child: decode stdin into stdout (a regular file), report on stderr (module docstring)."""
    parser = argparse.ArgumentParser(prog="appliance.image.decompress")
    parser.add_argument("--kind", required=True, choices=COMPRESSIONS)
    parser.add_argument("--max-bytes", type=int, required=True)
    args = parser.parse_args(argv)
    status = sys.stderr

    def report(obj: dict[str, Any]) -> None:
        status.write(json.dumps(obj) + "\n")
        status.flush()

    done = 0

    def block(n: int) -> None:
        nonlocal done
        done = n
        report({"done": n})

    fin = os.fdopen(0, "rb", closefd=False)
    out = os.fdopen(1, "wb", closefd=False)
    try:
        total = _stream(fin, out, args.kind, args.max_bytes, block)
    except ImageRejected as exc:
        report({"error": exc.code, "message": exc.message, "done": done})
    except _Full as exc:
        report({"error": InsufficientScratch.code, "message": "no space left", "done": exc.done})
    except MemoryError:
        report(
            {
                "error": "UnsafeImage.ResourceLimit",
                "message": f"the {args.kind} decoder needed more memory than allowed",
                "done": done,
            }
        )
    else:
        report({"total": total})
    return 0


def _rejected(code: str, message: str) -> ImageRejected:
    return ImageRejected([Finding.error(code, message)])


def _child_failure(kind: str, proc_status: int, tail: str, policy: confine.Policy) -> ImagingError:
    """The error for a child that ended without a result line."""
    if proc_status < 0 and -proc_status in _LIMIT_SIGNALS:
        return _rejected(
            "UnsafeImage.ResourceLimit",
            f"the {kind} decoder was killed by {confine.signal_name(-proc_status)} ({policy.describe()}); an "
            "archive that needs this much is crafted to exhaust the host; for a genuine large image raise "
            "limits.decompress_* in the configuration",
        )
    hit = confine.limit_hit(proc_status, tail)
    if hit is not None and proc_status >= 0:
        return _rejected("UnsafeImage.ResourceLimit", f"the {kind} decoder {hit} ({policy.describe()})")
    if proc_status < 0:
        return _rejected(
            "CorruptImage",
            f"the {kind} decoder crashed ({confine.signal_name(-proc_status)}) on this input; create the "
            "archive again and re-upload it",
        )
    last = [ln for ln in tail.splitlines() if ln.strip()]
    detail = last[-1][:300] if last else f"exit status {proc_status}"
    return ImagingError(f"the {kind} decompressor failed: {detail}", code="InternalError")


def decompress(
    src: Path,
    dst: Path,
    kind: str,
    max_bytes: int,
    *,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
    limits: Limits | None = None,
) -> int:
    """Decompress ``src`` (``kind`` from :func:`detect_compression`) into the new file ``dst``.

    Returns the decompressed size. Never writes more than ``max_bytes``: the stream is rejected with
    ``SizeLimitExceeded.Decompressed`` as soon as it would exceed that. ``dst`` must not exist (it is created
    exclusively, never followed if a symlink). ``on_progress`` receives the number of bytes produced so far
    after each block (never more than ``max_bytes``), in the caller's thread. The decoding runs in a confined
    child under ``limits`` (default: the embedded defaults). Raises ImageRejected (``CorruptImage``,
    ``UnsafeImage.ResourceLimit``) for a bad stream or one that exceeds the limits, Cancelled when ``cancel``
    is set, InsufficientScratch when the disk fills up; ``dst`` is removed on every failure.
    """
    if kind not in COMPRESSIONS:
        raise UsageError(f"unknown compression {kind!r}; use one of {', '.join(COMPRESSIONS)}")
    policy = confine.decompressor(limits or config_mod.from_dict({}).limits, max_bytes)
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except BaseException:
        os.close(fin)
        raise
    try:
        with confine.private_dir(prefix="decompress.") as cwd:
            try:
                argv = [sys.executable, "-I", "-c", _CHILD, _PACKAGE_PARENT, "--kind", kind]
                proc = confine.spawn(
                    [*argv, "--max-bytes", str(max_bytes)], policy, cwd=cwd, stdin=fin, stdout=fout
                )
            finally:
                os.close(fin)
                os.close(fout)
            result, tail = _follow(proc, kind, cancel, on_progress)
        if result is None:
            raise _child_failure(kind, proc.returncode, tail, policy)
        if "error" in result:
            code, message = str(result["error"]), str(result.get("message", ""))
            if code == InsufficientScratch.code:
                raise InsufficientScratch(
                    f"no space left in {dst.parent} after {result.get('done', 0)} decompressed bytes; free "
                    "space or raise the scratch quota"
                )
            if code.startswith(("CorruptImage", "SizeLimitExceeded", "UnsafeImage")):
                raise _rejected(code, message)
            raise ImagingError(message, code=code)
        return int(result["total"])
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def _follow(
    proc: subprocess.Popen[bytes],
    kind: str,
    cancel: threading.Event | None,
    on_progress: Callable[[int], None] | None,
) -> tuple[dict[str, Any] | None, str]:
    """Read the child's status lines until it exits: (its result or error object, other stderr text).

    Progress goes to ``on_progress``; a set ``cancel`` kills the child and raises Cancelled.
    """
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    pending = b""
    tail = ""
    result: dict[str, Any] | None = None
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"decompression of the {kind} input cancelled")
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    tail = (tail + line.decode("utf-8", "replace") + "\n")[-_STDERR_KEEP:]
                elif "done" in obj and len(obj) == 1:
                    if on_progress is not None:
                        on_progress(int(obj["done"]))
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"decompression of the {kind} input cancelled")
                else:
                    result = obj
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return result, tail
