"""A task's journal: its steps, records, events, cleanup ledger, checkpoints and doorbells."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..database import (
    Listener,
)
from ..errors import (
    UsageError,
)
from ..redact import redact
from ..timestamps import utcnow
from .base import StoreBase
from .model import (
    LEDGER_ACTIONS,
    STEP_FINISHED,
    Event,
    Lease,
    LedgerEntry,
    StepRecord,
    StepState,
    dumps,
    loads,
)
from .schema import CHANNEL_CANCEL, CHANNEL_TASKS


class JournalOps(StoreBase):
    """What a run writes down as it goes, and the doorbells."""

    # -- steps ------------------------------------------------------------------------------

    def record_step(
        self,
        task_id: str,
        idx: str,
        *,
        name: str,
        action: str,
        state: StepState | str,
        args: Any = None,
        result: Any = None,
        error: dict[str, Any] | None = None,
        attempts: int | None = None,
        undo: bool = True,
    ) -> StepRecord:
        """Insert or update the step ``idx`` of a task.

        ``started_at`` is stamped the first time the step is ``running`` and kept on re-runs;
        ``finished_at`` whenever it reaches a finished state. The step keeps its position
        (``seq``) when updated, so a resumed step stays where it was in the order.
        """
        st = StepState(state)
        now = utcnow()
        finished = now if st in STEP_FINISHED else None
        started = now if st is StepState.RUNNING else None
        with self._write() as conn:
            self._fence(conn, task_id)
            self._require_task(conn, task_id)
            row = conn.execute(
                "INSERT INTO steps (task_id, idx, name, action, state, args, result, error, attempts, undo,"
                " started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (task_id, idx) DO UPDATE SET name = excluded.name, action = excluded.action,"
                " state = excluded.state, args = excluded.args, result = excluded.result,"
                " error = excluded.error, attempts = COALESCE(?, steps.attempts), undo = excluded.undo,"
                " started_at = COALESCE(steps.started_at, excluded.started_at),"
                " finished_at = excluded.finished_at RETURNING *",
                (
                    task_id,
                    idx,
                    name,
                    action,
                    str(st),
                    dumps(args),
                    dumps(result),
                    None if error is None else dumps(redact(error)),
                    attempts or 0,
                    int(undo),
                    started,
                    finished,
                    attempts,
                ),
            ).fetchone()
            return StepRecord.from_row(row)

    def set_step_state(
        self, task_id: str, idx: str, state: StepState | str, *, error: dict[str, Any] | None = None
    ) -> StepRecord:
        """Change only the state (and error) of a recorded step, e.g. ``completed`` → ``undone``."""
        st = StepState(state)
        with self._write() as conn:
            self._fence(conn, task_id)
            row = conn.execute(
                "UPDATE steps SET state = ?, error = COALESCE(?, error), finished_at = ?"
                " WHERE task_id = ? AND idx = ? RETURNING *",
                (str(st), None if error is None else dumps(redact(error)), utcnow(), task_id, idx),
            ).fetchone()
            if row is None:
                raise UsageError(f"task {task_id} has no step {idx!r}")
            return StepRecord.from_row(row)

    def step_results(self, task_id: str) -> list[StepRecord]:
        """The task's step records in the order they were first started."""
        rows = self._read("SELECT * FROM steps WHERE task_id = ? ORDER BY seq", (task_id,))
        return [StepRecord.from_row(r) for r in rows]

    # -- records ----------------------------------------------------------------------------

    def set_record(self, task_id: str, name: str, value: Any) -> None:
        """Keep ``value`` (JSON) under ``name`` for the task, as given: something the task needs to
        run or resume (e.g. the hooks recorded at submit). Never shown as such; an event says it."""
        with self._write() as conn:
            self._fence(conn, task_id)
            self._require_task(conn, task_id)
            conn.execute(
                "INSERT INTO task_records (task_id, name, data) VALUES (?, ?, ?)"
                " ON CONFLICT (task_id, name) DO UPDATE SET data = excluded.data",
                (task_id, name, dumps(value)),
            )

    def record(self, task_id: str, name: str) -> Any:
        """The value kept under ``name`` for the task (:meth:`set_record`), or None."""
        rows = self._read("SELECT data FROM task_records WHERE task_id = ? AND name = ?", (task_id, name))
        return loads(rows[0]["data"]) if rows else None

    # -- events and ledger ------------------------------------------------------------------

    def add_event(self, task_id: str, kind: str, data: dict[str, Any] | None = None) -> Event:
        """Append to the event queue (read by controller reporting with :meth:`events`)."""
        now = utcnow()
        with self._write() as conn:
            self._fence(conn, task_id)
            event_id, stored = self._event(conn, task_id, kind, data or {}, now)
        return Event(event_id, task_id, now, kind, json.loads(stored))

    def events(self, since_id: int = 0, *, task_id: str | None = None, limit: int = 1000) -> list[Event]:
        """Events with ``id > since_id`` (all tasks, or one), oldest first."""
        sql = "SELECT * FROM events WHERE id > ?"
        args: list[int | str] = [since_id]
        if task_id is not None:
            sql += " AND task_id = ?"
            args.append(task_id)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        return [
            Event(r["id"], r["task_id"], r["time"], r["kind"], loads(r["data"]))
            for r in self._read(sql, args)
        ]

    def add_ledger(self, task_id: str, action: str, resource: str, step: str | None = None) -> LedgerEntry:
        """Record that the task ``created``, ``removed`` or ``leaked`` a resource (also an event)."""
        if action not in LEDGER_ACTIONS:
            raise UsageError(f"ledger action must be one of {', '.join(LEDGER_ACTIONS)}, not {action!r}")
        now = utcnow()
        with self._write() as conn:
            self._fence(conn, task_id)
            self._require_task(conn, task_id)
            row = conn.execute(
                "INSERT INTO ledger (task_id, time, action, resource, step) VALUES (?, ?, ?, ?, ?)"
                " RETURNING id",
                (task_id, now, action, resource, step),
            ).fetchone()
            self._event(conn, task_id, "ledger", {"action": action, "resource": resource, "step": step}, now)
            return LedgerEntry(int(row[0]), task_id, now, action, resource, step)

    def ledger(self, task_id: str) -> list[LedgerEntry]:
        """The task's cleanup ledger, oldest first."""
        rows = self._read("SELECT * FROM ledger WHERE task_id = ? ORDER BY id", (task_id,))
        return [
            LedgerEntry(r["id"], r["task_id"], r["time"], r["action"], r["resource"], r["step"]) for r in rows
        ]

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(
        self, task_id: str, step: str, data: dict[str, Any], *, owner: str, epoch: int
    ) -> None:
        """Keep where ``step`` (a step's index, ``StepContext.idx``) of the task got to: ``data`` (a
        JSON object, e.g. the last verified part and offset), replacing the step's previous
        checkpoint. Fenced: raises :class:`LeaseLost` unless (``owner``, ``epoch``) is still the
        task's lease, so a checkpoint is always its current owner's. The store keeps checkpoints,
        not the appliance's disk: the worker that takes a task over finds them."""
        if not isinstance(data, dict):
            raise UsageError(f"a checkpoint is a JSON object, not {type(data).__name__}")
        with self._write() as conn:
            self._fence(conn, task_id, Lease(owner, epoch))
            conn.execute(
                "INSERT INTO checkpoints (task_id, step, data, epoch, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (task_id, step) DO UPDATE SET data = excluded.data, epoch = excluded.epoch,"
                " updated_at = excluded.updated_at",
                (task_id, step, dumps(data), epoch, utcnow()),
            )

    def load_checkpoint(self, task_id: str, step: str) -> dict[str, Any] | None:
        """The step's last checkpoint (:meth:`save_checkpoint`), or None."""
        rows = self._read("SELECT data FROM checkpoints WHERE task_id = ? AND step = ?", (task_id, step))
        return loads(rows[0]["data"]) if rows else None

    def checkpoints(self, task_id: str) -> dict[str, dict[str, Any]]:
        """Every step's last checkpoint of the task, by step."""
        rows = self._read("SELECT step, data FROM checkpoints WHERE task_id = ?", (task_id,))
        return {r["step"]: loads(r["data"]) for r in rows}

    # -- doorbells ----------------------------------------------------------------------------

    def listen(self, channels: Sequence[str] = (CHANNEL_TASKS, CHANNEL_CANCEL)) -> Listener | None:
        """A listener for the store's doorbells (a task became claimable, a cancel was requested)
        on a connection of its own; None on SQLite, where workers only poll."""
        return self._db.listen(channels)

    def ledger_containing(self, fragment: str) -> list[LedgerEntry]:
        """Ledger entries of every task whose resource contains ``fragment`` (literally), oldest first."""
        rows = self._read(f"SELECT * FROM ledger WHERE {self._sql('contains')} ORDER BY id", (fragment,))
        return [
            LedgerEntry(r["id"], r["task_id"], r["time"], r["action"], r["resource"], r["step"]) for r in rows
        ]
