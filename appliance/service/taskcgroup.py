"""Per-task resource caps: every task child in a cgroup v2 of its own, with the configured limits.

``worker.task_cpu_quota``, ``task_io_weight``, ``task_io_read_bandwidth``, ``task_io_write_bandwidth`` and
``task_memory_max`` (user data ``limits.task_*``) mean what systemd's ``CPUQuota=``, ``IOWeight=``,
``IOReadBandwidthMax=``, ``IOWriteBandwidthMax=`` and ``MemoryMax=`` mean, and are enforced the same way:

* The worker needs a cgroup of its own that it may write to: under systemd, ``Delegate=`` on
  ``imaging-worker.service`` (with ``ProtectControlGroups=no``, which would make the cgroup file system
  read-only). :meth:`TaskCgroups.setup` moves the worker into a leaf ``worker/`` (cgroup v2 lets only
  leaves hold processes once controllers are enabled below), enables ``cpu io memory pids`` for its
  children and removes task cgroups a previous worker left.
* Per task, :meth:`TaskCgroups.create` makes ``task-<id>/`` with ``cpu.max``, ``memory.max``, ``io.max``
  (on every fixed whole disk, :func:`disks`) and ``io.weight``/``io.bfq.weight``;
  the task child moves itself in (:func:`join`) before it does anything else, so everything it starts
  (qemu-img, the probe, the decompressor, hook commands) is inside and capped with it.
* When a task child ends, :meth:`TaskCgroups.release` kills whatever is left in its cgroup
  (``cgroup.kill``) and removes it: a task killed alone leaves nothing running.

An IO weight only does something where the disk's scheduler is BFQ or io.cost is enabled for it; the
appliance image selects BFQ while a weight is configured (``imaging configure``, a udev rule). Where the
host cannot enforce a configured cap (no cgroup v2, a controller missing, the cgroup not delegated, no
BFQ/io.cost) the caps are reported as not enforced, with the reason: the worker's heartbeat carries it,
health says ``degraded``, and ``imaging config validate`` warns. Nothing is silently accepted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import WorkerConfig

log = logging.getLogger(__name__)

#: controllers enabled for the task cgroups (pids only for accounting; it costs nothing)
CONTROLLERS = ("cpu", "io", "memory", "pids")
WORKER_LEAF = "worker"
TASK_PREFIX = "task-"
#: cpu.max period in microseconds (systemd's default CPUQuotaPeriodSec=100ms)
CPU_PERIOD = 100_000
SYS_BLOCK = Path("/sys/block")
#: exit status of a task child that could not join its cgroup (it did not touch its task)
EXIT_CGROUP_JOIN_FAILED = 4

_TASK_NAME = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class TaskCaps:
    """The configured per-task caps (None: not capped)."""

    cpu_quota: str | None = None
    io_weight: int | None = None
    io_read_bandwidth: int | None = None
    io_write_bandwidth: int | None = None
    memory_max: int | None = None

    @classmethod
    def from_config(cls, worker: WorkerConfig) -> TaskCaps:
        return cls(
            worker.task_cpu_quota,
            worker.task_io_weight,
            worker.task_io_read_bandwidth,
            worker.task_io_write_bandwidth,
            worker.task_memory_max,
        )

    def settings(self) -> dict[str, Any]:
        """The configured caps by configuration key (``worker.task_cpu_quota`` …)."""
        keys = ("task_cpu_quota", "task_io_weight", "task_io_read_bandwidth", "task_io_write_bandwidth")
        values = (self.cpu_quota, self.io_weight, self.io_read_bandwidth, self.io_write_bandwidth)
        out = {f"worker.{k}": v for k, v in zip(keys, values, strict=True) if v is not None}
        if self.memory_max is not None:
            out["worker.task_memory_max"] = self.memory_max
        return out

    def controllers(self) -> set[str]:
        """The cgroup controllers these caps need."""
        needed = set()
        if self.cpu_quota is not None:
            needed.add("cpu")
        if self.memory_max is not None:
            needed.add("memory")
        if (
            self.io_weight is not None
            or self.io_read_bandwidth is not None
            or self.io_write_bandwidth is not None
        ):
            needed.add("io")
        return needed

    def __bool__(self) -> bool:
        return bool(self.settings())


def cpu_max(quota: str) -> str:
    """``cpu.max`` for a systemd ``CPUQuota=`` value: ``150%`` → ``150000 100000``."""
    percent = int(quota.rstrip("%"))
    return f"{percent * CPU_PERIOD // 100} {CPU_PERIOD}"


def bfq_weight(io_weight: int) -> int:
    """BFQ's weight (1..1000) for an ``IOWeight=`` (1..10000), mapped as systemd maps it."""
    if io_weight <= 100:
        return io_weight
    return 100 + (io_weight - 100) * 900 // 9900


