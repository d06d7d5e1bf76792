"""The worker's task children: starting each task in a process (and a cgroup) of its own, reaping
the ones that ended and killing what they left behind, passing a cancel on, and stopping them all
when the worker stops. :class:`TaskChildren` is the part of :class:`~.worker.Worker` that does it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..store import Lease
from . import taskcgroup
from .taskcgroup import TaskCaps, TaskCgroups

log = logging.getLogger(__name__)

#: seconds the children get to stop their step and release their task on shutdown
SHUTDOWN_GRACE = 10.0


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether a child has exited, leaving it a zombie (``WNOWAIT``) so that its pid (= its process
    group's id) cannot be reused before its group has been killed; True too when its status was
    already collected."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class TaskChildren:
    """Task children and their cgroups (the state is the :class:`~.worker.Worker`'s, set up in its
    ``__init__``)."""

    config: config_mod.Config
    concurrency: int
    #: task id → the process running it
    children: dict[str, subprocess.Popen[bytes]]
    caps: TaskCaps
    #: the task cgroups (None: the worker's cgroup is not delegated to it, or they failed)
    cgroups: TaskCgroups | None
    #: task id → its cgroup
    task_cgroups: dict[str, Path]
    #: task children could not join their cgroups: new tasks run without
    cgroups_failed: bool
    #: why the per-task caps are not (all) enforced
    limits_reason: str | None
    #: tasks claimed and handed to a child that has not taken the lease over yet
    _handed: dict[str, Lease]

    # -- per-task cgroups -----------------------------------------------------------------------

    def setup_cgroups(self) -> None:
        """Take over the worker's cgroup for task cgroups where it is delegated (see taskcgroup)."""
        self.cgroups, reason = TaskCgroups.setup(self.caps)
        if self.cgroups is not None:
            log.info("task cgroups under %s", self.cgroups.base)
        if self.caps and reason:
            self.limits_reason = reason
            log.warning("per-task caps %s are not enforced: %s", self.caps.settings(), reason)
        elif reason:
            log.info("tasks run without cgroups of their own: %s", reason)

    def task_limits(self) -> dict[str, Any]:
        """The heartbeat's account of the per-task caps."""
        return {
            "caps": self.caps.settings(),
            "enforced": bool(self.caps)
            and self.cgroups is not None
            and not self.cgroups_failed
            and self.limits_reason is None,
            "cgroup": str(self.cgroups.base) if self.cgroups is not None else None,
            "reason": self.limits_reason,
        }

    # -- children -------------------------------------------------------------------------------

    def _spawn(self, verb: str, task_id: str, lease: Lease | None = None) -> None:
        argv = [sys.executable, "-m", "appliance.service.worker", verb, task_id]
        if lease is not None:
            argv += ["--owner", lease.owner, "--epoch", str(lease.epoch)]
            self._handed[task_id] = lease
        if self.config.source is not None:
            argv += ["--config", str(self.config.source)]
        if self.cgroups is not None and not self.cgroups_failed:
            try:
                cgroup = self.cgroups.create(task_id)
            except OSError as exc:
                self.limits_reason = f"cannot create the cgroup of task {task_id}: {exc.strerror or exc}"
                log.error("task %s: %s; it runs without its caps", task_id, self.limits_reason)
            else:
                self.task_cgroups[task_id] = cgroup
                argv += ["--cgroup", str(cgroup)]
        log.info("task %s: %s in a child process", task_id, verb)
        try:
            # Own process group: a shutdown can kill the child and anything it started together.
            self.children[task_id] = subprocess.Popen(argv, start_new_session=True)
        except BaseException:
            self._release_cgroup(task_id)
            self._handed.pop(task_id, None)  # no child runs it: its lease must be left to run out
            raise

    def _reap(self) -> None:
        for task_id, proc in list(self.children.items()):
            # WNOWAIT: the exited child stays a zombie, so its pid (= its process group's id) cannot be
            # reused before the group has been killed
            if not _exited(proc):
                continue
            self._kill_leftovers(task_id, proc)
            proc.wait()
            level = logging.INFO if proc.returncode == 0 else logging.WARNING
            log.log(level, "task %s: child exited with %s", task_id, proc.returncode)
            del self.children[task_id]
            self._handed.pop(task_id, None)
            if proc.returncode == taskcgroup.EXIT_CGROUP_JOIN_FAILED:
                self.limits_reason = "task children cannot join their cgroups (see the task's log)"
                log.error("%s; further tasks run without cgroups", self.limits_reason)
                self.cgroups_failed = True

    def _kill_leftovers(self, task_id: str, proc: subprocess.Popen[bytes]) -> None:
        """Kill what a child that ended left behind: its process group, then its cgroup."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._release_cgroup(task_id)

    def _release_cgroup(self, task_id: str) -> None:
        cgroup = self.task_cgroups.pop(task_id, None)
        if cgroup is not None and self.cgroups is not None:
            self.cgroups.release(cgroup)

    def _free_slots(self) -> int:
        return max(0, self.concurrency - len(self.children))

    def _pass_cancel(self, task_id: str) -> None:
        proc = self.children.get(task_id)
        # not poll()/send_signal(): they collect an exited child's status, which _reap needs
        if proc is not None and not _exited(proc):
            log.info("task %s: cancel requested; telling its process", task_id)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGUSR2)

    def stop_children(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Ask children to suspend their tasks; kill those still running after ``grace`` seconds."""
        for proc in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + grace
        for task_id, proc in self.children.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("task %s: child did not stop within %.0fs; killing it", task_id, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self._release_cgroup(task_id)
        self.children.clear()
