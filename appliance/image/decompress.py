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

The decoders are C libraries (zlib, liblzma, libbz2, libzstd) fed attacker-controlled bytes, so they never
run in the caller's process: :func:`decompress` starts :mod:`appliance.image.compressed` as a child
(``python -I -c ... --kind KIND --max-bytes N``) under the confinement policy of :mod:`appliance.confine`
(``limits.decompress_*``: CPU seconds scaled to the output cap, address space; no network, a parent-death
signal, an empty private working directory). The child gets exactly three descriptors: the compressed
input on stdin (opened by the parent), a pipe on stdout that carries the decoded bytes, and a pipe on
stderr on which it reports its end as one JSON object: ``{"total": N}`` or ``{"error": CODE, "message":
...}``. The child holds no writable file: the parent writes the output (holes, the scratch reservation,
the partial file, the cap, which it checks again on what it receives). A child stopped by a limit becomes
``UnsafeImage.ResourceLimit``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import config as config_mod
from .. import confine, partials
from ..config import Limits
from ..errors import Cancelled, Finding, ImageRejected, ImagingError, UsageError
from ..nospace import is_no_space, no_space_error
from .compressed import BLOCK_SIZE, bomb
from .formats import COMPRESSIONS, SIGNATURE_BYTES, compression_of

_ZEROS = bytes(BLOCK_SIZE)


def detect_compression(path: Path) -> str | None:
    """``gzip``, ``xz``, ``zstd`` or ``bzip2`` when the file starts with that magic number, else None."""
    with open(path, "rb") as f:
        return compression_of(f.read(SIGNATURE_BYTES))


# The child imports appliance from the same tree as the parent, whether installed or not; -I keeps the
# environment and the working directory out of its import path.
_CHILD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from appliance.image.compressed import main; sys.exit(main())"
)
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
#: how much of the child's stderr is kept (its result line, or a traceback for the error message)
_STDERR_KEEP = 8192
#: signals that mean a limit stopped the child (RLIMIT_CPU sends SIGXCPU, then SIGKILL at the hard limit)
_LIMIT_SIGNALS = (signal.SIGXCPU, signal.SIGKILL)
_POLL_SECONDS = 0.1


def rejected(code: str, message: str) -> ImageRejected:
    return ImageRejected([Finding.error(code, message)])


def child_failure(kind: str, proc_status: int, tail: str, policy: confine.Policy) -> ImagingError:
    """The error for a child that ended without a result line."""
    if proc_status < 0 and -proc_status in _LIMIT_SIGNALS:
        return rejected(
            "UnsafeImage.ResourceLimit",
            f"the {kind} decoder was killed by {confine.signal_name(-proc_status)} ({policy.describe()}); an "
            "archive that needs this much is crafted to exhaust the host; for a genuine large image raise "
            "limits.decompress_* in the configuration",
        )
    hit = confine.limit_hit(proc_status, tail)
    if hit is not None and proc_status >= 0:
        return rejected("UnsafeImage.ResourceLimit", f"the {kind} decoder {hit} ({policy.describe()})")
    if proc_status < 0:
        return rejected(
            "CorruptImage",
            f"the {kind} decoder crashed ({confine.signal_name(-proc_status)}) on this input; create the "
            "archive again and re-upload it",
        )
    last = [ln for ln in tail.splitlines() if ln.strip()]
    detail = last[-1][:300] if last else f"exit status {proc_status}"
    return ImagingError(f"the {kind} decompressor failed: {detail}", code="InternalError")


