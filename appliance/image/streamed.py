"""A sequential decoder run confined, fed by this process, its output written by this process.

:class:`StreamDecode` starts the decoder child of :mod:`appliance.image.decoders` (``--records``) under
the decompressor's confinement policy (:func:`appliance.confine.decompressor`), as
:mod:`appliance.image.decompress` starts its child: the child gets the input on a pipe (stdin, fed by
:meth:`StreamDecode.feed` with bytes the caller has verified), sends framed records on a pipe (stdout)
and reports on stderr; it holds no writable file. A thread of this process reads the records, checks
each against the target's capacity (a subverted decoder cannot write outside the target) and hands
them to the sink (a :class:`appliance.targets.rawio.RawWriter`); a ``B`` (boundary) record is passed to
``on_boundary`` once everything before it is in the sink, so the caller can flush and checkpoint it.

Errors: the child's error line becomes its coded error (``CorruptImage``, ``SizeLimitExceeded``,
``UnsafeImage.ResourceLimit``); a child killed by a limit is ``UnsafeImage.ResourceLimit``; a record
outside the target is ``CorruptImage``; an error of the sink (a full volume) is raised as the sink
raised it. The caller removes or reuses the partial target.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import confine
from ..config import Limits
from ..errors import Cancelled, Finding, ImageRejected, ImagingError
from .decoders import BOUNDARY_EVERY, RECORD
from .decoding import Boundary, Sink
from .decompress import child_failure, rejected

_CHILD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from appliance.image.decoders import main; sys.exit(main())"
)
_PACKAGE_PARENT = str(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_STDERR_KEEP = 8192
_NO_SIZE = (1 << 64) - 1
#: largest data record accepted from the child (a VMDK grain is at most 64 KiB, raw pieces 1 MiB)
_MAX_RECORD = 16 << 20


@dataclass(frozen=True)
class StreamResult:
    """What the child decoded: the disk's virtual size, the input it read, the data bytes it sent."""

    virtual_size: int
    input_bytes: int
    data_bytes: int


