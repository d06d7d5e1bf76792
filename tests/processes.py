"""Waiting for conditions, stopping processes a test started, process trees: shared by the test modules."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest


def wait_until(
    cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition", interval: float = 0.1
) -> None:
    """Poll ``cond`` every ``interval`` seconds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what}")


def interruptible() -> None:
    """``preexec_fn`` of a child a test sends SIGINT (Ctrl-C) to: SIGINT at its default, so Python installs
    its KeyboardInterrupt handler. A shell's background job (``make test &`` in a script) inherits SIGINT
    ignored, and Python then leaves it ignored: the child would sleep through the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
    """Stop a process this test started: ``sig``, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Proc:
    """A process as /proc shows it; ``start`` (ticks after boot) tells it from a later one with its pid."""

    pid: int
    ppid: int
    start: int
    state: str

    def alive(self) -> bool:
        """Whether this very process still runs (a zombie does not)."""
        now = read_proc(self.pid)
        return now is not None and now.start == self.start and now.state != "Z"


def read_proc(pid: int) -> Proc | None:
    """``pid`` from /proc/PID/stat, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name is in parentheses and may hold anything: the fields follow the last ")"
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return Proc(pid, int(fields[1]), int(fields[19]), fields[0])


def all_procs() -> list[Proc]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := read_proc(int(entry))) is not None:
            out.append(proc)
    return out


def tree(root: int) -> list[Proc]:
    """``root`` and every process below it (children, their children, …), root first."""
    procs = all_procs()
    by_parent: dict[int, list[Proc]] = {}
    for proc in procs:
        by_parent.setdefault(proc.ppid, []).append(proc)
    found = [p for p in procs if p.pid == root]
    queue = list(found)
    while queue:
        for child in by_parent.get(queue.pop().pid, []):
            found.append(child)
            queue.append(child)
    return found


def kill_tree(root: int) -> list[Proc]:
    """kill -9 ``root`` and everything below it, at one moment: the tree is stopped (SIGSTOP) until no new
    process appears in it, then every process of it gets SIGKILL. Returns the processes killed.

    A process that waits in the kernel killably (an open held by fanotify) does not stop, but neither can it
    start anything; SIGKILL ends it too.
    """
    stopped: dict[tuple[int, int], Proc] = {}
    while True:
        fresh = [p for p in tree(root) if (p.pid, p.start) not in stopped]
        if not fresh:
            break
        for proc in fresh:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGSTOP)
            stopped[(proc.pid, proc.start)] = proc
    for proc in stopped.values():
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    return list(stopped.values())