# ----------------------------------------------------------------------------------------- the host


def unified_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``…/unified`` on hybrid hosts)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        before, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "cgroup2":
            return Path(before.split()[4])
    return None


def own_cgroup() -> str | None:
    """This process's cgroup v2 path (``/system.slice/imaging-worker.service``), or None."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    """One write(2) of ``value`` (cgroup files take one value per write)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Disk:
    name: str
    devnum: str  # "MAJ:MIN"
    scheduler: str | None  # the active one, e.g. "bfq", "none"


def disks() -> list[Disk]:
    """The fixed whole disks of this machine: ``/sys/block`` entries with a device behind them (not loop,
    ram, zram or device-mapper) that are not removable (not a CD-ROM: no task writes there)."""
    out = []
    for entry in sorted(SYS_BLOCK.iterdir()) if SYS_BLOCK.is_dir() else []:
        if not (entry / "device").exists() or _read(entry / "removable").strip() == "1":
            continue
        devnum = _read(entry / "dev").strip()
        match = re.search(r"\[(\w[\w-]*)\]", _read(entry / "queue" / "scheduler"))
        if devnum:
            out.append(Disk(entry.name, devnum, match.group(1) if match else None))
    return out


def _iocost_enabled(mount: Path) -> set[str]:
    """Devices (``MAJ:MIN``) with io.cost enabled at the root of the hierarchy."""
    enabled = set()
    for line in _read(mount / "io.cost.qos").splitlines():
        fields = line.split()
        if fields and "enable=1" in fields[1:]:
            enabled.add(fields[0])
    return enabled


def weight_problem(mount: Path, found: list[Disk]) -> str | None:
    """Why an IO weight would have no effect on some of ``found``, or None."""
    iocost = _iocost_enabled(mount)
    without = [d.name for d in found if d.scheduler != "bfq" and d.devnum not in iocost]
    if not found:
        return "worker.task_io_weight: no disk found to weigh IO on"
    if without:
        return (
            f"worker.task_io_weight has no effect on {', '.join(without)}: their IO scheduler is not BFQ and "
            "io.cost is not enabled for them (select bfq in /sys/block/DISK/queue/scheduler)"
        )
    return None


def host_problems(caps: TaskCaps) -> list[str]:
    """What this machine lacks to enforce ``caps`` (kernel and hierarchy; delegation is the worker's
    business at run time). Empty when nothing is capped or everything can be."""
    if not caps:
        return []
    mount = unified_mount()
    if mount is None:
        return ["cgroup v2 is not mounted on this host: per-task caps cannot be enforced"]
    available = set(_read(mount / "cgroup.controllers").split())
    problems = [
        f"cgroup v2 here has no {c} controller (it is bound to a cgroup v1 hierarchy or not built in): "
        f"{', '.join(k for k in caps.settings() if _needs(k) == c)} cannot be enforced"
        for c in sorted(caps.controllers() - available)
    ]
    if caps.io_weight is not None and "io" in available:
        problem = weight_problem(mount, disks())
        if problem:
            problems.append(problem)
    return problems


def _needs(key: str) -> str:
    return {"worker.task_cpu_quota": "cpu", "worker.task_memory_max": "memory"}.get(key, "io")


# ----------------------------------------------------------------------------------- task cgroups


def join(path: Path) -> None:
    """Move the calling process into the cgroup ``path`` (a task child does this first thing)."""
    _write(path / "cgroup.procs", "0")


def _writable(path: Path) -> bool:
    return all(os.access(p, os.W_OK) for p in (path, path / "cgroup.procs", path / "cgroup.subtree_control"))


def processes(path: Path) -> list[int]:
    return [int(p) for p in _read(path / "cgroup.procs").split()]


