"""A task run the way a worker runs it, with its memory measured: a new process
``python -m appliance.service.worker run TASK --config FILE`` (the argv
:mod:`appliance.service.children` starts), whose peak resident memory is the task's own and not that
of the process that created the task.

While the child runs, its ``VmHWM`` (the kernel's high-water mark of its resident memory) and that of
every descendant (the confined sequential decoder is a child of the task process: ``setpriv`` →
``unshare`` → ``prlimit`` exec the tool, so it keeps the pid) is read every ``interval`` seconds, and
each process's last reading counts: between fork (or vfork) and exec a new process still shows its
parent's memory (and command line: a descendant with the task's command line is skipped, so a child
that forks and never execs is not counted), and exec starts the high-water mark again. Growth in the
last interval before an exit is missed. ``ru_maxrss`` of ``wait4`` is no substitute: the kernel
carries the high-water mark of the image replaced by exec into it, so a task process started by a big
parent would read as big.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: what :mod:`appliance.service.children` runs for a task (its ``_spawn``), before ``TASK --config FILE``
TASK_ARGV = (sys.executable, "-m", "appliance.service.worker", "run")


@dataclass
class TaskMemory:
    """What a task child's run left: its exit status and peak resident memories, in bytes."""

    returncode: int
    #: the task process's own peak (see the module's docstring)
    task_peak: int
    #: the largest sampled peak of each descendant, by its command name (e.g. ``imaging-decode``)
    children_peak: dict[str, int] = field(default_factory=dict)

    @property
    def child_peak(self) -> int:
        return max(self.children_peak.values(), default=0)


def _hwm(pid: int) -> int:
    """``VmHWM`` of ``pid`` in bytes (0 when it is gone or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _name(pid: int) -> str:
    """A child's command name; for the task's Python children (``python -I -c CODE PACKAGE --option
    …``) with its first option too, which tells them apart: ``python --records`` is the streamed
    decoder, ``python --format`` the guest probe, ``python --kind`` a decompressor."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    if name.startswith("python"):
        option = next((a for a in _cmdline(pid).split(b"\0") if a.startswith(b"--")), b"")
        name = f"{name} {option.decode(errors='replace')}".strip()
    return name


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (children of each of its threads, recursively)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in threads:
            with contextlib.suppress(OSError):
                kids = [int(k) for k in Path(f"/proc/{parent}/task/{tid}/children").read_text().split()]
                found += kids
                todo += kids
    return found


def run_task_child(
    task_id: str,
    config: Path,
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> TaskMemory:
    """Run ``task_id`` in a new task process with the configuration file ``config`` until it exits
    (:func:`run_measured`)."""
    return run_measured([*TASK_ARGV, task_id, "--config", str(config)], env=env, log=log)


def run_measured(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    interval: float = 0.02,
) -> TaskMemory:
    """Run ``argv`` in a new process (and session) until it exits, sampling its memory and its
    descendants' every ``interval`` seconds. ``env`` is added to this process's environment; the
    child's output goes to ``log`` (else to this process's)."""
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 - closed below
    try:
        # own process group, as the worker starts it: what it leaves behind is killed with it below
        proc = subprocess.Popen(
            argv, start_new_session=True, env=os.environ | (env or {}), stdout=out, stderr=out
        )
    finally:
        if out is not None:
            out.close()
    task_peak = 0
    children: dict[int, tuple[str, int]] = {}
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        # The latest reading, not the largest: between fork and exec a process still has its
        # parent's memory (and high-water mark); exec starts both again, and from then on it only grows.
        task_peak = _hwm(proc.pid) or task_peak
        own = _cmdline(proc.pid)
        for kid in descendants(proc.pid):
            if _cmdline(kid) == own:
                continue  # forked, not yet exec'd: the task's memory, not the child's
            name = _name(kid)  # before the reading: a child that exits between the two reads 0
            peak = _hwm(kid)
            if peak:
                children[kid] = (name, peak)
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    by_name: dict[str, int] = {}
    for name, peak in children.values():
        by_name[name] = max(peak, by_name.get(name, 0))
    return TaskMemory(proc.returncode, task_peak, by_name)
