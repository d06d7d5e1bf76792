"""bench/taskproc.py measures the task process it starts, not the process that starts it: a real
process tree (a parent that touches its memory and a child that touches more) is sampled as it runs;
a fork that has not exec'd yet still shows its parent's memory and is not taken for a child."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.append(str(BENCH))

from taskproc import run_measured  # noqa: E402

MiB = 1 << 20

#: a "task" that holds 120 MiB while its child holds 60 MiB, then frees it and touches 200 MiB
#: after its child is gone
TREE = """
import subprocess, sys, time
held = bytearray(120 << 20)
child = subprocess.Popen([sys.executable, "-c",
    "import time; b = bytearray(60 << 20); time.sleep(0.5)"])
child.wait()
del held
last = bytearray(200 << 20)
time.sleep(0.3)
"""


def test_peaks_are_the_started_process_and_its_child_not_the_caller(tmp_path: Path) -> None:
    caller = bytearray(400 * MiB)  # the caller holds more than the task ever does
    caller[::4096] = b"x" * len(range(0, len(caller), 4096))
    memory = run_measured([sys.executable, "-c", TREE], log=tmp_path / "tree.log")
    assert memory.returncode == 0, (tmp_path / "tree.log").read_text()
    # the task's peak is its own, not the caller's
    assert 200 * MiB <= memory.task_peak < 300 * MiB
    # the child was seen while it ran, and counted apart from its parent
    assert 60 * MiB <= memory.child_peak < 120 * MiB
    assert list(memory.children_peak) == ["python"]


def test_a_failing_process_reports_its_exit_status(tmp_path: Path) -> None:
    memory = run_measured([sys.executable, "-c", "raise SystemExit(3)"], log=tmp_path / "log")
    assert memory.returncode == 3


#: a task that forks a child which never execs (it shares the task's pages until it would exec)
FORK = """
import os, time
held = bytearray(150 << 20)
pid = os.fork()
if pid == 0:
    time.sleep(0.5)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_forked_child_before_its_exec_is_not_counted_as_a_child(tmp_path: Path) -> None:
    memory = run_measured([sys.executable, "-c", FORK], log=tmp_path / "fork.log")
    assert memory.returncode == 0, (tmp_path / "fork.log").read_text()
    assert memory.task_peak >= 150 * MiB
    assert memory.children_peak == {}
