"""The unbundle pipeline: parts fetched in parallel → AES-128-CBC here → gunzip + untar in a confined child.

:func:`decrypt_parts` fetches a bundle's parts ``parallel`` at a time (:func:`.ordered.ordered_fetch`,
memory bounded by ``parallel + 1`` parts), checks each part's SHA-1 before a byte of it is used, and
decrypts them in this process, which holds the key. The plaintext — a gzip stream of a tar stream, chosen
by whoever made the bundle — is parsed only by the child :mod:`.bundle_untar`, started through
:mod:`appliance.confine` under the decompressor's policy (``limits.decompress_*``: CPU seconds scaled to
the output cap, address space; no network, an empty private directory, a parent-death signal). A feeder
thread writes the plaintext to the child's stdin; this thread reads the tar stream it sends back, which
the child releases only once the first header passed its checks.

This process trusts nothing the child says about the image: it hashes the whole tar stream itself (the
manifest's ``image/digest`` is its SHA-1, checked by the caller), caps it at ``image/size`` + 1 MiB, and
takes the image from bytes 512 … 512 + ``image/size`` (the one regular member's data, whose header the
child checked), so a subverted child can at worst make the unbundle fail or — where no digest is known —
produce other bytes, which are then inspected like any untrusted image.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .. import config as config_mod
from .. import confine
from ..config import Limits
from ..errors import BundleInvalid, Cancelled, Finding, ImageRejected, ImagingError
from .bundle_manifest import BundlePart
from .bundle_untar import CHUNK, TAR_HEADER
from .ordered import LinkedEvent, ordered_fetch

#: tar headers, end-of-archive blocks and record padding allowed beyond ``image/size``
TAR_OVERHEAD = 1 << 20
#: the largest part accepted (euca2ools and the AWS tools write 10 MiB parts)
MAX_PART_BYTES = 64 << 20
#: the child program, run by path with ``python -I`` (standard library only)
CHILD = str(Path(__file__).with_name("bundle_untar.py"))
_POLL_SECONDS = 0.1
_STDERR_KEEP = 8192
#: signals that mean a limit stopped the child (RLIMIT_CPU sends SIGXCPU, then SIGKILL at the hard limit)
_LIMIT_SIGNALS = (signal.SIGXCPU, signal.SIGKILL)
#: what ld.so says when the address-space limit leaves no room for a shared library
_LOADER_NO_MEMORY = "failed to map segment from shared object"


def check_part(part: BundlePart, data: bytes) -> bytes:
    """``data`` when it is the part the manifest digests; ``BundleInvalid.PartDigest`` otherwise."""
    if len(data) > MAX_PART_BYTES:
        raise BundleInvalid("Size", f"bundle part {part.index} is larger than {MAX_PART_BYTES} bytes")
    if hashlib.sha1(data).hexdigest() != part.sha1:
        raise BundleInvalid(
            "PartDigest",
            f"bundle part {part.index} does not match its SHA1 digest in the manifest: it is corrupt or was "
            "replaced",
        )
    return data


def size_limit(size: int, max_bytes: int | None) -> None:
    """``SizeLimitExceeded.Download`` when the image is larger than ``max_bytes``."""
    if max_bytes is not None and size > max_bytes:
        raise ImageRejected(
            [
                Finding.error(
                    "SizeLimitExceeded.Download",
                    f"the bundle's image is {size} bytes, over the limit of {max_bytes} bytes",
                )
            ]
        )


def _decrypted(ciphertexts: Iterator[bytes], key: bytes, iv: bytes) -> Generator[bytes, None, None]:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = sym_padding.PKCS7(128).unpadder()
    for data in ciphertexts:
        yield unpadder.update(decryptor.update(data))
    try:
        yield unpadder.update(decryptor.finalize()) + unpadder.finalize()
    except ValueError:
        raise BundleInvalid(
            "Decrypt", "the bundle's ciphertext does not decrypt (bad padding): wrong key, or corrupt parts"
        ) from None


# --------------------------------------------------------------------------------------------- the child


class _Feeder(threading.Thread):
    """Writes the plaintext to the child's stdin; keeps the first failure of the pipeline feeding it."""

    def __init__(
        self, proc: subprocess.Popen[bytes], plaintext: Callable[[], Generator[bytes, None, None]]
    ) -> None:
        super().__init__(name="bundle-feed", daemon=True)
        self.proc, self.plaintext = proc, plaintext
        self.failure: BaseException | None = None

    def run(self) -> None:
        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        pieces = self.plaintext()
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
        except BrokenPipeError:
            pass  # the child ended early: its result says why
        except BaseException as exc:  # raised by the caller, before what the child says
            self.failure = exc
            with contextlib.suppress(OSError):
                self.proc.kill()
        finally:
            with contextlib.suppress(OSError, ValueError):
                pieces.close()
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def _child_error(proc: subprocess.Popen[bytes], stderr: bytes, policy: confine.Policy) -> ImagingError:
    """What the child's end means when it did not unpack the bundle."""
    for line in reversed(stderr.splitlines()):
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and "error" in result:
            code, message = str(result["error"]), str(result.get("message", ""))
            if code.startswith("BundleInvalid."):
                return BundleInvalid(code.split(".", 1)[1], message)
            if code.startswith("UnsafeImage."):
                return ImageRejected([Finding.error(code, message)])
            return ImagingError(message, code="InternalError")
    status, tail = proc.returncode, stderr.decode("utf-8", "replace")
    hit = confine.limit_hit(status, tail)
    if hit is None and _LOADER_NO_MEMORY in tail:  # the dynamic loader under too small an address space
        hit = "could not map its libraries"
    if (status < 0 and -status in _LIMIT_SIGNALS) or (hit is not None and status >= 0):
        return ImageRejected(
            [
                Finding.error(
                    "UnsafeImage.ResourceLimit",
                    f"unpacking the bundle {hit or 'was stopped'} ({policy.describe()}): a bundle that needs "
                    "this much is crafted to exhaust the host; for a genuine large image raise "
                    "limits.decompress_*",
                )
            ]
        )
    last = [ln for ln in tail.splitlines() if ln.strip()]
    detail = last[-1][:300] if last else f"exit status {status}"
    return ImagingError(f"the bundle unpacker failed: {detail}", code="InternalError")


