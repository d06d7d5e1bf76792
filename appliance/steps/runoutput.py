"""A command's output, as the ``run`` step (:mod:`.run`) reads it: its stdout and stderr pipes read
until it exits (or a timeout passes, or the task is cancelled), cut into lines (a line longer than
:data:`MAX_LINE` is cut), batched into ``run.output`` events (at most :data:`LINES_PER_EVENT` lines,
every :data:`FLUSH_INTERVAL` seconds, one event per run of lines of one stream so that order is
kept), capped at ``max_output`` bytes with the last :data:`TAIL_LINES` lines of each stream kept
for the result; and, after it exits, what is left in the pipes and the sandbox launcher's status.
"""

from __future__ import annotations

import collections
import os
import select
import subprocess
import time
from dataclasses import dataclass

from ..errors import Cancelled
from ..workflow.step import StepContext

#: lines per run.output event, and the longest a line may grow before it is cut
LINES_PER_EVENT = 100
MAX_LINE = 4096
#: how long output is batched before it becomes an event
FLUSH_INTERVAL = 0.5
#: lines kept for the result and for a failure message
TAIL_LINES = 20


@dataclass
class Stream:
    """One pipe of the command (``stdout`` or ``stderr``) and its bytes not yet ending a line."""

    name: str
    fd: int
    pending: bytes = b""
    open: bool = True


class Output:
    """Turns pipe bytes into ``run.output`` events, capped at ``max_output`` bytes."""

    def __init__(self, ctx: StepContext, max_output: int) -> None:
        self.ctx = ctx
        self.max_output = max_output
        self.kept = 0
        self.total = 0
        self.truncated = False
        self.batch: list[tuple[str, str]] = []
        self.last_flush = time.monotonic()
        self.tails: dict[str, collections.deque[str]] = {
            "stdout": collections.deque(maxlen=TAIL_LINES),
            "stderr": collections.deque(maxlen=TAIL_LINES),
        }
        self.combined: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def line(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.total += len(raw) + 1
        self.tails[stream].append(text)
        self.combined.append(text)
        if self.kept + len(raw) + 1 > self.max_output:
            if not self.truncated:
                self.truncated = True
                self.flush()
                self.ctx.event(
                    "run.output",
                    stream=stream,
                    lines=[],
                    truncated=True,
                    note=f"output beyond {self.max_output} bytes is not kept (max_output)",
                )
            return
        self.kept += len(raw) + 1
        self.batch.append((stream, text))
        if len(self.batch) >= LINES_PER_EVENT:
            self.flush()

    def feed(self, stream: Stream, data: bytes) -> None:
        stream.pending += data
        *lines, stream.pending = stream.pending.split(b"\n")
        for raw in lines:
            self.line(stream.name, raw)
        while len(stream.pending) > MAX_LINE:
            self.line(stream.name, stream.pending[:MAX_LINE])
            stream.pending = stream.pending[MAX_LINE:]

    def finish(self, stream: Stream) -> None:
        if stream.pending:
            self.line(stream.name, stream.pending)
            stream.pending = b""

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        # one event per run of consecutive lines from the same stream, so order is kept
        while self.batch:
            stream = self.batch[0][0]
            n = next((i for i, (s, _) in enumerate(self.batch) if s != stream), len(self.batch))
            self.ctx.event("run.output", stream=stream, lines=[t for _, t in self.batch[:n]])
            del self.batch[:n]

    def maybe_flush(self) -> None:
        if self.batch and time.monotonic() - self.last_flush >= FLUSH_INTERVAL:
            self.flush()


def pump(
    proc: subprocess.Popen[bytes], streams: list[Stream], out: Output, stop_at: float | None
) -> int | None:
    """Read output until the process exits (return its status) or ``stop_at`` passes (None)."""
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            fds = [s.fd for s in streams if s.open] + ([pidfd] if pidfd is not None else [])
            ready, _, _ = select.select(fds, [], [], 0.1)
            for s in streams:
                if s.open and s.fd in ready:
                    data = os.read(s.fd, 65536)
                    if data:
                        out.feed(s, data)
                    else:
                        s.open = False
                        out.finish(s)
            out.maybe_flush()
            if proc.poll() is not None:
                return proc.returncode
            if stop_at is not None and time.monotonic() >= stop_at:
                return None
            if out.ctx.cancel.is_set():
                raise Cancelled(f"step {out.ctx.name!r} was cancelled")
    finally:
        if pidfd is not None:
            os.close(pidfd)


def drain(streams: list[Stream], out: Output, seconds: float) -> None:
    """Read what is left in the pipes (bounded: a left-behind child may keep them open)."""
    deadline = time.monotonic() + seconds
    while any(s.open for s in streams) and time.monotonic() < deadline:
        ready, _, _ = select.select([s.fd for s in streams if s.open], [], [], 0.05)
        for s in streams:
            if s.open and s.fd in ready:
                data = os.read(s.fd, 65536)
                if data:
                    out.feed(s, data)
                else:
                    s.open = False
    for s in streams:
        out.finish(s)


def read_all(fd: int) -> bytes:
    """What the launcher wrote on its status pipe (it has exited: every write end is closed)."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    except BlockingIOError:
        pass  # a write end still open somewhere: take what is there
    finally:
        os.close(fd)
    return b"".join(chunks)
