"""Tasks: creating, reading, listing, state changes, cancel requests and progress."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from ..database import (
    LOCK_ADMISSION,
    Connection,
)
from ..errors import (
    DuplicateKey,
    IdempotentParameterMismatch,
    IncorrectState,
    TaskNotFound,
    UsageError,
)
from ..progress import UNFLUSHED_PERCENT
from ..redact import redact_text
from ..timestamps import utcnow
from .base import StoreBase
from .model import (
    ACTIVE_STATES,
    TASK_ID_RE,
    TRANSITIONS,
    ActiveTaskLimit,
    Lease,
    Task,
    TaskState,
    dumps,
    loads,
    new_task_id,
)
from .schema import CHANNEL_CANCEL, CHANNEL_TASKS, COUNT_ACTIVE, TOKEN_LOOKUP


class TaskOps(StoreBase):
    """Creating, reading and changing tasks."""

    # -- tasks ------------------------------------------------------------------------------

    def create_task(
        self,
        kind: str,
        workflow: str | None = None,
        params: dict[str, Any] | None = None,
        *,
        task_id: str | None = None,
        status_message: str = "",
        max_active: int | None = None,
        client_token: str | None = None,
        client_account: str = "",
    ) -> Task:
        """Insert a ``pending`` task; ``task_id`` defaults to ``t-`` + 12 hex digits.

        The insert and the checks below are one write transaction, so they hold however many
        processes create tasks at once:

        - ``client_token`` (an empty one is no token): if ``client_account`` already created a task
          of this ``kind`` with this token, that task is returned instead of a new one (so its id
          is not ``task_id``) when its params equal ``params``; otherwise
          :class:`IdempotentParameterMismatch` is raised. A repeated request is answered even when
          the limit below is reached: it creates nothing.
        - ``max_active``: :class:`ActiveTaskLimit` if that many tasks (of any kind) are already in
          one of :data:`ACTIVE_STATES`.
        """
        task_id = task_id or new_task_id()
        if not TASK_ID_RE.match(task_id):
            raise UsageError(f"invalid task id {task_id!r}: use letters, digits, '.', '_' and '-'")
        now = utcnow()
        params_json = dumps(params or {})
        token = client_token or None
        # One write transaction inserts, lets the token's unique index decide whether the request
        # is new, and counts. The count needs the writers of tasks to take turns: SQLite's write
        # transaction excludes the others; on PostgreSQL the admission lock does (until the commit,
        # so the next creator counts this task). The token needs no lock: the index decides.
        with self._write() as conn:
            conn.lock(LOCK_ADMISSION)
            try:
                inserted = conn.execute(
                    "INSERT INTO tasks (id, kind, workflow, params, state, status_message, created_at,"
                    " updated_at, client_account, client_token)"
                    " VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)"
                    " ON CONFLICT (client_account, kind, client_token) DO NOTHING",
                    (task_id, kind, workflow, params_json, status_message, now, now, client_account, token),
                ).rowcount
            except DuplicateKey as exc:
                raise UsageError(f"a task with id {task_id!r} already exists") from exc
            if not inserted:
                row = conn.execute(TOKEN_LOOKUP, (client_account, kind, token)).fetchone()
                if json.loads(row["params"]) != json.loads(params_json):
                    raise IdempotentParameterMismatch(
                        f"the client token {token!r} was already used for task {row['id']} with "
                        "different parameters; repeat that request unchanged, or use a new token"
                    )
                return Task.from_row(row)
            if max_active is not None:
                others = int(conn.execute(COUNT_ACTIVE, sorted(ACTIVE_STATES)).fetchone()[0]) - 1
                if others >= max_active:
                    raise ActiveTaskLimit(others, max_active)  # and the insert is rolled back
            self._event(conn, task_id, "task.state", {"state": "pending"}, now)
            conn.notify(CHANNEL_TASKS, task_id)
            return Task.from_row(self._task_row(conn, task_id))

    def get_task(self, task_id: str, *, account: str | Iterable[str] | None = None) -> Task:
        """The task ``task_id``; raises :class:`TaskNotFound`, also when ``account`` (one or several)
        is given and the task belongs to none of them: to such a caller it does not exist."""
        sql, args = "SELECT * FROM tasks WHERE id = ?", [task_id]
        if account is not None:
            accounts = [account] if isinstance(account, str) else list(account)
            if not accounts:
                raise TaskNotFound(f"no task {task_id!r}")
            sql += f" AND client_account IN ({', '.join('?' * len(accounts))})"
            args += accounts
        rows = self._read(sql, args)
        if not rows:
            raise TaskNotFound(f"no task {task_id!r}")
        return Task.from_row(rows[0])

    def list_tasks(
        self,
        state: str | Iterable[str] | None = None,
        *,
        limit: int | None = 100,
        kind: str | Iterable[str] | None = None,
        marker: str | None = None,
        account: str | Iterable[str] | None = None,
    ) -> list[Task]:
        """Tasks, newest first, optionally only those in ``state``, of ``kind`` and of ``account``
        (one or several each).

        ``marker`` pages: only tasks listed after the task with that id (:class:`TaskNotFound` if
        unknown, or not of ``account``).
        """
        sql = "SELECT * FROM tasks"
        args: list[object] = []
        where: list[str] = []
        if account is not None:
            accounts = [account] if isinstance(account, str) else list(account)
            if not accounts:
                return []
            where.append(f"client_account IN ({', '.join('?' * len(accounts))})")
            args += accounts
        if marker is not None:
            # another account's task is no marker either
            rows = self._read(
                " AND ".join(["SELECT created_at, rowid FROM tasks WHERE id = ?", *where]), [marker, *args]
            )
            if not rows:
                raise TaskNotFound(f"no task {marker!r} (pagination marker)")
            # the same (created_at, rowid) order as ORDER BY below, so pages neither skip nor repeat
            where.append("(created_at, rowid) < (?, ?)")
            args += [rows[0]["created_at"], rows[0]["rowid"]]
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += [str(TaskState(s)) for s in states]
        if kind is not None:
            kinds = [kind] if isinstance(kind, str) else list(kind)
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            args += kinds
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [Task.from_row(r) for r in self._read(sql, args)]

    def task_summary(self, duration_buckets: Sequence[float] = ()) -> list[dict[str, Any]]:
        """Per (kind, state) aggregates for metrics, computed by the database (no task is loaded).

        Each row: ``kind``, ``state``, ``count``, ``bytes_done`` and ``bytes_converted`` (sums),
        ``durations`` (how many tasks have both ``started_at`` and ``finished_at``), ``duration_sum``
        (seconds) and ``buckets``: for each bound in ``duration_buckets``, how many of those durations
        are at most that many seconds.
        """
        bounds = [float(b) for b in duration_buckets]
        le = "".join(
            f", COALESCE(SUM(CASE WHEN d <= ? THEN 1 ELSE 0 END), 0) AS le{i}" for i in range(len(bounds))
        )
        sql = (
            "SELECT kind, state, COUNT(*) AS count, COALESCE(SUM(bytes_done), 0) AS bytes_done,"
            " COALESCE(SUM(bytes_converted), 0) AS bytes_converted,"
            f" COUNT(d) AS durations, COALESCE(SUM(d), 0.0) AS duration_sum{le} FROM ("
            " SELECT kind, state, bytes_done, bytes_converted,"
            " CASE WHEN started_at IS NOT NULL AND finished_at IS NOT NULL"
            f" THEN {self._sql('duration')} END AS d FROM tasks"
            ") AS t GROUP BY kind, state ORDER BY kind, state"
        )
        return [
            {
                "kind": r["kind"],
                "state": r["state"],
                "count": int(r["count"]),
                "bytes_done": int(r["bytes_done"]),
                "bytes_converted": int(r["bytes_converted"]),
                "durations": int(r["durations"]),
                "duration_sum": float(r["duration_sum"]),
                "buckets": [int(r[f"le{i}"]) for i in range(len(bounds))],
            }
            for r in self._read(sql, bounds)
        ]

    def set_state(
        self,
        task_id: str,
        state: TaskState | str,
        *,
        expected: TaskState | str | Iterable[TaskState | str] | None = None,
        status_message: str | None = None,
        result: Any = None,
        error_code: str | None = None,
        error_message: str | None = None,
        lease: Lease | None = None,
    ) -> Task:
        """Move the task to ``state`` if :data:`TRANSITIONS` allows it (else :class:`IncorrectState`).

        ``expected`` makes it a compare-and-swap: the change only happens from those states.
        Entering ``running`` stamps ``started_at``; a terminal state stamps ``finished_at``, drops the
        lease and becomes the task's ``phase`` (the last step's phase, "writing", would say it still
        runs). Only ``completed`` shows 100 %: a failed or cancelled task keeps the percent it reached,
        held below 100 (:data:`~appliance.progress.UNFLUSHED_PERCENT`) when its steps had counted every
        byte — the task's percent is the highest any step reported, and a finished step's 100 % or a
        target written but not yet published is not a finished task.
        """
        new = TaskState(state)
        now = utcnow()
        with self._write() as conn:
            self._fence(conn, task_id, lease)
            row = self._task_row(conn, task_id, lock=True)
            current = TaskState(row["state"])
            if expected is not None:
                allowed = [expected] if isinstance(expected, str) else list(expected)
                if current not in {TaskState(s) for s in allowed}:
                    raise IncorrectState(
                        f"task {task_id} is {current}, expected {' or '.join(map(str, allowed))}"
                    )
            self._check_transition(task_id, current, new)
            values: dict[str, Any] = {"state": str(new), "updated_at": now}
            if new is TaskState.RUNNING and row["started_at"] is None:
                values["started_at"] = now
            if new.terminal:
                values["finished_at"] = now
                values["lease_expires_at"] = None
                values["phase"] = str(new)
            if new is TaskState.COMPLETED:
                values["percent"] = 100.0
            elif new.terminal and row["percent"] is not None:
                values["percent"] = min(float(row["percent"]), UNFLUSHED_PERCENT)
            if status_message is not None:
                values["status_message"] = redact_text(status_message)
            if result is not None:
                values["result"] = dumps(result)
            if error_code is not None:
                values["error_code"] = error_code
            if error_message is not None:
                values["error_message"] = redact_text(error_message)
            task = self._update(conn, task_id, values)
            data: dict[str, str | None] = {"state": str(new), "previous": str(current)}
            if error_code:
                data.update(error_code=error_code, error_message=error_message)
            self._event(conn, task_id, "task.state", data, now)
            return task

    @staticmethod
    def _check_transition(task_id: str, current: TaskState, new: TaskState) -> None:
        if new not in TRANSITIONS[current]:
            raise IncorrectState(f"task {task_id} cannot go from {current} to {new}")

    def request_cancel(self, task_id: str, reason: str | None = None) -> Task:
        """Ask for a task to stop: ``pending`` → ``cancelled`` at once, ``running`` → ``cancelling``.

        The engine running the task notices ``cancelling``, stops the current step, undoes and
        ends ``cancelled``. Repeating a request while ``cancelling`` is harmless; cancelling a
        finished task raises :class:`IncorrectState`. ``reason`` (the canceller's words) is kept
        in ``cancel_reason``; the first reason given wins.
        """
        now = utcnow()
        with self._write() as conn:
            current = TaskState(self._task_row(conn, task_id, lock=True)["state"])
            if current is TaskState.CANCELLING:
                return Task.from_row(self._task_row(conn, task_id))
            new = TaskState.CANCELLED if current is TaskState.PENDING else TaskState.CANCELLING
            if current.terminal:
                raise IncorrectState(f"task {task_id} is already {current} and cannot be cancelled")
            self._check_transition(task_id, current, new)
            values: dict[str, Any] = {"state": str(new), "updated_at": now}
            if reason:
                values["cancel_reason"] = redact_text(reason)
            if new is TaskState.CANCELLED:
                values.update(
                    finished_at=now, error_code="Cancelled", error_message="cancelled before it started"
                )
            task = self._update(conn, task_id, values)
            self._event(conn, task_id, "task.state", {"state": str(new), "previous": str(current)}, now)
            if new is TaskState.CANCELLING:
                conn.notify(CHANNEL_CANCEL, task_id)
            return task

    def update_progress(
        self,
        task_id: str,
        *,
        phase: str | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
        percent: float | None = None,
        status_message: str | None = None,
        bytes_converted: int | None = None,
        lease: Lease | None = None,
        step: str | None = None,
    ) -> Task:
        """Record progress without ever moving it backwards.

        ``percent`` never decreases over the task's life. ``bytes_done``/``bytes_total`` never
        decrease within a phase; a new ``phase`` starts its own byte counters (a download's bytes
        and a conversion's bytes are different quantities). ``bytes_converted`` (bytes written to
        the target) never decreases over the task's life. A finished task keeps its phase (its final
        state) and percent: progress flushed late, after the task ended, does not change them.

        With ``step`` (the ``idx`` of the step that reported it), the figures are also the step's own
        progress (:attr:`StepRecord.progress`: the latest ``phase``, ``done`` and ``total``, and a
        ``percent`` that never decreases over the step's life), in the same transaction.
        """
        now = utcnow()
        with self._write() as conn:
            self._fence(conn, task_id, lease)
            row = self._task_row(conn, task_id, lock=True)
            values: dict[str, Any] = {"updated_at": now}
            if TaskState(row["state"]).terminal:
                phase = percent = None
            new_phase = phase is not None and phase != row["phase"]
            if new_phase:
                values["phase"] = phase

            def grow(column: str, value: int | float | None) -> None:
                if value is None:
                    return
                old = None if new_phase else row[column]
                values[column] = value if old is None else max(old, value)

            grow("bytes_done", bytes_done)
            grow("bytes_total", bytes_total)
            if new_phase and bytes_done is None:
                values["bytes_done"] = None
            if new_phase and bytes_total is None:
                values["bytes_total"] = None
            if percent is not None:
                clamped = min(100.0, max(0.0, float(percent)))
                values["percent"] = clamped if row["percent"] is None else max(row["percent"], clamped)
            if status_message is not None:
                values["status_message"] = redact_text(status_message)
            if bytes_converted is not None:
                values["bytes_converted"] = max(row["bytes_converted"], int(bytes_converted))
            if step is not None:
                figures = {"phase": phase, "done": bytes_done, "total": bytes_total, "percent": percent}
                self._step_progress(conn, task_id, step, figures)
            return self._update(conn, task_id, values)

    @staticmethod
    def _step_progress(conn: Connection, task_id: str, step: str, figures: dict[str, Any]) -> None:
        """Merge ``figures`` into the progress of the recorded step ``step`` (none: nothing)."""
        row = conn.execute(
            "SELECT progress FROM steps WHERE task_id = ? AND idx = ?", (task_id, step)
        ).fetchone()
        if row is None:
            return
        old = loads(row["progress"]) or {}
        new = {**old, **{k: v for k, v in figures.items() if v is not None}}
        if figures["percent"] is not None:
            clamped = min(100.0, max(0.0, float(figures["percent"])))
            new["percent"] = clamped if old.get("percent") is None else max(float(old["percent"]), clamped)
        conn.execute(
            "UPDATE steps SET progress = ? WHERE task_id = ? AND idx = ?", (dumps(new), task_id, step)
        )

    def add_findings(self, task_id: str, findings: Iterable[Any]) -> Task:
        """Add findings to the task's, each once (several steps judge one task: inspection, guest
        validation, policy; a retried step reports the same findings again)."""
        items = [f.to_dict() if hasattr(f, "to_dict") else dict(f) for f in findings]
        with self._write() as conn:
            self._fence(conn, task_id)
            current = json.loads(self._task_row(conn, task_id, lock=True)["findings"])
            merged = current + [f for i, f in enumerate(items) if f not in current and f not in items[:i]]
            return self._update(conn, task_id, {"findings": dumps(merged), "updated_at": utcnow()})
