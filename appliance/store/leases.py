"""Leases: claiming tasks, adopting, renewing and releasing claims."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ..database import (
    POSTGRESQL,
)
from ..errors import (
    IncorrectState,
    LeaseLost,
)
from ..timestamps import format_time, utc_now, utcnow
from .base import StoreBase
from .model import Lease, Task, TaskState
from .schema import CHANNEL_TASKS


class LeaseOps(StoreBase):
    """Claiming tasks and keeping or giving up the claim."""

    def claim(
        self, task_id: str, owner: str, lease_seconds: float, *, expected_owner: str | None = None
    ) -> Task:
        """Take ownership of a task for ``lease_seconds`` and count an attempt.

        A ``pending`` task becomes ``running``. A ``running``/``cancelling`` one can only be taken
        over from ``expected_owner`` (the dead or expired owner the caller found), which makes the
        takeover a compare-and-swap: of two recoverers only one wins. The decision is the one
        ``UPDATE`` below, whose condition names the state and the previous owner; the row read
        before it only words the refusal. Every claim moves the task's fencing epoch on: the
        returned task's :attr:`Task.lease` is the new owner's, held by this store from now on, and
        the previous owner's writes are refused (:class:`LeaseLost`). Taking a running task over
        is recorded as a ``task.takeover`` event.
        """
        now = utc_now()
        stamp = format_time(now)
        expires = format_time(now + timedelta(seconds=lease_seconds))
        with self._write() as conn:
            row = self._task_row(conn, task_id, lock=True)
            current = TaskState(row["state"])
            if current.terminal:
                raise IncorrectState(f"task {task_id} is {current} and cannot be claimed")
            if current is not TaskState.PENDING and row["owner"] != expected_owner:
                raise IncorrectState(f"task {task_id} is {current} and owned by {row['owner']}")
            claimed = conn.execute(
                "UPDATE tasks SET owner = ?, lease_expires_at = ?, attempts = attempts + 1, updated_at = ?,"
                " epoch = epoch + 1,"
                " started_at = CASE WHEN state = 'pending' THEN ? ELSE started_at END,"
                " state = CASE WHEN state = 'pending' THEN 'running' ELSE state END"
                " WHERE id = ? AND (state = 'pending'"
                f" OR (state IN ('running', 'cancelling') AND {self._sql('owner_is')})) RETURNING *",
                (owner, expires, stamp, stamp, task_id, expected_owner),
            ).fetchone()
            if claimed is None:
                raise IncorrectState(f"task {task_id} was claimed by another worker meanwhile")
            task = Task.from_row(claimed)
            data = {
                "owner": owner,
                "attempt": task.attempts,
                "previous_owner": row["owner"],
                "epoch": task.epoch,
            }
            self._event(conn, task_id, "task.claimed", data, stamp)
            if current is TaskState.PENDING:
                self._event(conn, task_id, "task.state", {"state": "running", "previous": "pending"}, stamp)
            else:
                takeover = {
                    "owner": owner,
                    "previous_owner": row["owner"],
                    "previous_epoch": row["epoch"],
                    "epoch": task.epoch,
                }
                self._event(conn, task_id, "task.takeover", takeover, stamp)
        self.hold(task_id, task.lease)
        return task

    def claim_pending(self, owner: str, limit: int, lease_seconds: float) -> list[Task]:
        """Claim up to ``limit`` pending tasks, oldest first, for ``owner`` (a worker): each becomes
        ``running`` with a lease of ``lease_seconds``, an attempt counted and its epoch moved on.

        One statement decides: on PostgreSQL ``SELECT … FOR UPDATE SKIP LOCKED`` (workers claiming
        at the same time get disjoint tasks without waiting for each other; fewer than ``limit``
        means "nothing more available now", not "the queue is empty"); on SQLite the single write
        transaction. The worker hands each task to a process of its own, which takes the lease
        over with :meth:`adopt`."""
        if limit <= 0:
            return []
        now = utc_now()
        stamp = format_time(now)
        expires = format_time(now + timedelta(seconds=lease_seconds))
        assignments = (
            "owner = ?, lease_expires_at = ?, attempts = attempts + 1, epoch = epoch + 1, updated_at = ?,"
            " started_at = COALESCE(started_at, ?), state = 'running'"
        )
        sql = self._sql("claim_pending").format(set=assignments)
        with self._write() as conn:
            values = (owner, expires, stamp, stamp)
            # the LIMIT comes first in PostgreSQL's statement (its CTE), last in SQLite's
            args = (limit, *values) if conn.dialect == POSTGRESQL else (*values, limit)
            rows = conn.execute(sql, args).fetchall()
            tasks = sorted((Task.from_row(r) for r in rows), key=lambda t: (t.created_at, t.id))
            for task in tasks:
                data = {"owner": owner, "attempt": task.attempts, "previous_owner": None, "epoch": task.epoch}
                self._event(conn, task.id, "task.claimed", data, stamp)
                self._event(conn, task.id, "task.state", {"state": "running", "previous": "pending"}, stamp)
        return tasks

    def adopt(self, task_id: str, lease: Lease, owner: str, lease_seconds: float) -> Task:
        """Take the lease ``lease`` over as ``owner`` within the same epoch (the worker claimed the
        task, its task process runs it): a fenced write, :class:`LeaseLost` when the epoch moved on
        meanwhile. The lease is held by this store from now on."""
        expires = format_time(utc_now() + timedelta(seconds=lease_seconds))
        with self._write() as conn:
            row = conn.execute(
                "UPDATE tasks SET owner = ?, lease_expires_at = ?, updated_at = ?"
                " WHERE id = ? AND owner = ? AND epoch = ? AND state IN ('running', 'cancelling')"
                " RETURNING *",
                (owner, expires, utcnow(), task_id, lease.owner, lease.epoch),
            ).fetchone()
            if row is None:
                raise LeaseLost(
                    f"task {task_id}: {lease.owner} (epoch {lease.epoch}) no longer holds it; not taken over"
                )
        task = Task.from_row(row)
        self.hold(task_id, task.lease)
        return task

    def renew_lease(
        self, task_id: str, owner: str, lease_seconds: float, *, epoch: int | None = None
    ) -> bool:
        """Extend the lease; ``False`` if ``owner`` no longer owns the task (or it is finished), or
        the task's epoch is no longer ``epoch`` (default: the epoch of the lease held for it)."""
        if epoch is None:
            held = self._leases.get(task_id)
            epoch = held.epoch if held is not None and held.owner == owner else None
        expires = format_time(utc_now() + timedelta(seconds=lease_seconds))
        sql = (
            "UPDATE tasks SET lease_expires_at = ? WHERE id = ? AND owner = ?"
            " AND state IN ('running', 'cancelling')"
        )
        args: list[Any] = [expires, task_id, owner]
        if epoch is not None:
            sql += " AND epoch = ?"
            args.append(epoch)
        with self._write() as conn:
            return conn.execute(sql, args).rowcount == 1

    def release(self, task_id: str, owner: str) -> bool:
        """Give up ownership without ending the task (its worker is shutting down): the task becomes
        an orphan that the next ``recover`` resumes. ``False`` if ``owner`` did not own it."""
        held = self._leases.get(task_id)
        sql = (
            "UPDATE tasks SET owner = NULL, lease_expires_at = NULL, updated_at = ? "
            "WHERE id = ? AND owner = ? AND state IN ('running', 'cancelling')"
        )
        args: list[Any] = [utcnow(), task_id, owner]
        if held is not None and held.owner == owner:
            sql += " AND epoch = ?"
            args.append(held.epoch)
        with self._write() as conn:
            cur = conn.execute(sql, args)
            if cur.rowcount == 1:
                self._event(conn, task_id, "task.released", {"owner": owner}, utcnow())
                conn.notify(CHANNEL_TASKS, task_id)
        if cur.rowcount == 1:
            self.hold(task_id, None)
        return cur.rowcount == 1