class TaskCgroups:
    """The worker's delegated cgroup ``base``: the worker in ``base/worker``, each task in
    ``base/task-<id>``."""

    def __init__(self, base: Path, caps: TaskCaps, problem: str | None = None) -> None:
        self.base = base
        self.caps = caps
        #: a cap that is set up but cannot take effect (an IO weight without BFQ/io.cost)
        self.problem = problem

    @classmethod
    def setup(cls, caps: TaskCaps) -> tuple[TaskCgroups | None, str | None]:
        """Take over this process's cgroup for task cgroups: (the manager, None) or (None, why not).

        Refuses a cgroup that is not ours alone (other processes in it: not delegated to us).
        """
        mount, own = unified_mount(), own_cgroup()
        if mount is None or own is None:
            return None, "cgroup v2 is not mounted on this host"
        base = mount / own.lstrip("/")
        if base.name == WORKER_LEAF and _writable(base.parent):
            base, own = base.parent, own.rsplit("/", 1)[0] or "/"  # set up before by this very process
        elif not _writable(base):
            return None, (
                f"the worker's cgroup {own} is not writable to it (not delegated: imaging-worker.service "
                "needs Delegate= and ProtectControlGroups=no)"
            )
        else:
            others = [p for p in processes(base) if p != os.getpid()]
            if others:
                return None, (
                    f"the worker's cgroup {own} also holds {len(others)} other process(es): it is not "
                    "delegated to the worker alone (run it as a systemd service with Delegate=)"
                )
        available = set(_read(base / "cgroup.controllers").split())
        missing = caps.controllers() - available
        if missing:
            return None, (
                f"the {', '.join(sorted(missing))} controller(s) are not available in the worker's cgroup "
                f"{own} (available: {', '.join(sorted(available)) or 'none'})"
            )
        try:
            leaf = base / WORKER_LEAF
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            wanted = [c for c in CONTROLLERS if c in available]
            if wanted:
                _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
        except OSError as exc:
            return None, f"cannot set up task cgroups under {own}: {exc.strerror or exc}"
        manager = cls(base, caps)
        manager.sweep()
        if caps.io_weight is not None:
            manager.problem = weight_problem(mount, disks())
        return manager, manager.problem

    def path_for(self, task_id: str) -> Path:
        return self.base / f"{TASK_PREFIX}{_TASK_NAME.sub('_', task_id)}"

    def create(self, task_id: str) -> Path:
        """A fresh cgroup for ``task_id`` with the caps written; raises OSError when that fails."""
        path = self.path_for(task_id)
        if path.exists():
            self.release(path)
        path.mkdir()
        try:
            self._apply(path)
        except BaseException:
            self.release(path)
            raise
        return path

    def _apply(self, path: Path) -> None:
        caps = self.caps
        if caps.cpu_quota is not None:
            _write(path / "cpu.max", cpu_max(caps.cpu_quota))
        if caps.memory_max is not None:
            _write(path / "memory.max", str(caps.memory_max))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting: nothing to cap
                _write(path / "memory.swap.max", "0")
        if caps.io_weight is not None:
            written = False
            for name, value in (("io.weight", caps.io_weight), ("io.bfq.weight", bfq_weight(caps.io_weight))):
                if (path / name).exists():
                    _write(path / name, f"default {value}")
                    written = True
            if not written:
                raise OSError(f"neither io.weight nor io.bfq.weight exists in {path}")
        if caps.io_read_bandwidth is not None or caps.io_write_bandwidth is not None:
            rbps = caps.io_read_bandwidth if caps.io_read_bandwidth is not None else "max"
            wbps = caps.io_write_bandwidth if caps.io_write_bandwidth is not None else "max"
            capped = []
            for disk in disks():
                try:
                    _write(path / "io.max", f"{disk.devnum} rbps={rbps} wbps={wbps}")
                    capped.append(disk.name)
                except OSError as exc:  # e.g. a device the io controller does not handle
                    log.warning("cannot cap IO on %s (%s): %s", disk.name, disk.devnum, exc.strerror or exc)
            if not capped:
                raise OSError("no disk accepted an io.max limit")

    def release(self, path: Path, timeout: float = 10.0) -> None:
        """Kill everything left in ``path`` and remove it (best effort; logged when it cannot)."""
        deadline = time.monotonic() + timeout
        while path.exists():
            left = processes(path)
            if left:
                if (path / "cgroup.kill").exists():
                    with contextlib.suppress(OSError):
                        _write(path / "cgroup.kill", "1")
                else:
                    for pid in left:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
            try:
                path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    log.error("cannot remove the task cgroup %s: processes %s remain", path, processes(path))
                    return
                time.sleep(0.02)

    def sweep(self) -> None:
        """Remove task cgroups a previous worker left (killing what they still hold)."""
        for path in self.base.glob(f"{TASK_PREFIX}*"):
            if path.is_dir():
                log.warning("removing leftover task cgroup %s", path)
                self.release(path)