class StreamDecode:
    """One confined decode of ``fmt`` into ``sink`` (module docstring). Use as a context manager:
    :meth:`feed` the input in order, then :meth:`finish`; leaving early kills the child."""

    def __init__(
        self,
        fmt: str,
        sink: Sink,
        *,
        capacity: int,
        limits: Limits,
        max_virtual_size: int,
        max_decompressed_size: int,
        input_size: int | None = None,
        resume: Boundary | None = None,
        boundary_every: int = BOUNDARY_EVERY,
        threads: int = 0,
        on_virtual_size: Callable[[int | None], None] | None = None,
        on_boundary: Callable[[Boundary, int], None] | None = None,
        on_output: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.fmt, self.sink, self.capacity, self.cancel = fmt, sink, capacity, cancel
        self.on_virtual_size, self.on_boundary, self.on_output = on_virtual_size, on_boundary, on_output
        #: bytes of the disk handed to the sink so far (data and zero ranges)
        self.produced = 0
        self.virtual_size: int | None = None
        self._policy = confine.decompressor(limits, max_decompressed_size)
        argv = [sys.executable, "-I", "-c", _CHILD, _PACKAGE_PARENT, "--records", "--format", fmt]
        argv += ["--max-virtual-size", str(max_virtual_size)]
        argv += ["--max-decompressed-size", str(max_decompressed_size), "--threads", str(threads)]
        argv += ["--boundary-every", str(boundary_every)]
        if input_size is not None:
            argv += ["--input-size", str(input_size)]
        self._dir = confine.private_dir(prefix="decoder.")
        cwd = self._dir.__enter__()
        try:
            if resume is not None:
                # a file, not an argument: a VMDK boundary's bitmap of written grains can outgrow the
                # kernel's limit on one argument (128 KiB), and the resume would fail for ever
                (cwd / "resume.json").write_text(json.dumps(resume.to_dict()))
                argv += ["--resume", "resume.json"]
            self.proc: subprocess.Popen[bytes] = confine.spawn(
                argv, self._policy, cwd=cwd, stdin=subprocess.PIPE
            )
        except BaseException:
            self._dir.__exit__(None, None, None)
            raise
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self._stdin = self.proc.stdin.fileno()
        self._stderr = b""
        self._failure: BaseException | None = None
        self._err_thread = threading.Thread(target=self._drain_stderr, name="decoder-stderr", daemon=True)
        self._out_thread = threading.Thread(target=self._records, name="decoder-records", daemon=True)
        self._err_thread.start()
        self._out_thread.start()

    # ------------------------------------------------------------------------------------ the threads

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self._stderr = (self._stderr + chunk)[-_STDERR_KEEP:]

    def _records(self) -> None:
        assert self.proc.stdout is not None
        out = self.proc.stdout
        try:
            while True:
                head = out.read(RECORD.size)
                if not head:
                    return
                if len(head) < RECORD.size:
                    raise self._bad("a truncated record")
                tag, offset, length = RECORD.unpack(head)
                if tag == b"V":
                    self.virtual_size = None if offset == _NO_SIZE else offset
                    if self.on_virtual_size is not None:
                        self.on_virtual_size(self.virtual_size)
                elif tag in (b"W", b"Z"):
                    if offset + length > self.capacity or (tag == b"W" and length > _MAX_RECORD):
                        raise self._bad(f"a write of {length} bytes at {offset}, outside the target")
                    if tag == b"W":
                        data = out.read(length)
                        if len(data) != length:
                            raise self._bad("a truncated data record")
                        self.sink.write(offset, data)
                    else:
                        self.sink.zero(offset, length)
                    self.produced += length
                    if self.on_output is not None:
                        self.on_output(self.produced)
                elif tag == b"B":
                    if length > _MAX_RECORD:
                        raise self._bad("an oversized boundary")
                    body = out.read(length)
                    boundary = Boundary.from_dict(json.loads(body))
                    if self.on_boundary is not None:
                        self.on_boundary(boundary, self.produced)
                else:
                    raise self._bad(f"an unknown record {tag!r}")
        except BaseException as exc:  # kept for the feeding thread; the child is stopped
            self._failure = exc
            self._kill()

    def _bad(self, what: str) -> ImagingError:
        return ImagingError(f"the {self.fmt} decoder sent {what}", code="InternalError")

    # ------------------------------------------------------------------------------------ the caller

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def feed(self, data: bytes | memoryview) -> None:
        """Send verified input bytes to the decoder (in input order)."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"decoding the {self.fmt} image cancelled")
        self._raise_failure()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._stdin, view) :]
        except BrokenPipeError:
            self._out_thread.join()
            self._raise_failure()
            self._close_stdin()
            raise self._outcome_error() from None

    def _close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()

    def finish(self) -> StreamResult:
        """End of input: wait for the decoder, raise what its end means, or return its result."""
        self._raise_failure()
        self._close_stdin()
        self._out_thread.join()
        self._err_thread.join()
        self.proc.wait()
        self._raise_failure()
        result = self._result()
        if result is None or "error" in result or self.proc.returncode != 0:
            raise self._outcome_error()
        if result.get("data") is None or result.get("total") is None:
            raise self._outcome_error()
        return StreamResult(int(result["total"]), int(result["input"]), int(result["data"]))

    def _result(self) -> dict[str, Any] | None:
        for line in reversed(self._stderr.splitlines()):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and ("total" in obj or "error" in obj):
                return obj
        return None

    def _outcome_error(self) -> ImagingError:
        self._err_thread.join(timeout=5)
        if self.proc.poll() is None:
            self.proc.wait()
        result = self._result()
        if result is not None and "error" in result:
            code, message = str(result["error"]), str(result.get("message", ""))
            if code.startswith(("CorruptImage", "SizeLimitExceeded", "UnsafeImage")):
                return rejected(code, message)
            return ImagingError(message, code=code)
        tail = self._stderr.decode("utf-8", "replace")
        if self.proc.returncode == 0:
            return ImageRejected(
                [Finding.error("CorruptImage", f"the {self.fmt} decoder ended without a result")]
            )
        return child_failure(self.fmt, self.proc.returncode, tail, self._policy)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        self._kill()
        self._close_stdin()
        self._out_thread.join()
        self._err_thread.join()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        self._dir.__exit__(None, None, None)

    def __enter__(self) -> StreamDecode:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