def untar_confined(
    plaintext: Callable[[], Generator[bytes, None, None]],
    out: Any,
    *,
    size: int,
    limits: Limits,
    abort: threading.Event,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[int, str, str]:
    """Unpack the gzip'd tar stream ``plaintext()`` yields (called in a feeder thread) in the confined
    child, writing the image to ``out``; (image bytes, their SHA-256, the tar stream's SHA-1).

    ``abort`` is set when this ends early, so the pipeline behind ``plaintext`` stops."""
    cap = size + TAR_OVERHEAD
    policy = confine.decompressor(limits, cap)
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    pos = written = 0
    stderr = bytearray()
    argv = [sys.executable, "-I", CHILD, "--size", str(size), "--overhead", str(TAR_OVERHEAD)]
    with confine.private_dir(prefix="unbundle.") as cwd:
        proc = confine.spawn(argv, policy, cwd=cwd, stdin=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        fd, err = proc.stdout.fileno(), proc.stderr.fileno()
        for pipe_fd in (fd, proc.stdin.fileno()):
            with contextlib.suppress(OSError):  # above fs.pipe-max-size: the default buffer
                fcntl.fcntl(pipe_fd, fcntl.F_SETPIPE_SZ, CHUNK)
        feeder = _Feeder(proc, plaintext)
        feeder.start()
        try:
            open_fds = [fd, err]
            while open_fds:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("unbundling cancelled")
                ready, _, _ = select.select(open_fds, [], [], _POLL_SECONDS)
                if err in ready:
                    chunk = os.read(err, 65536)
                    stderr[:] = (stderr + chunk)[-_STDERR_KEEP:]
                    if not chunk:
                        open_fds.remove(err)
                if fd not in ready:
                    continue
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    open_fds.remove(fd)
                    continue
                if pos + len(chunk) > cap:
                    raise BundleInvalid(
                        "Size",
                        f"the bundle unpacks to more than image/size + {TAR_OVERHEAD} bytes of tar stream",
                    )
                sha1.update(chunk)
                lo, hi = max(pos, TAR_HEADER), min(pos + len(chunk), TAR_HEADER + size)
                if lo < hi:
                    data = chunk[lo - pos : hi - pos]
                    out.write(data)
                    sha256.update(data)
                    written += len(data)
                    if on_progress is not None:
                        on_progress(written)
                pos += len(chunk)
            proc.wait()
            reported = _child_result(bytes(stderr)) if proc.returncode == 0 else None
            # The child ends well only after reading the plaintext to its end, so the feeder is done (or
            # failed, which it records before closing the child's stdin); otherwise stop the pipeline.
            failure = feeder.failure
            if reported is None:
                abort.set()
            feeder.join()
            if reported is not None:
                failure = feeder.failure
        except BaseException:
            abort.set()
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            feeder.join(timeout=30)
            for pipe in (proc.stdout, proc.stderr):
                pipe.close()
    if failure is not None:
        raise failure
    if reported is None:
        raise _child_error(proc, bytes(stderr), policy)
    if reported != pos:
        raise ImagingError(
            f"the bundle unpacker reported {reported} bytes but sent {pos}", code="InternalError"
        )
    if written != size:
        raise BundleInvalid("Size", f"the bundle unpacked to {written} bytes, image/size says {size}")
    return written, sha256.hexdigest(), sha1.hexdigest()


def _child_result(stderr: bytes) -> int | None:
    for line in reversed(stderr.splitlines()):
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and isinstance(result.get("total"), int):
            return int(result["total"])
    return None


# --------------------------------------------------------------------------------------------- the pipeline


def decrypt_parts(
    parts: Sequence[BundlePart],
    read_part: Callable[[BundlePart, threading.Event], bytes],
    key: bytes,
    iv: bytes,
    out: Any,
    *,
    size: int,
    bundled_size: int,
    digest: str | None,
    parallel: int = 4,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
    limits: Limits | None = None,
) -> tuple[int, str, str]:
    """Fetch ``parts`` (``read_part(part, stop)`` returns its checked bytes) ``parallel`` at a time, and
    write the image they hold to ``out`` (``write(bytes)``); (bytes, SHA-256, tar SHA-1). ``digest`` is
    the tar stream's expected SHA-1 (None: not checked, as for Eucalyptus download manifests). The
    gunzip and untar run confined under ``limits`` (default: the embedded defaults)."""
    abort = LinkedEvent(cancel)

    def plaintext() -> Generator[bytes, None, None]:
        stop = LinkedEvent(abort)
        fetched = ordered_fetch(
            parts,
            lambda part: read_part(part, stop),
            parallel=max(1, parallel),
            cancel=abort,
            stop=stop,
            name="bundle-part",
        )
        total = 0

        def ciphertexts() -> Generator[bytes, None, None]:
            nonlocal total
            for _part, data in fetched:
                total += len(data)
                if total > bundled_size:
                    raise BundleInvalid("Size", "the bundle's parts hold more bytes than its manifest says")
                yield data
            if total != bundled_size:
                raise BundleInvalid(
                    "Size", f"the bundle's parts hold {total} bytes, the manifest says {bundled_size}"
                )

        try:
            yield from _decrypted(ciphertexts(), key, iv)
        finally:
            fetched.close()

    written, sha256, found = untar_confined(
        plaintext,
        out,
        size=size,
        limits=limits if limits is not None else config_mod.from_dict({}).limits,
        abort=abort,
        cancel=cancel,
        on_progress=on_progress,
    )
    if digest is not None and found != digest:
        raise BundleInvalid(
            "Digest", "the unbundled tar stream does not match the manifest's image/digest (SHA1)"
        )
    return written, sha256, found
