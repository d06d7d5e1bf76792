"""The task worker: claims pending tasks and runs each in a child process, recovers orphans.

``imaging worker`` runs :class:`Worker`. It never runs a workflow in its own process: each task
runs in a child (``python -m appliance.service.worker run|resume TASK_ID``) so that a crashing or hung
task cannot take the others down, and the concurrency limit is a count of children. The worker:

- at start, removes scratch directories of tasks that are over and the partial outputs
  (:mod:`appliance.partials`) killed task processes left, and every poll resumes orphaned tasks
  (their process died: a crash, a kill, a reboot) before it claims new ones;
- claims pending tasks oldest first up to ``worker.concurrency`` in one statement
  (:meth:`~appliance.store.Store.claim_pending`: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
  workers sharing the store claim disjoint tasks), each with a lease of ``worker.lease_seconds``
  and a new fencing epoch, and hands each to its task process, which takes the lease over; but none
  while ``qemu-img`` is
  missing (the appliance is then ``disabled`` and says why in its heartbeat and health), and none
  while the task database cannot be reached (``degraded``: it keeps polling, its running tasks go
  on, and it picks up where it was once the database answers again);
- waits ``worker.poll_interval`` between polls; on PostgreSQL it also listens for the store's
  doorbells (``LISTEN``): a new or released task wakes it at once, and a cancel of a task one of
  its children runs is passed on to that child (SIGUSR2: look at the store now);
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

The parts: :mod:`.children` (task processes and their cgroups), :mod:`.taskchild` (what runs in
one), :mod:`.configreload` (live configuration), :mod:`.sweeps` (crash leftovers); this module is
the loop that ties them together, and the reporter it starts.
"""

from __future__ import annotations

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
from typing import Protocol

from .. import config as config_mod
from .. import confine
from ..database import Listener
from ..errors import StoreUnavailable
from ..image.qemuimg import qemu_img_problem
from ..statedir import secure_state_dir
from ..store import CHANNEL_CANCEL, Lease, Store
from ..timestamps import utcnow
from ..workflow.supervisor import find_orphans, owner_id
from . import taskchild
from .children import SHUTDOWN_GRACE, TaskChildren
from .configreload import ConfigReload
from .heartbeat import write_heartbeat
from .sweeps import cleanup_scratch, sweep_mounts, sweep_partials, sweep_s3_staging
from .taskcgroup import TaskCaps, TaskCgroups
from .taskchild import EXIT_LEASE_LOST as EXIT_LEASE_LOST
from .taskchild import EXIT_STORE_UNAVAILABLE as EXIT_STORE_UNAVAILABLE
from .uploads import sweep_uploads

log = logging.getLogger(__name__)


class RunningReporter(Protocol):
    """A reporter thread the worker started; stopped when the worker stops."""

    def stop(self, timeout: float = 15.0) -> None: ...


#: starts the reporter for a configuration and store; returns None when reporting is off
ReporterFactory = Callable[[config_mod.Config, Store], RunningReporter | None]

#: seconds between two sweeps of expired staged uploads
UPLOAD_SWEEP_INTERVAL = 60.0
#: the longest the worker waits on the doorbell connection before looking at its stop flag
DOORBELL_SLICE = 0.5


