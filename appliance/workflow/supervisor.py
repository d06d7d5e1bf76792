"""Who owns a task, and the thread that keeps a running task's ownership and cancel state fresh.

An engine owns a task as ``hostname:pid`` with a lease in the store. While it runs the task, a
:class:`Supervisor` thread renews the lease (every third of its length) and polls the store for a
cancel request (``cancelling``, set by another process through ``Store.request_cancel``). A task
is an orphan when its owner process is gone from this host, or when its lease has expired (the
owner is on another host, or hung). :func:`find_orphans` lists them for ``Engine.recover``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from ..errors import StoreUnavailable
from ..store import Store, Task, TaskState
from ..timestamps import parse_time, utc_now
from .runner import TaskRun

log = logging.getLogger(__name__)


def owner_id() -> str:
    """This process as a task owner: ``hostname:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The state letter follows the parenthesised command name, which may contain spaces.
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def orphan_reason(task: Task, now: datetime | None = None) -> str | None:
    """Why ``task`` has no live owner, or ``None`` if it has one (or is not running)."""
    if task.state not in (TaskState.RUNNING, TaskState.CANCELLING):
        return None
    if not task.owner:
        return "it has no owner"
    host, _, pid = task.owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
        return f"its worker process {pid} on this host is gone"
    if task.lease_expires_at is None:
        return "it has no lease"
    now = now or utc_now()
    if parse_time(task.lease_expires_at) < now:
        return f"its owner {task.owner} stopped renewing its lease (expired {task.lease_expires_at})"
    return None


def find_orphans(store: Store) -> list[tuple[Task, str]]:
    """Running or cancelling tasks whose owner is dead or whose lease expired, with the reason."""
    out = []
    for task in store.list_tasks([TaskState.RUNNING, TaskState.CANCELLING], limit=None):
        reason = orphan_reason(task)
        if reason is not None:
            out.append((task, reason))
    return out


class Supervisor(threading.Thread):
    """Renews the lease and turns a cancel request in the store into the run's cancel event."""

    def __init__(self, run: TaskRun, owner: str, lease_seconds: float, poll_interval: float) -> None:
        super().__init__(name=f"supervisor {run.task_id}", daemon=True)
        self.task_run = run
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self._halt = threading.Event()

    def run(self) -> None:
        renew_every = max(self.poll_interval, self.lease_seconds / 3)
        since_renewal = 0.0
        unreachable = False
        while not self._halt.wait(self.poll_interval):
            since_renewal += self.poll_interval
            try:
                if self.task_run.store.get_task(self.task_run.task_id).state is TaskState.CANCELLING:
                    self.task_run.cancel.set()
                self.task_run.flush_progress()
                if since_renewal >= renew_every:
                    if not self.task_run.store.renew_lease(
                        self.task_run.task_id, self.owner, self.lease_seconds
                    ):
                        log.error(
                            "task %s: lost ownership (lease not renewable); stopping", self.task_run.task_id
                        )
                        self.task_run.lost_lease = True
                        self.task_run.cancel.set()
                    since_renewal = 0.0  # only once renewed: after an outage the next poll renews
            except StoreUnavailable as exc:
                # The database is away: the step goes on, the lease and progress catch up on the poll
                # that reaches it again (said once per outage).
                if not unreachable:
                    log.warning("task %s: task database unreachable: %s", self.task_run.task_id, exc.message)
                unreachable = True
                continue
            except Exception:
                # A transient database problem must not kill the heartbeat; the next poll retries.
                log.exception("task %s: supervisor poll failed", self.task_run.task_id)
            unreachable = False

    def stop(self) -> None:
        self._halt.set()
        self.join()


@contextmanager
def supervised(run: TaskRun, owner: str, lease_seconds: float, poll_interval: float) -> Iterator[None]:
    """Run the body with a :class:`Supervisor`, SIGINT/SIGTERM mapped to a cancel and SIGUSR1 to a
    suspend (the worker is shutting down: stop the step, keep the task for a resume)."""
    supervisor = Supervisor(run, owner, lease_seconds, poll_interval)
    supervisor.start()
    previous = {}
    if threading.current_thread() is threading.main_thread():

        def handler(signum: int, _frame: object) -> None:
            # Only set flags here: the main thread may hold the store's lock right now.
            run.signalled = signum
            run.cancel.set()

        def suspend(signum: int, _frame: object) -> None:
            run.suspended = True
            run.cancel.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, suspend)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        supervisor.stop()
