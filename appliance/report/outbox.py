"""The durable outbox: messages waiting for the controller, in the task database.

Messages are rows of ``report_outbox`` (created by a migration in :mod:`appliance.store`); the row
id is the message ``seq``. Rows are delivered oldest first and deleted only once the controller
acknowledged them, so an outage or a restart loses nothing. The cursor over the store's ``events``
table lives in ``report_state`` and moves in the same transaction that enqueues the messages made
from those events: an event becomes exactly one message (or none, when throttled) even if the
appliance stops between the two.

The outbox opens the database on its own (:func:`appliance.database.open_database`), so the
reporter thread never waits behind the worker's store: on SQLite WAL mode and ``busy_timeout`` make
the two writers take turns; on PostgreSQL each has its connections, and enqueueing holds an
advisory lock until it commits, so seqs become visible in the order they were handed out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..database import LOCK_OUTBOX, StoreConfig
from ..store import open_database
from ..timestamps import utcnow

CURSOR_KEY = "events_cursor"


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
    """A message to enqueue: its ``type``, the task it is about (if any) and its members."""

    type: str
    task_id: str | None
    payload: dict[str, Any]


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
        replace_type: str | None = None,
    ) -> list[int]:
        """Append ``messages`` (their seqs are returned) and, atomically, move the events cursor.

        ``replace_type`` first drops undelivered messages of that type (a new heartbeat makes an
        older one that never got out worthless).
        """
        seqs: list[int] = []
        now = utcnow()
        with self._db.transaction() as conn:
            conn.lock(LOCK_OUTBOX)
            if replace_type is not None:
                conn.execute("DELETE FROM report_outbox WHERE type = ?", (replace_type,))
            for m in messages:
                row = conn.execute(
                    "INSERT INTO report_outbox (created_at, type, task_id, payload) VALUES (?, ?, ?, ?)"
                    " RETURNING seq",
                    (now, m.type, m.task_id, json.dumps(m.payload, sort_keys=True, allow_nan=False)),
                ).fetchone()
                seqs.append(int(row[0]))
            if cursor is not None:
                conn.execute(
                    "INSERT INTO report_state (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (CURSOR_KEY, str(cursor)),
                )
        return seqs

    # -- delivering -----------------------------------------------------------------------------

    def head(self) -> Pending | None:
        """The oldest undelivered message (the only one that may be sent: delivery is in order)."""
        rows = self._db.read("SELECT * FROM report_outbox ORDER BY seq LIMIT 1")
        if not rows:
            return None
        row = rows[0]
        return Pending(row["seq"], row["type"], row["task_id"], json.loads(row["payload"]), row["attempts"])

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

    def backlog(self) -> int:
        """How many messages wait for delivery."""
        return int(self._db.read("SELECT COUNT(*) FROM report_outbox")[0][0])