class _Child:
    """The confined decoder seen from the parent: its output regrouped into exact blocks, its stderr kept
    on the side, ``cancel`` checked while waiting for either."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, cancel: threading.Event | None) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc, self.name, self.cancel = proc, name, cancel
        self.out, self.err = proc.stdout.fileno(), proc.stderr.fileno()
        self.stderr = b""
        with contextlib.suppress(OSError):  # above fs.pipe-max-size: the default buffer
            fcntl.fcntl(self.out, fcntl.F_SETPIPE_SZ, BLOCK_SIZE)  # one block per pipe buffer where allowed

    def _wait(self, fds: list[int]) -> list[int]:
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled(f"decompression of {self.name} cancelled")
            ready, _, _ = select.select(fds, [], [], _POLL_SECONDS)
            if ready:
                return ready

    def _read_err(self) -> bool:
        chunk = os.read(self.err, 65536)
        self.stderr = (self.stderr + chunk)[-_STDERR_KEEP:]
        return bool(chunk)

    def blocks(self) -> Iterator[bytes]:
        buf = bytearray()
        err_open = True
        while True:
            ready = self._wait([self.out, self.err] if err_open else [self.out])
            if self.err in ready:
                err_open = self._read_err()
            if self.out in ready:
                chunk = os.read(self.out, BLOCK_SIZE - len(buf))
                if not chunk:
                    break
                buf += chunk
                if len(buf) == BLOCK_SIZE:
                    yield bytes(buf)
                    buf.clear()
        if buf:
            yield bytes(buf)
        while err_open:
            self._wait([self.err])
            err_open = self._read_err()
        self.proc.wait()

    def result(self) -> dict[str, Any] | None:
        """The child's last JSON object line on stderr (None when there is none)."""
        for line in reversed(self.stderr.splitlines()):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


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
    limits: Limits | None = None,
    check_head: Callable[[bytes], None] | None = None,
) -> int:
    """Decompress ``src`` (``kind`` from :func:`detect_compression`) into the file ``dst``.

    Returns the decompressed size. Never writes more than ``max_bytes``: the stream is rejected with
    ``SizeLimitExceeded.Decompressed`` as soon as it would exceed that. The output is written to a partial
    of ``dst`` (mode 0600, whose name ``ledger`` learns before it exists) and renamed to ``dst`` when
    complete; ``dst`` must not exist (``FileExistsError``, nothing written). ``on_progress`` receives the
    number of bytes produced so far after each block (never more than ``max_bytes``). ``reserve(n, False)``
    is called before a block of data is written with the bytes written so far including it (zero blocks
    stay holes and are not counted); it raises ``InsufficientScratch`` when scratch cannot hold them (a
    :class:`appliance.allowance.Allowance`). The decoding runs in a confined child under ``limits``
    (default: the embedded defaults); this process writes what it decodes. ``check_head`` gets the first
    decoded block (:data:`BLOCK_SIZE` bytes, fewer for a shorter output) before anything is written: what
    it raises stops the decompression (the inspection refuses a compressed OVA there).

    Raises ImageRejected (``CorruptImage``, ``UnsafeImage.ResourceLimit``) for a bad stream or one that
    exceeds the limits, Cancelled when ``cancel`` is set, InsufficientScratch when the scratch quota or
    the disk cannot hold the output. On every failure the partial is removed and nothing is at ``dst``.
    """
    if kind not in COMPRESSIONS:
        raise UsageError(f"unknown compression {kind!r}; use one of {', '.join(COMPRESSIONS)}")
    dst = Path(dst)
    if os.path.lexists(dst):  # the caller's fresh name, in its private directory: it stays fresh
        raise FileExistsError(errno.EEXIST, "the decompressed output already exists", str(dst))
    policy = confine.decompressor(limits or config_mod.from_dict({}).limits, max_bytes)
    total = written = 0
    try:
        with partials.partial_file(dst, ledger) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "wb") as out, confine.private_dir(prefix="decompress.") as cwd:
                fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    argv = [sys.executable, "-I", "-c", _CHILD, _PACKAGE_PARENT, "--kind", kind]
                    proc = confine.spawn([*argv, "--max-bytes", str(max_bytes)], policy, cwd=cwd, stdin=fin)
                finally:
                    os.close(fin)
                child = _Child(proc, src.name, cancel)
                try:
                    for block in child.blocks():
                        if cancel is not None and cancel.is_set():
                            raise Cancelled(f"decompression of {src.name} cancelled")
                        if check_head is not None and total == 0:
                            check_head(block)
                        if total + len(block) > max_bytes:
                            raise bomb(kind, max_bytes)
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
                finally:
                    child.close()
                _check_result(child, kind, total, policy)
                out.truncate(total)  # materialises a trailing hole; also the only way the size covers it
            partials.publish(tmp, dst, 0o600)
        return total
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(dst.parent, f"decompressing {src.name} ({total} bytes out)") from exc
        raise


