"""The task worker: claims pending tasks and runs each in a child process, recovers orphans.

``imaging worker`` runs :class:`Worker`. It never runs a workflow in its own process: each task
runs in a child (``python -m appliance.service.worker run|resume TASK_ID``) so that a crashing or hung
task cannot take the others down, and the concurrency limit is a count of children. The worker:

- at start, removes scratch directories of tasks that are over and the partial outputs
  (:mod:`appliance.partials`) killed task processes left, and every poll resumes orphaned tasks
  (their process died: a crash, a kill, a reboot) before it claims new ones;
- claims pending tasks oldest first up to ``worker.concurrency``, but none while ``qemu-img`` is
  missing (the appliance is then ``disabled`` and says why in its heartbeat and health);
- writes a heartbeat file (``STATE_DIR/worker.json``) every poll, read by ``GET /v1/health``;
- on SIGTERM/SIGINT stops claiming and asks its children to *suspend* (SIGUSR1): the step in
  progress stops, nothing is undone, and the task resumes when a worker starts again. Children
  still running after ``SHUTDOWN_GRACE`` seconds are killed with their process groups;
- runs each child in a cgroup of its own with the per-task caps (``worker.task_*``) where its cgroup is
  delegated to it (:mod:`appliance.service.taskcgroup`), and reports in its heartbeat whether the caps
  are enforced (and why not) and how untrusted-input parsers are isolated (:mod:`appliance.confine`);
- re-reads its configuration file between polls when it changed (a live configuration update,
  :mod:`appliance.boot.live`): the concurrency and poll interval apply to the next claims, the
  reporter restarts on a changed ``controller`` section, and new task children get the new file
  while running ones keep the configuration they started with. Per-task caps apply from the next
  worker start (its task cgroups are set up once); a file that no longer loads is logged and the
  running configuration kept;
- when a child ends, for whatever reason, kills what it left behind: its process group and its cgroup.
  The parsers it started (qemu-img, the guest probe, the decompressor) also die with it by their
  parent-death signal, so a task child killed alone leaves none of them running.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .. import config as config_mod
from .. import confine, partials, redact
from ..errors import ImagingError
from ..guest.mount import sweep_stale
from ..image.qemuimg import qemu_img_problem
from ..scratch import ScratchSpace
from ..store import Store, TaskState
from ..timestamps import utcnow
from ..workflow.engine import Engine
from ..workflow.supervisor import find_orphans, orphan_reason
from . import taskcgroup
from .heartbeat import write_heartbeat
from .taskcgroup import TaskCaps, TaskCgroups

log = logging.getLogger(__name__)


class RunningReporter(Protocol):
    """A reporter thread the worker started; stopped when the worker stops."""

    def stop(self, timeout: float = 15.0) -> None: ...


#: starts the reporter for a configuration and store; returns None when reporting is off
ReporterFactory = Callable[[config_mod.Config, Store], RunningReporter | None]

#: seconds the children get to stop their step and release their task on shutdown
SHUTDOWN_GRACE = 10.0


def cleanup_scratch(config: config_mod.Config, store: Store) -> list[Path]:
    """Remove scratch directories whose task is over or unknown: leftovers of crashed runs.

    Directories of tasks that may still resume (pending, running, cancelling) are kept.
    """

    def live(task_id: str) -> bool:
        try:
            return not store.get_task(task_id).state.terminal
        except ImagingError:
            return False

    removed = ScratchSpace.from_config(config).cleanup_orphans(keep=live)
    for path in removed:
        log.info("removed orphaned scratch directory %s", path)
    return removed


def sweep_partials(store: Store) -> list[Path]:
    """Remove the partial outputs (``.NAME.partial-XXXXXXXX``, named in cleanup ledgers) that killed
    task processes left, of every task no live process runs; each removal goes into its task's ledger."""

    def running(task_id: str) -> bool:
        try:
            task = store.get_task(task_id)
        except ImagingError:
            return False
        return task.state in (TaskState.RUNNING, TaskState.CANCELLING) and orphan_reason(task) is None

    return partials.sweep(store, keep=running)


