"""Running ``qemu-img convert`` under supervision (:mod:`appliance.image.convert`): confined
(:mod:`appliance.confine`) in its own process group, its ``-p`` output fed to a progress tracker, its
stderr's tail kept for the error message, stopped on a cancel (or a rejected source) and on Ctrl-C.

Stopping is :func:`stop_process_group`: SIGTERM to the whole group, SIGKILL after a grace period, and it
returns only once the leader is reaped and the group is empty, so a caller that raises ``Cancelled`` or
``KeyboardInterrupt`` after it leaves no qemu-img behind. A limit of the confinement that stops qemu-img
rejects the image (``UnsafeImage.ResourceLimit``); a full filesystem under the output is the caller's
``no_space`` error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import confine
from ..errors import Cancelled, ConversionFailed, ImageRejected, ImagingError
from ..nospace import NO_SPACE_MESSAGES, no_space_error
from ..progress import ProgressTracker
from . import qemuimg

log = logging.getLogger(__name__)

#: seconds between SIGTERM and SIGKILL when stopping qemu-img
TERM_GRACE = 1.0
#: how much of qemu-img's stderr is kept for the error message
STDERR_KEEP = 4000

_PERCENT = re.compile(rb"\(\s*(\d+(?:\.\d+)?)/100%\)")


class AnySet:
    """Set when any of the events is: stops qemu-img on a cancel or a rejected source alike."""

    def __init__(self, *events: threading.Event | None) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def run_convert(
    argv: list[str],
    policy: confine.Policy,
    cwd: Path,
    tracker: ProgressTracker,
    virtual_size: int,
    cancel: threading.Event | AnySet | None,
    out_path: Path,
    no_space: Callable[[Path, str], ImagingError] = no_space_error,
) -> None:
    """Run qemu-img convert confined by ``policy``, feeding its ``-p`` output to ``tracker``; stop it
    on cancel. A limit that stops it rejects the image (``UnsafeImage.ResourceLimit``).

    A failure because ``out_path``'s filesystem is full is ``no_space``'s error.
    """
    log.debug("running %s", " ".join(argv))
    # own process group: Ctrl-C does not reach it, killpg does
    proc = confine.spawn(argv, policy, cwd=cwd, new_session=True)
    stderr = bytearray()
    readers = [
        threading.Thread(target=_read_progress, args=(proc.stdout, tracker, virtual_size), daemon=True),
        threading.Thread(target=_read_tail, args=(proc.stderr, stderr), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        rc = _wait(proc, cancel)
    except BaseException:
        stop_process_group(proc)
        raise
    finally:
        for t in readers:
            t.join(timeout=5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    text = bytes(stderr).decode("utf-8", "replace")
    killed = qemuimg.limit_finding(confine.Completed(rc, "", text), policy)
    if killed is not None:
        raise ImageRejected([killed])
    if rc != 0:
        message = text.strip() or f"exit status {rc}"
        if rc < 0:
            message = f"killed by signal {-rc}: {message}"
        elif any(marker in message for marker in NO_SPACE_MESSAGES):
            raise no_space(out_path.parent, f"qemu-img convert was writing ({message})")
        raise ConversionFailed(f"qemu-img convert failed: {message}", code="ConversionFailed.QemuImg")
    if stderr:
        log.warning("qemu-img convert: %s", bytes(stderr).decode("utf-8", "replace").strip())


def _wait(proc: subprocess.Popen[bytes], cancel: threading.Event | AnySet | None, poll: float = 0.1) -> int:
    """Wait for ``proc`` to exit, checking ``cancel`` every ``poll`` seconds; raise Cancelled when set.

    Waits on a pidfd where the kernel has them: ``Popen.wait(timeout)`` sleeps in steps of up to
    50 ms and so notices the exit up to 50 ms late, a cost on every short conversion.
    """
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            if pidfd is not None:
                ready, _, _ = select.select([pidfd], [], [], poll)
                if ready:
                    return proc.wait()
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(timeout=poll)
            if cancel is not None and cancel.is_set():
                raise Cancelled("conversion cancelled")
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read_progress(pipe: Any, tracker: ProgressTracker, virtual_size: int) -> None:
    # qemu-img rewrites one line with "\r    (12.34/100%)"; a chunk may hold several or half
    # of one, so keep the tail after the last separator for the next read.
    pending = b""
    fd = pipe.fileno()
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        pending += chunk
        *complete, pending = re.split(rb"[\r\n]", pending)
        for piece in complete:
            match = _PERCENT.search(piece)
            if match:
                tracker.update(int(float(match.group(1)) / 100.0 * virtual_size))


def _read_tail(pipe: Any, sink: bytearray) -> None:
    fd = pipe.fileno()
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        sink += chunk
        if len(sink) > STDERR_KEEP:
            del sink[: len(sink) - STDERR_KEEP]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = TERM_GRACE) -> None:
    """Stop ``proc`` and everything in its process group: SIGTERM, then SIGKILL after ``grace``.

    ``proc`` must have been started with ``start_new_session=True`` (its pid is the group id).
    Returns once the leader is reaped and the group is empty (or after a further second).
    """
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or its zombie keeps the group alive
        if proc.returncode is not None and not _group_alive(pgid):
            return
        time.sleep(0.02)
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 1.0
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
