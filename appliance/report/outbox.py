"""The durable outbox: messages waiting for the controller, in the task database.

Messages are rows of ``report_outbox`` (created by a migration in :mod:`appliance.store`); the row
id is the message ``seq``. Rows are delivered oldest first and deleted only once the controller
acknowledged them, so an outage or a restart loses nothing. The cursor over the store's ``events``
table lives in ``report_state`` and moves in the same transaction that enqueues the messages made
from those events: an event becomes exactly one message (or none, when throttled) even if the
appliance stops between the two.

In a fleet the appliances share one outbox (one PostgreSQL database): each row names the appliance
that delivers it (``appliance``, its ``controller.appliance_id``), each reporter delivers only its
own rows (and rows naming none, from before), so each appliance's seqs reach the controller in
order. An event becomes one message in the whole fleet: :meth:`Outbox.enqueue` moves the cursor
only from where the caller read it (``expect_cursor``), else it raises :class:`CursorMoved` and
enqueues nothing (another appliance's reporter turned those events into messages first). A task's
messages go to the appliance that runs it; a message for a task whose earlier messages wait for
another appliance (the one that ran it before a takeover) first moves those to the new one, with
new seqs in their order, so a task's reports stay in order and come from its current owner.

The outbox opens the database on its own (:func:`appliance.database.open_database`), so the
reporter thread never waits behind the worker's store: on SQLite WAL mode and ``busy_timeout`` make
the two writers take turns; on PostgreSQL each has its connections, and enqueueing holds an
advisory lock until it commits, so seqs become visible in the order they were handed out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..database import LOCK_OUTBOX, POSTGRESQL, Connection, StoreConfig
from ..store import open_database
from ..timestamps import utcnow

CURSOR_KEY = "events_cursor"

_R = TypeVar("_R")


@dataclass(frozen=True)
class Pending:
    """One undelivered message."""

    seq: int
    type: str
    task_id: str | None
    payload: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class NewMessage:
    """A message to enqueue: its ``type``, the task it is about (if any), its members and the
    appliance that delivers it (None: any)."""

    type: str
    task_id: str | None
    payload: dict[str, Any]
    appliance: str | None = None


class CursorMoved(Exception):
    """The events cursor is no longer where the caller read it: another reporter sharing the outbox
    enqueued those events' messages first."""


