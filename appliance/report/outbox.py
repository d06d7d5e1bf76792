"""The durable outbox: messages waiting for the controller, in the task database.

Messages are rows of ``report_outbox`` (created by a migration in :mod:`appliance.store`); the row
id is the message ``seq``. Rows are delivered oldest first and deleted only once the controller
acknowledged them, so an outage or a restart loses nothing. The cursor over the store's ``events``
table lives in ``report_state`` and moves in the same transaction that enqueues the messages made
from those events: an event becomes exactly one message (or none, when throttled) even if the
appliance stops between the two.

The outbox has its own connection to the database so the reporter thread never waits behind the
worker's store lock; WAL mode and ``busy_timeout`` make the two writers take turns.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..store import connect, inserted_id, write_transaction
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
    """The outbox in the SQLite database at ``path`` (already migrated by :class:`~appliance.store.Store`)."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._conn = connect(path, busy_timeout)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._conn, self._lock)

    # -- state ----------------------------------------------------------------------------------

    def cursor(self) -> int:
        """Id of the last ``events`` row already turned into messages (0 at first start)."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM report_state WHERE key = ?", (CURSOR_KEY,)).fetchone()
        return 0 if row is None else int(row[0])

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
        with self._write() as conn:
            if replace_type is not None:
                conn.execute("DELETE FROM report_outbox WHERE type = ?", (replace_type,))
            for m in messages:
                cur = conn.execute(
                    "INSERT INTO report_outbox (created_at, type, task_id, payload) VALUES (?, ?, ?, ?)",
                    (now, m.type, m.task_id, json.dumps(m.payload, sort_keys=True, allow_nan=False)),
                )
                seqs.append(inserted_id(cur))
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
        with self._lock:
            row = self._conn.execute("SELECT * FROM report_outbox ORDER BY seq LIMIT 1").fetchone()
        if row is None:
            return None
        return Pending(row["seq"], row["type"], row["task_id"], json.loads(row["payload"]), row["attempts"])

    def ack(self, seq: int) -> None:
        """The controller has the message: forget it."""
        with self._write() as conn:
            conn.execute("DELETE FROM report_outbox WHERE seq = ?", (seq,))

    def failed(self, seq: int, error: str) -> int:
        """Count a failed delivery of ``seq``; returns the number of attempts so far."""
        with self._write() as conn:
            conn.execute(
                "UPDATE report_outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (error[:500], seq),
            )
            row = conn.execute("SELECT attempts FROM report_outbox WHERE seq = ?", (seq,)).fetchone()
        return 0 if row is None else int(row[0])

    def backlog(self) -> int:
        """How many messages wait for delivery."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM report_outbox").fetchone()[0])