def sweep_mounts(config: config_mod.Config, store: Store) -> list[str]:
    """Unmount and detach what killed task processes left mounted (guest chroots, loop devices);
    each undone resource goes into its task's cleanup ledger as removed."""

    def ledger(owner: str, action: str, resource: str) -> None:
        try:
            store.get_task(owner)
        except ImagingError:
            return  # the owner was not a task (a CLI run): the log line is the record
        store.add_ledger(owner, action, resource, step="recovery")

    cleaned = sweep_stale(config.state_dir, ledger)
    for line in cleaned:
        log.warning("crash leftover cleaned: %s", line)
    return cleaned


class Worker:
    """Claims and supervises tasks; see the module docstring."""

    def __init__(
        self,
        config: config_mod.Config,
        *,
        concurrency: int | None = None,
        start_reporter: ReporterFactory | None = None,
    ) -> None:
        self.config = config
        self.concurrency = concurrency or config.worker.concurrency
        #: ``--concurrency``: it wins over the configuration file, also after a reload
        self.concurrency_override = concurrency
        self._config_stamp = self._stamp()
        #: the controller section changed: the reporter restarts on the new one
        self.reporter_stale = False
        #: starts the reporter to the controller (``imaging worker`` passes the report package's);
        #: the service does not depend on how the appliance reports
        self.start_reporter = start_reporter
        self.store = Store(config.db_path)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.started_at = utcnow()
        self.status = "starting"
        self.reason: str | None = None
        self.caps = TaskCaps.from_config(config.worker)
        #: the task cgroups (None: the worker's cgroup is not delegated to it, or they failed)
        self.cgroups: TaskCgroups | None = None
        #: task id → its cgroup
        self.task_cgroups: dict[str, Path] = {}
        #: task children could not join their cgroups: new tasks run without
        self.cgroups_failed = False
        #: why the per-task caps are not (all) enforced
        self.limits_reason: str | None = None

    # -- live configuration ---------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        if self.config.source is None:
            return None
        try:
            st = os.stat(self.config.source)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload_config(self) -> bool:
        """Re-read the configuration file if it changed since it was read; True when it was taken."""
        stamp = self._stamp()
        if stamp is None or stamp == self._config_stamp or self.config.source is None:
            return False
        self._config_stamp = stamp
        try:
            new = config_mod.load(self.config.source)
        except ImagingError as exc:
            log.error(
                "configuration %s changed but does not load; keeping the running one: %s",
                self.config.source,
                exc.message,
            )
            return False
        if new.state_dir != self.config.state_dir:
            log.error(
                "configuration %s moves state_dir: that needs a restart; keeping the running one",
                self.config.source,
            )
            return False
        if new.controller != self.config.controller:
            self.reporter_stale = True
        if TaskCaps.from_config(new.worker) != self.caps:
            log.warning("per-task caps changed: they apply from the next worker start")
        self.config = new
        self.concurrency = self.concurrency_override or new.worker.concurrency
        log.info("configuration %s reloaded: concurrency %d", new.source, self.concurrency)
        return True

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

    def _spawn(self, verb: str, task_id: str) -> None:
        argv = [sys.executable, "-m", "appliance.service.worker", verb, task_id]
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
            raise

    def _reap(self) -> None:
        for task_id, proc in list(self.children.items()):
            # WNOWAIT: the exited child stays a zombie, so its pid (= its process group's id) cannot be
            # reused before the group has been killed
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                continue
            self._kill_leftovers(task_id, proc)
            proc.wait()
            log.info("task %s: child exited with %s", task_id, proc.returncode)
            del self.children[task_id]
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

    # -- one poll -------------------------------------------------------------------------------

    def poll(self) -> None:
        """Reap children, resume orphans, claim pending tasks, write the heartbeat."""
        self._reap()
        # Before orphans resume: a killed task's guest mounts must be gone before it runs again. A sweep
        # that fails (a lock file this user may not open, a hanging umount, a missing tool) must not
        # stop the worker from claiming tasks and beating: it is logged and retried on the next poll.
        try:
            sweep_mounts(self.config, self.store)
        except Exception:
            log.exception("sweeping leftover guest mounts failed; retrying on the next poll")
        self.reason = qemu_img_problem()
        self.status = "disabled" if self.reason else "ok"
        for task, why in find_orphans(self.store):
            if task.id in self.children or not self._free_slots():
                continue
            log.warning("task %s: resuming because %s", task.id, why)
            self._spawn("resume", task.id)
        if self.status == "ok":
            pending = self.store.list_tasks(TaskState.PENDING, limit=None)
            for task in reversed(pending):  # oldest first
                if not self._free_slots():
                    break
                if task.id not in self.children:
                    self._spawn("run", task.id)
        self.write_heartbeat()

    def write_heartbeat(self) -> None:
        beat = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": self.started_at,
            "updated_at": utcnow(),
            "status": self.status,
            "reason": self.reason,
            "concurrency": self.concurrency,
            "running": sorted(self.children),
            "poll_interval": self.config.worker.poll_interval,
            "task_limits": self.task_limits(),
            "confinement": confine.isolation().to_dict(),
        }
        write_heartbeat(self.config, beat)

    def cleanup_scratch(self) -> list[Path]:
        """Remove scratch directories of tasks that are over or unknown (crash leftovers)."""
        return cleanup_scratch(self.config, self.store)

    def sweep_partials(self) -> list[Path]:
        """Remove partial outputs that killed task processes left (see :func:`sweep_partials`)."""
        return sweep_partials(self.store)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set, then shut the children down (suspend, then kill)."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.setup_cgroups()  # before any thread or child exists: the worker moves to a leaf cgroup
        self.cleanup_scratch()
        self.sweep_partials()
        reporter = None
        try:
            while not stop.is_set():
                try:
                    self.reload_config()
                except Exception:
                    log.exception("reloading the configuration failed; keeping the running one")
                if reporter is not None and self.reporter_stale:
                    reporter.stop()
                    reporter = None
                self.reporter_stale = False
                try:
                    self.poll()
                except Exception:
                    log.exception("worker poll failed; retrying")
                if reporter is None and self.start_reporter is not None:
                    # The reporter (controller.mode push or pull) is a thread of this process. It
                    # starts after the first poll so that its first heartbeat reads a fresh worker
                    # heartbeat instead of reporting the worker as missing.
                    reporter = self.start_reporter(self.config, self.store)
                stop.wait(self.config.worker.poll_interval)
        finally:
            try:
                self.shutdown()
            finally:
                if reporter is not None:
                    reporter.stop()

    def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
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
        self.status = "stopped"
        with contextlib.suppress(OSError):
            self.write_heartbeat()