class Outbox:
    """The outbox in the task database ``target`` names (already migrated by :class:`~appliance.store.Store`;
    pass the store's ``settings``)."""

    def __init__(self, target: StoreConfig | Path | str, *, busy_timeout: float = 30.0) -> None:
        self._db = open_database(target, busy_timeout=busy_timeout)

    def close(self) -> None:
        self._db.close()

    # -- state ----------------------------------------------------------------------------------

    def cursor(self) -> int:
        """Id of the last ``events`` row already turned into messages (0 at first start)."""
        rows = self._db.read("SELECT value FROM report_state WHERE key = ?", (CURSOR_KEY,))
        return int(rows[0][0]) if rows else 0

    # -- enqueueing -----------------------------------------------------------------------------

    def enqueue(
        self,
        messages: Iterable[NewMessage],
        *,
        cursor: int | None = None,
        expect_cursor: int | None = None,
        replace_type: str | None = None,
    ) -> list[int]:
        """Append ``messages`` (their seqs are returned) and, atomically, move the events cursor to
        ``cursor``; with ``expect_cursor``, only from there (else :class:`CursorMoved`, nothing done).

        ``replace_type`` first drops undelivered messages of that type of the same appliance (a new
        heartbeat makes an older one that never got out worthless). A task message for an appliance
        first moves the task's messages waiting for another appliance to it (module docstring).
        """
        messages = list(messages)
        seqs: list[int] = []
        now = utcnow()
        with self._db.transaction() as conn:
            conn.lock(LOCK_OUTBOX)
            if expect_cursor is not None:
                row = conn.execute("SELECT value FROM report_state WHERE key = ?", (CURSOR_KEY,)).fetchone()
                if (int(row[0]) if row else 0) != expect_cursor:
                    raise CursorMoved(f"the events cursor moved on from {expect_cursor}")
            if replace_type is not None:
                owners = {m.appliance for m in messages if m.type == replace_type}
                if owners and None not in owners:
                    for owner in owners:  # another appliance's heartbeat is not this one's to drop
                        conn.execute(
                            "DELETE FROM report_outbox WHERE type = ?"
                            " AND (appliance = ? OR appliance IS NULL)",
                            (replace_type, owner),
                        )
                else:
                    conn.execute("DELETE FROM report_outbox WHERE type = ?", (replace_type,))
            moved: set[tuple[str, str]] = set()
            for m in messages:
                if (
                    m.task_id is not None
                    and m.appliance is not None
                    and (m.task_id, m.appliance) not in moved
                ):
                    moved.add((m.task_id, m.appliance))
                    self._move(conn, m.task_id, m.appliance)
                row = conn.execute(
                    "INSERT INTO report_outbox (created_at, type, task_id, payload, appliance)"
                    " VALUES (?, ?, ?, ?, ?) RETURNING seq",
                    (
                        now,
                        m.type,
                        m.task_id,
                        json.dumps(m.payload, sort_keys=True, allow_nan=False),
                        m.appliance,
                    ),
                ).fetchone()
                seqs.append(int(row[0]))
            if cursor is not None:
                conn.execute(
                    "INSERT INTO report_state (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (CURSOR_KEY, str(cursor)),
                )
        return seqs

    @staticmethod
    def _move(conn: Connection, task_id: str, appliance: str) -> None:
        """Hand the task's messages that wait for another appliance to ``appliance``: re-queued
        behind everything queued so far, in their order (each appliance's seqs must increase)."""
        rows = conn.execute(
            "DELETE FROM report_outbox WHERE task_id = ? AND (appliance IS NULL OR appliance <> ?)"
            " RETURNING *",
            (task_id, appliance),
        ).fetchall()
        for row in sorted(rows, key=lambda r: int(r["seq"])):
            conn.execute(
                "INSERT INTO report_outbox"
                " (created_at, type, task_id, payload, attempts, last_error, appliance)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    row["created_at"],
                    row["type"],
                    task_id,
                    row["payload"],
                    row["attempts"],
                    row["last_error"],
                    appliance,
                ),
            )

    # -- delivering -----------------------------------------------------------------------------

    def deliver_head(self, appliance: str | None, send: Callable[[Pending], _R]) -> tuple[Pending, _R] | None:
        """Send the head (:meth:`head`) with ``send`` and forget it once ``send`` returned; an
        exception from ``send`` leaves it queued (and propagates). None when nothing waits.

        On PostgreSQL the row stays locked while it is sent: a reporter moving the task's messages
        to its own appliance (:meth:`enqueue`) waits for this delivery, so no message goes out twice
        or out of its task's order. On SQLite (one appliance) it is read, sent, then deleted."""
        if self._db.dialect != POSTGRESQL:
            pending = self.head(appliance)
            if pending is None:
                return None
            result = send(pending)
            self.ack(pending.seq)
            return pending, result
        where = ""
        args: tuple[str, ...] = ()
        if appliance is not None:
            where, args = " WHERE appliance = ? OR appliance IS NULL", (appliance,)
        with self._db.transaction() as conn:
            row = conn.execute(
                f"SELECT * FROM report_outbox{where} ORDER BY seq LIMIT 1{conn.for_update}", args
            ).fetchone()
            if row is None:
                return None
            pending = _pending(row)
            result = send(pending)
            conn.execute("DELETE FROM report_outbox WHERE seq = ?", (pending.seq,))
        return pending, result

    def head(self, appliance: str | None = None) -> Pending | None:
        """The oldest undelivered message (the only one that may be sent: delivery is in order);
        with ``appliance``, of those that appliance delivers (its own, and those naming none)."""
        if appliance is None:
            rows = self._db.read("SELECT * FROM report_outbox ORDER BY seq LIMIT 1")
        else:
            rows = self._db.read(
                "SELECT * FROM report_outbox WHERE appliance = ? OR appliance IS NULL ORDER BY seq LIMIT 1",
                (appliance,),
            )
        return _pending(rows[0]) if rows else None

    def ack(self, seq: int) -> None:
        """The controller has the message: forget it."""
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM report_outbox WHERE seq = ?", (seq,))

    def failed(self, seq: int, error: str) -> int:
        """Count a failed delivery of ``seq``; returns the number of attempts so far."""
        with self._db.transaction() as conn:
            row = conn.execute(
                "UPDATE report_outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?"
                " RETURNING attempts",
                (error[:500], seq),
            ).fetchone()
        return 0 if row is None else int(row[0])

    def backlog(self, appliance: str | None = None) -> int:
        """How many messages wait for delivery (with ``appliance``: by that appliance)."""
        if appliance is None:
            return int(self._db.read("SELECT COUNT(*) FROM report_outbox")[0][0])
        sql = "SELECT COUNT(*) FROM report_outbox WHERE appliance = ? OR appliance IS NULL"
        return int(self._db.read(sql, (appliance,))[0][0])


def _pending(row: Any) -> Pending:
    return Pending(row["seq"], row["type"], row["task_id"], json.loads(row["payload"]), row["attempts"])