def _check_result(child: _Child, kind: str, total: int, policy: confine.Policy) -> None:
    """Raise what the child's end means, unless it decoded the whole stream into the ``total`` bytes
    received."""
    result = child.result()
    tail = child.stderr.decode("utf-8", "replace")
    if result is None or child.proc.returncode != 0:
        raise child_failure(kind, child.proc.returncode, tail, policy)
    if "error" in result:
        code, message = str(result["error"]), str(result.get("message", ""))
        if code.startswith(("CorruptImage", "SizeLimitExceeded", "UnsafeImage")):
            raise rejected(code, message)
        raise ImagingError(message, code=code)
    if result.get("total") != total:
        raise ImagingError(
            f"the {kind} decompressor reported {result.get('total')} bytes but sent {total}",
            code="InternalError",
        )


def decompress_head(
    pieces: Iterable[bytes],
    kind: str,
    want: int,
    *,
    complete: bool,
    limits: Limits | None = None,
    cancel: threading.Event | None = None,
    name: str = "the source",
) -> tuple[bytes, bool]:
    """The first ``want`` decompressed bytes of a compressed stream whose bytes are ``pieces`` (a
    download's body, read lazily and no further than needed), decoded by the same confined child as
    :func:`decompress` (nothing is written anywhere). Returns ``(head, ended)``: ``ended`` when the
    decompressed stream ended within ``want`` bytes (``head`` is then the whole image).

    ``complete`` says whether ``pieces`` is the whole compressed object: a stream cut off by the caller
    ends in the middle of a compressed block, which is not an error here (what was decoded before is the
    head); in a complete one it is ``CorruptImage``. Raises ImageRejected (``CorruptImage``,
    ``UnsafeImage.ResourceLimit``), Cancelled.
    """
    if kind not in COMPRESSIONS:
        raise UsageError(f"unknown compression {kind!r}; use one of {', '.join(COMPRESSIONS)}")
    cap = want + BLOCK_SIZE  # the child stops a little past what is wanted (it writes whole blocks)
    policy = confine.decompressor(limits or config_mod.from_dict({}).limits, cap)
    head = bytearray()
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    stop = threading.Event()
    feed_error: list[BaseException] = []

    def feed() -> None:
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view and not stop.is_set():
                    view = view[os.write(write_end, view) :]
                if stop.is_set():
                    return
        except BrokenPipeError:
            pass  # the child is done (enough output, or an error it reports)
        except BaseException as exc:  # the download failed: raised in the caller's thread
            feed_error.append(exc)
        finally:
            os.close(write_end)

    with confine.private_dir(prefix="decompress.") as cwd:
        try:
            argv = [sys.executable, "-I", "-c", _CHILD, _PACKAGE_PARENT, "--kind", kind]
            proc = confine.spawn([*argv, "--max-bytes", str(cap)], policy, cwd=cwd, stdin=read_end)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        feeder = threading.Thread(target=feed, name="decompress-head", daemon=True)
        feeder.start()
        child = _Child(proc, name, cancel)
        enough = False
        try:
            for block in child.blocks():
                head += block
                if len(head) >= want:
                    enough = True
                    break
        finally:
            stop.set()
            child.close()  # kills the child when it is still decoding: its stdin pipe breaks
            feeder.join()
    if enough:
        return bytes(head[:want]), False
    if feed_error:
        raise feed_error[0]
    result = child.result()
    if result is not None and "total" in result and child.proc.returncode == 0:
        if result["total"] != len(head):
            raise ImagingError(
                f"the {kind} decompressor reported {result['total']} bytes but sent {len(head)}",
                code="InternalError",
            )
        return bytes(head), True
    if result is not None and str(result.get("error", "")) == "CorruptImage" and not complete:
        return bytes(head), False  # the stream was cut off where the caller stopped reading
    _check_result(child, kind, len(head), policy)
    raise ImagingError(f"the {kind} decompressor ended without a result", code="InternalError")
