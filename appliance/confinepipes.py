"""Reading a confined child's output under a cap, and killing it with its process group: the part of
:func:`appliance.confine.collect` that keeps a hostile parser's flood of output from costing the caller
more memory than the cap."""

from __future__ import annotations

import os
import select
import selectors
import signal
import subprocess
import threading
import time
from typing import Any

from .errors import Cancelled

#: seconds between two looks at the cancel event and the deadline while a confined child runs (both ways
#: :func:`appliance.confine.collect` waits)
POLL_SECONDS = 0.1
#: bytes read from a pipe at once (a pipe's default capacity)
_READ_SIZE = 65536


def read_capped(
    proc: subprocess.Popen[Any],
    tool: str,
    cancel: threading.Event | None,
    deadline: float | None,
    max_output: int,
) -> tuple[bytearray, bytearray, bool, bool]:
    """``proc``'s stdout and stderr, whether ``deadline`` (monotonic) passed and whether it printed more
    than ``max_output`` bytes (then killed at once: the output kept is what came first). Both pipes are
    read as they fill (``communicate`` would keep all of a flood); ``proc`` is reaped only after a kill,
    even once it has exited on its own (its pid is its group's id, which stays its own until then): what
    it started dies with it either way. Raises :class:`~appliance.errors.Cancelled` (after the kill) when
    ``cancel`` is set."""
    assert proc.stdout is not None and proc.stderr is not None
    kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    total = 0
    timed_out = exceeded = ended = False
    exit_fd = -1
    try:
        exit_fd = os.pidfd_open(proc.pid)  # readable once it has exited, before it is reaped
        with selectors.DefaultSelector() as pipes:
            for fd in kept:
                pipes.register(fd, selectors.EVENT_READ)
            while not ended:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"cancelled while running {tool}")
                if deadline is not None and time.monotonic() > deadline:
                    timed_out = True
                    break
                if not pipes.get_map():  # both closed: wait for the exit, still under the limits
                    ended = bool(select.select([exit_fd], [], [], POLL_SECONDS)[0])
                    continue
                for key, _ in pipes.select(POLL_SECONDS):
                    chunk = os.read(key.fd, _READ_SIZE)
                    if not chunk:
                        pipes.unregister(key.fd)
                        continue
                    total += len(chunk)
                    if total > max_output:
                        exceeded = True
                        break
                    kept[key.fd] += chunk
                if exceeded:
                    break
    finally:
        # also after an exit of its own: a child it left in the group (its stdio away from the pipes, as
        # a subverted parser could) dies too
        kill(proc)
        proc.wait()
        if exit_fd >= 0:
            os.close(exit_fd)
        # not drained: a process outside the group may hold the pipes open
        proc.stdout.close()
        proc.stderr.close()
    out, err = kept.values()
    return out, err, timed_out, exceeded


def kill(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc``, and everything in its process group when it leads one (``new_session`` of
    :func:`appliance.confine.spawn`): what it started dies with it. Call it before reaping ``proc``:
    until then its pid, the group's id, cannot be reused."""
    if proc.returncode is not None:
        return
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
