"""CPU-seconds per thread of this process while a block runs, grouped by what the threads do.

The benchmarks run on a machine shared with other work, so wall times move with the load; the CPU
time each thread used does not (much). :class:`ThreadCpu` reads ``/proc/self/task/<tid>/stat``
(user + system ticks) every ``interval`` seconds and at the end, keeping each thread's last reading
(pool threads exit before the block ends: their reading from just before is kept, so up to one
interval of their CPU can be missed), names each thread by :func:`threading.enumerate` (``native_id``
→ ``name``) and sums the threads whose name starts alike (``manifest-parts-0``, ``manifest-parts-1``
→ ``manifest-parts``). The children's CPU (the confined decoder, qemu-img) is ``children``, from
:func:`os.times`; each living descendant's is read at the same samples (``/proc/PID/stat``) and summed
by its name (:func:`taskproc._name`: ``python --records`` the streamed decoder, ``python --kind`` a
decompressor, ``python --format`` the guest probe, ``qemu-img``) into :attr:`ThreadCpu.by_child`: a
child's last interval before it exits is missed, so these sum to a little less than ``children``.
Linux only (elsewhere the groups are empty).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from taskproc import _cmdline, _name, descendants

HZ = os.sysconf("SC_CLK_TCK")
#: a thread name's numbered suffix (a pool's ``name-3``, Python's ``Thread-7 (target)``)
_NUMBERED = re.compile(r"[-_ ]\d+(?: \(.*\))?$")


def _tick_seconds(tid: int, stat: str | None = None) -> float | None:
    try:
        text = Path(stat or f"/proc/self/task/{tid}/stat").read_text()
        fields = text.rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / HZ


#: the engine's threads, named after their task (``step <task>/<index>``: the steps of a task run one
#: at a time, so ``steps`` of a streamed import is mostly its writing thread)
_TASK_THREAD = re.compile(r"^(step|supervisor) \S+$")


def group_of(name: str) -> str:
    """The group a thread's name belongs to: the name without its pool number or task."""
    task_thread = _TASK_THREAD.match(name)
    if task_thread:
        return "steps" if task_thread.group(1) == "step" else "supervisor"
    return _NUMBERED.sub("", name) or name


class ThreadCpu:
    """Use as a context manager around the measured block; then :attr:`groups` (CPU-s per thread
    group, this process's threads only) and :attr:`children` (CPU-s of child processes that ended)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.groups: dict[str, float] = {}
        self.children = 0.0
        #: CPU-s of the descendants that were seen, by name (module docstring)
        self.by_child: dict[str, float] = {}
        self._kids: dict[int, tuple[str, float]] = {}
        self._before: set[int] = set()
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="threadcpu-sampler", daemon=True)
        self._children0 = 0.0

    def _sample(self) -> None:
        for t in threading.enumerate():
            if t.native_id is not None:
                self._names.setdefault(t.native_id, t.name)
        try:
            tids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:
            return
        for tid in tids:
            seconds = _tick_seconds(tid)
            if seconds is not None:
                self._last[tid] = seconds
        own = _cmdline(os.getpid())
        for kid in descendants(os.getpid()):
            if kid in self._before or _cmdline(kid) == own:
                continue  # already there, or forked and not yet exec'd
            name = _name(kid)  # again each time: setpriv, unshare and prlimit exec the tool
            seconds = _tick_seconds(kid, f"/proc/{kid}/stat")
            if seconds is not None:
                self._kids[kid] = (name, seconds)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ThreadCpu:
        self._sample()
        self._start = dict(self._last)
        # the processes already running (the bench's servers) are not the block's children
        self._before = set(self._kids)
        self._kids.clear()
        me = os.times()
        self._children0 = me.children_user + me.children_system
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        sampler = self._thread.native_id
        groups: dict[str, float] = {}
        for tid, seconds in self._last.items():
            if tid == sampler:
                continue
            used = seconds - self._start.get(tid, 0.0)
            if used > 0:
                name = "main" if tid == os.getpid() else group_of(self._names.get(tid, f"thread {tid}"))
                groups[name] = groups.get(name, 0.0) + used
        self.groups = dict(sorted(groups.items(), key=lambda kv: -kv[1]))
        me = os.times()
        self.children = me.children_user + me.children_system - self._children0
        by_child: dict[str, float] = {}
        for name, seconds in self._kids.values():
            by_child[name] = by_child.get(name, 0.0) + seconds
        self.by_child = dict(sorted(by_child.items(), key=lambda kv: -kv[1]))

    def summary(self) -> str:
        """``main 3.1, manifest-parts 4.2, ...; children 0.4`` (CPU-s), the largest first."""
        parts = [f"{name} {seconds:.2f}" for name, seconds in self.groups.items() if seconds >= 0.01]
        kids = [f"{name} {seconds:.2f}" for name, seconds in self.by_child.items() if seconds >= 0.01]
        return f"{', '.join(parts)}; children {self.children:.2f}" + (f" ({', '.join(kids)})" if kids else "")
