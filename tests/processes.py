"""Waiting for conditions and stopping processes a test started: shared by the test modules."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

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


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
    """Stop a process this test started: ``sig``, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