class Worker(TaskChildren, ConfigReload):
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
        self._store: Store | None = None
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
        #: why the task database cannot be reached right now (None: it can)
        self.store_problem: str | None = None
        #: the start-up sweeps (scratch, partial outputs) ran: they need the database
        self._swept = False
        #: this worker as the owner of the tasks it claims (until its task process takes them over)
        self.owner = owner_id()
        #: the doorbell connection (PostgreSQL), opened on demand, dropped when it breaks
        self._listener: Listener | None = None
        #: tasks this worker claimed and handed to a child that has not taken the lease over yet
        #: (its start-up may outlast a short lease): the worker renews those leases meanwhile
        self._handed: dict[str, Lease] = {}
        #: polls that claimed tasks, and of those, how many a doorbell started (not the timer)
        self.claims = 0
        self.woken_claims = 0
        self._woken = False
        #: when the expired staged uploads were last swept (monotonic; None: not yet)
        self._uploads_swept: float | None = None
        self._s3_swept: float | None = None

    @property
    def store(self) -> Store:
        """The task database, opened on first use (:class:`StoreUnavailable` while it cannot be)."""
        if self._store is None:
            self._store = Store(self.config.store)
        return self._store

    # -- one poll -------------------------------------------------------------------------------

    def poll(self) -> None:
        """Reap children, resume orphans, claim pending tasks, write the heartbeat.

        While the task database cannot be reached nothing is resumed or claimed (the children
        running tasks go on, and each keeps its task); the heartbeat says ``degraded`` and why."""
        self._reap()
        qemu_problem = qemu_img_problem()
        try:
            self._poll_store(claim=qemu_problem is None)
        except StoreUnavailable as exc:
            if self.store_problem is None:
                log.warning("task database unreachable, claiming no tasks until it is back: %s", exc.message)
            self.store_problem = exc.message
        else:
            if self.store_problem is not None:
                log.warning("task database reachable again; claiming tasks")
            self.store_problem = None
        if qemu_problem is not None:
            self.status, self.reason = "disabled", qemu_problem
        elif self.store_problem is not None:
            self.status = "degraded"
            self.reason = f"task database unreachable, claiming no tasks: {self.store_problem}"
        else:
            self.status, self.reason = "ok", None
        self.write_heartbeat()

    def _poll_store(self, *, claim: bool) -> None:
        """The part of a poll that needs the task database."""
        store = self.store
        if not self._swept:
            self.cleanup_scratch()
            self.sweep_partials()
            self._swept = True
        # Before orphans resume: a killed task's guest mounts must be gone before it runs again. A sweep
        # that fails (a lock file this user may not open, a hanging umount, a missing tool) must not
        # stop the worker from claiming tasks and beating: it is logged and retried on the next poll.
        try:
            sweep_mounts(self.config, store)
        except StoreUnavailable:
            raise
        except Exception:
            log.exception("sweeping leftover guest mounts failed; retrying on the next poll")
        self.sweep_uploads()
        for task_id, lease in list(self._handed.items()):
            # renewed while the child starts; False once it took the lease over (or lost it)
            if not store.renew_lease(task_id, lease.owner, self.config.lease_seconds, epoch=lease.epoch):
                del self._handed[task_id]
        for task, why in find_orphans(store):
            if task.id in self.children or not self._free_slots():
                continue
            log.warning("task %s: resuming because %s", task.id, why)
            self._spawn("resume", task.id)
        if claim and self._free_slots():
            claimed = store.claim_pending(self.owner, self._free_slots(), self.config.lease_seconds)
            if claimed:
                self.claims += 1
                self.woken_claims += int(self._woken)
            for task in claimed:  # oldest first
                self._spawn("run", task.id, task.lease)
        # last: its S3 calls (boto's timeouts and retries against an endpoint that hangs) must not hold
        # back the lease renewals of the children starting above, nor the claims
        self.sweep_s3_staging()

    def wait(self, stop: threading.Event) -> None:
        """Wait until the next poll: ``worker.poll_interval``, cut short by ``stop`` and, with a
        PostgreSQL store, by a doorbell (a new or released task; a cancel is passed on to the child
        running that task and waiting goes on). Doorbells are hints: what they announce is read
        from the store by the poll, and polling still finds what a lost doorbell announced."""
        deadline = time.monotonic() + self.config.worker.poll_interval
        self._woken = False
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            fresh = self._listener is None
            listener = self._doorbell()
            if listener is None:
                stop.wait(remaining)
                return
            if fresh:
                return  # poll once more: what was announced before the LISTEN was not heard
            try:
                rung = listener.wait(min(remaining, DOORBELL_SLICE))
            except StoreUnavailable:
                with contextlib.suppress(Exception):
                    listener.close()
                self._listener = None
                continue
            wake = False
            for channel, payload in rung:
                if channel == CHANNEL_CANCEL:
                    self._pass_cancel(payload)
                else:
                    wake = True
            if wake and self._free_slots():
                self._woken = True
                return

    def _doorbell(self) -> Listener | None:
        """The doorbell connection, opened if need be (None on SQLite or while the store is away)."""
        if self._listener is None and self._store is not None and self.store_problem is None:
            try:
                self._listener = self._store.listen()
            except StoreUnavailable:
                return None
        return self._listener

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

    def sweep_uploads(self) -> list[Path]:
        """Remove expired staged uploads no active import reads: on the first poll, then every
        :data:`UPLOAD_SWEEP_INTERVAL` seconds (a failure is logged and retried on the next poll)."""
        now = time.monotonic()
        if self._uploads_swept is not None and now - self._uploads_swept < UPLOAD_SWEEP_INTERVAL:
            return []
        try:
            removed = sweep_uploads(self.config, self.store)
        except StoreUnavailable:
            raise
        except Exception:
            log.exception("sweeping expired uploads failed; retrying on the next poll")
            return []
        self._uploads_swept = now
        return removed

    def sweep_s3_staging(self) -> list[str]:
        """Remove the staging uploads of streamed imports into S3 whose task is over (see
        :func:`sweep_s3_staging`): on the first poll, then every :data:`UPLOAD_SWEEP_INTERVAL` seconds
        (an S3 failure is logged and retried on the next poll)."""
        now = time.monotonic()
        if self._s3_swept is not None and now - self._s3_swept < UPLOAD_SWEEP_INTERVAL:
            return []
        try:
            removed = sweep_s3_staging(self.config, self.store)
        except StoreUnavailable:
            raise
        except Exception:
            log.exception("sweeping stale S3 staging uploads failed; retrying on the next poll")
            return []
        self._s3_swept = now
        return removed

    def sweep_partials(self) -> list[Path]:
        """Remove partial outputs that killed task processes left (see :func:`sweep_partials`)."""
        return sweep_partials(self.store)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set, then shut the children down (suspend, then kill).

        The start-up sweeps (scratch directories, partial outputs) run on the first poll that
        reaches the task database."""
        secure_state_dir(self.config.state_dir)  # private, also what an older installation left
        self.setup_cgroups()  # before any thread or child exists: the worker moves to a leaf cgroup
        if threading.current_thread() is threading.main_thread():
            # Children inherit SIGUSR2 ignored until their task's supervisor handles it: a cancel
            # passed on (SIGUSR2) while a child is still starting must not kill it.
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        reporter = None
        try:
            while not stop.is_set():
                try:
                    self.reload_config()
                except Exception:
                    log.exception("reloading the configuration failed; keeping the running one")
                if reporter is not None and self.reporter_stale:
                    # not waited for: it ends its request in flight in the background (report.handover)
                    reporter.stop(timeout=0)
                    reporter = None
                self.reporter_stale = False
                try:
                    self.poll()
                except Exception:
                    log.exception("worker poll failed; retrying")
                if reporter is None and self.start_reporter is not None and self._store is not None:
                    # The reporter (controller.mode push or pull) is a thread of this process. It
                    # starts after the first poll so that its first heartbeat reads a fresh worker
                    # heartbeat instead of reporting the worker as missing, and once the task
                    # database has been opened.
                    try:
                        reporter = self.start_reporter(self.config, self._store)
                    except StoreUnavailable as exc:
                        log.warning("reporter not started yet: %s", exc.message)
                self.wait(stop)
        finally:
            if self._listener is not None:
                with contextlib.suppress(Exception):
                    self._listener.close()
                self._listener = None
            try:
                self.shutdown()
            finally:
                if reporter is not None:
                    reporter.stop()

    def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Ask children to suspend their tasks; kill those still running after ``grace`` seconds."""
        self.stop_children(grace)
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


if __name__ == "__main__":
    sys.exit(taskchild.main())
