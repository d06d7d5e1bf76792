"""Who owns a task, and the thread that keeps a running task's ownership and cancel state fresh.

An engine owns a task as ``hostname:pid`` with a lease in the store. While it runs the task, a
:class:`Supervisor` thread renews the lease (every third of its length) and polls the store for a
cancel request every ``poll_interval`` (``cancelling``, set by another process through
``Store.request_cancel``; SIGUSR2 makes it look at once: the worker sends it when a cancel's doorbell
rings) and for the task's owner
and fencing epoch: when another worker has claimed the task the run learns it lost the lease and
stops. A task is an orphan when its owner process is gone from this host, or when its lease has
expired (the owner is on another host, or hung, or stopped). :func:`find_orphans` lists them for
``Engine.recover``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from ..errors import LeaseLost, StoreUnavailable
from ..pids import pid_alive
from ..store import Store, Task, TaskState
from ..timestamps import parse_time, utc_now
from .runner import PROGRESS_DB_INTERVAL, TaskRun

log = logging.getLogger(__name__)

#: seconds between two attempts at an overdue lease renewal (the task database did not answer)
RENEWAL_RETRY = 1.0


def owner_id() -> str:
    """This process as a task owner: ``hostname:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
        #: set to wake the thread: with :attr:`look` (:meth:`look_now`), by :meth:`stop`, and by the run
        #: when the throttle begins to hold progress back
        self.wake = threading.Event()
        #: look at the store now (SIGUSR2, the first look) rather than at the next poll
        self.look = False

    def look_now(self) -> None:
        """Look at the store now rather than at the next poll (only sets flags: safe in a signal handler)."""
        self.look = True
        self.wake.set()

    def run(self) -> None:
        renew_every = self.lease_seconds / 3
        run = self.task_run
        run.on_progress_held = self.wake.set
        epoch = run.lease.epoch if run.lease is not None else None
        last = last_poll = time.monotonic()
        since_renewal = 0.0
        unreachable = False
        while True:
            # A poll interval longer than a third of the lease (a store whose doorbells deliver the
            # cancels) must not let the lease run out: the renewal wakes the thread on its own; one
            # overdue (the store was away) is retried every RENEWAL_RETRY seconds at most. Nor may it
            # leave a stalled step's last figures unwritten: progress the throttle held back wakes the
            # thread once it has been held for the throttle's interval.
            now = time.monotonic()
            due = renew_every - since_renewal - (now - last)
            wait = min(self.poll_interval - (now - last_poll), due if due > 0 else RENEWAL_RETRY)
            held = run.progress_held_since()
            if held is not None:
                wait = min(wait, held + PROGRESS_DB_INTERVAL - now)
            self.wake.wait(max(0.0, wait))
            self.wake.clear()
            if self._halt.is_set():
                break
            look, self.look = self.look, False
            now = time.monotonic()
            since_renewal += now - last
            last = now
            if not look and now - last_poll < self.poll_interval and since_renewal < renew_every:
                held = run.progress_held_since()
                if held is not None and now - held >= PROGRESS_DB_INTERVAL and not self._flush_only():
                    break
                continue  # (woken as progress began to be held: the wait is now until it is due)
            last_poll = now
            try:
                task = run.store.get_task(run.task_id)
                if task.owner != self.owner or (epoch is not None and task.epoch != epoch):
                    run.lose_lease()  # another worker claimed it: no renewal, no more writes
                    break
                if task.state is TaskState.CANCELLING:
                    run.cancel.set()
                run.flush_progress()
                if since_renewal >= renew_every:
                    if not run.store.renew_lease(run.task_id, self.owner, self.lease_seconds, epoch=epoch):
                        run.lose_lease()
                        break
                    since_renewal = 0.0  # only once renewed: after an outage the next poll renews
            except LeaseLost:
                run.lose_lease()
                break
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

    def _flush_only(self) -> bool:
        """Write the held-back progress without looking at the store (no poll is due); False: the
        lease is lost."""
        try:
            self.task_run.flush_progress()
        except LeaseLost:
            self.task_run.lose_lease()
            return False
        except StoreUnavailable:
            pass  # kept, held from now: the next flush or poll retries
        except Exception:
            log.exception("task %s: progress flush failed", self.task_run.task_id)
        return True

    def stop(self) -> None:
        self._halt.set()
        self.wake.set()
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

        def look(signum: int, _frame: object) -> None:
            supervisor.look_now()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, suspend)
        previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, look)
        # one look now: a task process ignores SIGUSR2 until here (the worker's children inherit it
        # ignored), so a cancel whose doorbell rang since the task was read would otherwise wait for the
        # poll, which may be long (worker.task_poll_interval) where the doorbells deliver the cancels
        supervisor.look_now()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        supervisor.stop()
