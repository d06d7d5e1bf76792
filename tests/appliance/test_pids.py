"""pid_alive: a running process is alive, an ended one dead, whether or not its parent has reaped it."""

from __future__ import annotations

import os
import subprocess
import sys

from appliance.pids import pid_alive


def test_a_running_process_is_alive_and_an_ended_one_dead_reaped_or_not() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert pid_alive(proc.pid)
        assert pid_alive(os.getpid())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # ended, still a zombie
    assert not pid_alive(proc.pid)
    proc.wait(timeout=10)
    assert not pid_alive(proc.pid)