def run_worker(
    config: config_mod.Config,
    concurrency: int | None = None,
    start_reporter: ReporterFactory | None = None,
) -> int:
    """``imaging worker``: run until SIGTERM/SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Worker(config, concurrency=concurrency, start_reporter=start_reporter).run(stop)
    return 0


def _child(argv: list[str] | None = None) -> int:
    """Entry of a child process: run or resume one task to its end (or to a suspend)."""
    p = argparse.ArgumentParser(prog="python -m appliance.service.worker")
    p.add_argument("verb", choices=("run", "resume"))
    p.add_argument("task_id")
    p.add_argument("--config")
    p.add_argument("--cgroup", help="the task's cgroup, which the child joins before anything else")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="imaging-task %(levelname)s %(name)s: %(message)s")
    redact.install_logging()
    if args.cgroup:
        try:
            taskcgroup.join(Path(args.cgroup))
        except OSError as exc:
            log.error(
                "task %s: cannot join its cgroup %s: %s", args.task_id, args.cgroup, exc.strerror or exc
            )
            return taskcgroup.EXIT_CGROUP_JOIN_FAILED
    logging.getLogger("oslo_utils").setLevel(logging.ERROR)
    cfg = config_mod.load(args.config)
    engine = Engine(cfg)
    try:
        task = engine.run(args.task_id) if args.verb == "run" else engine.resume(args.task_id)
    except ImagingError as exc:  # e.g. another worker claimed it first
        log.warning("task %s: not run here: %s", args.task_id, exc)
        return 1
    log.info("task %s: %s", task.id, task.state)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
