"""The controller's database: appliances, their configuration versions and the lifecycle events.

Every SQL statement of the controller is in this module (the rules are in :mod:`.lifecycle`). The
database is the controller's own, separate from any appliance's task database, on either backend of
:mod:`appliance.database`: a SQLite file (the default; created mode 0600) or a PostgreSQL database
(``postgresql://…``: several controllers may share it). It follows the task store's conventions:
SQL written once for both backends, every read-modify-write in one short write transaction (SQLite:
``BEGIN IMMEDIATE``, so the gunicorn workers, each with its own connection, serialise their writes;
PostgreSQL: row locks and transaction-scoped advisory locks where writes must take turns), the
schema's :data:`~.schema.MIGRATIONS` applied when the store is opened (a database written by newer
code is refused), and coded errors only (:class:`~appliance.errors.StoreUnavailable` while the
database cannot be reached). A PostgreSQL database (or schema) holding a task store is refused:
both have an ``events`` table and a ``schema_version``.

Decisions that must hold across processes are made inside such a transaction:

* :meth:`ControllerStore.assign` hands the first unassigned dynamic configuration to an instance
  with one ``UPDATE … WHERE assigned_to IS NULL … RETURNING``, under the assignment lock (on
  PostgreSQL; SQLite's write transaction is one already), so concurrent requests take turns: each
  configuration goes to one instance, and a retry by the same instance gets the one it holds. The
  unique index on ``assigned_to`` makes one instance hold at most one configuration.
* :meth:`ControllerStore.update` advances an appliance's report ``seq`` with a compare
  (``WHERE last_seq < ?``) on the row it locked, so a replayed message is refused by whichever
  worker sees it second.
* :meth:`ControllerStore.remove_stale` deletes and records its events in one transaction, so an
  appliance is removed (and the removal reported) once however many sweepers run.
* Events are inserted under the events lock (PostgreSQL), so their ids become visible in increasing
  order and a reader paging with ``after`` misses none.

The per-appliance secrets are stored as given (the controller needs them to compute HMACs); no
method returning a view of an appliance includes them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ..database import (
    LOCK_CONTROLLER_ASSIGN,
    LOCK_CONTROLLER_EVENTS,
    Connection,
    Database,
    Row,
    StoreConfig,
    as_settings,
)
from ..errors import DuplicateKey, StoreError
from ..store import apply_migrations, open_database
from ..store.schema import DIALECT_SQL
from ..timestamps import utcnow
from .model import (
    ApplianceExists,
    ApplianceNotFound,
    ApplianceRow,
    Credentials,
    EventRow,
    Update,
    dumps,
)
from .schema import APPLIANCE_COLUMNS, MIGRATIONS

__all__ = [
    "MIGRATIONS",
    "ApplianceExists",
    "ApplianceNotFound",
    "ApplianceRow",
    "ControllerStore",
    "Credentials",
    "EventRow",
    "Update",
]


class ControllerStore:
    """The controller database ``target`` names (created and migrated on open): a SQLite file, a
    ``sqlite:``/``postgresql:`` URL or store settings; thread-safe (see :mod:`appliance.database`)."""

    def __init__(self, target: StoreConfig | Path | str, *, busy_timeout: float = 30.0) -> None:
        self.settings = as_settings(target)
        path = self.settings.path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                # it holds the appliances' secrets: private from its first byte
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db: Database = open_database(self.settings, busy_timeout=busy_timeout)
        try:
            if self._read(DIALECT_SQL[self._db.dialect]["table_exists"], ("tasks",)):
                raise StoreError(
                    f"{self._db.name} holds an appliance task database: the controller needs a "
                    "database (or PostgreSQL schema) of its own"
                )
            apply_migrations(self._db, MIGRATIONS, "controller database", "this controller")
        except BaseException:
            self._db.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The SQLite file; None on PostgreSQL."""
        return self.settings.path

    @property
    def name(self) -> str:
        """What messages call the database: its file or its URL (never with a password)."""
        return self._db.name

    def close(self) -> None:
        self._db.close()

    def _write(self) -> AbstractContextManager[Connection]:
        return self._db.transaction()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._db.read(sql, args)

    @property
    def schema_version(self) -> int:
        rows = self._read("SELECT version FROM schema_version")
        return int(rows[0][0]) if rows else 0

    @staticmethod
    def _event(conn: Connection, appliance_id: str, kind: str, data: dict[str, Any], now: str) -> int:
        conn.lock(LOCK_CONTROLLER_EVENTS)  # held until the commit: ids become visible in order
        row = conn.execute(
            "INSERT INTO events (time, appliance_id, kind, data) VALUES (?, ?, ?, ?) RETURNING id",
            (now, appliance_id, kind, dumps(data)),
        ).fetchone()
        return int(row[0])

    @staticmethod
    def _row(conn: Connection, appliance_id: str) -> Row:
        row = conn.execute(
            f"SELECT {APPLIANCE_COLUMNS} FROM appliances WHERE id = ?", (appliance_id,)
        ).fetchone()
        if row is None:
            raise ApplianceNotFound(f"no appliance {appliance_id!r} is registered")
        return row

    # -- registry ---------------------------------------------------------------------------

    def register(
        self, appliance_id: str, secret: str, config: dict[str, Any], *, dynamic: bool, event: dict[str, Any]
    ) -> ApplianceRow:
        """Insert an appliance with configuration version 1 (:class:`ApplianceExists` if the id is taken)."""
        now = utcnow()
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO appliances (id, secret, dynamic, config_version, registered_at, updated_at) "
                    "VALUES (?, ?, ?, 1, ?, ?)",
                    (appliance_id, secret, int(dynamic), now, now),
                )
                conn.execute(
                    "INSERT INTO configs (appliance_id, version, document, created_at) VALUES (?, 1, ?, ?)",
                    (appliance_id, dumps(config), now),
                )
                self._event(conn, appliance_id, "registered", event, now)
                return ApplianceRow.from_row(self._row(conn, appliance_id))
        except DuplicateKey as exc:
            raise ApplianceExists(f"an appliance {appliance_id!r} is already registered") from exc

    def get(self, appliance_id: str) -> ApplianceRow:
        rows = self._read(f"SELECT {APPLIANCE_COLUMNS} FROM appliances WHERE id = ?", (appliance_id,))
        if not rows:
            raise ApplianceNotFound(f"no appliance {appliance_id!r} is registered")
        return ApplianceRow.from_row(rows[0])

    def appliances(self) -> list[ApplianceRow]:
        rows = self._read(f"SELECT {APPLIANCE_COLUMNS} FROM appliances ORDER BY seq")
        return [ApplianceRow.from_row(r) for r in rows]

    def credentials(self, appliance_id: str) -> Credentials | None:
        rows = self._read("SELECT id, secret, last_seq FROM appliances WHERE id = ?", (appliance_id,))
        return Credentials.from_row(rows[0]) if rows else None

    def config(self, appliance_id: str) -> tuple[int, dict[str, Any]]:
        """The current configuration version of an appliance and its document."""
        rows = self._read(
            "SELECT c.version, c.document FROM configs AS c JOIN appliances AS a "
            "ON a.id = c.appliance_id AND a.config_version = c.version WHERE a.id = ?",
            (appliance_id,),
        )
        if not rows:
            raise ApplianceNotFound(f"no appliance {appliance_id!r} is registered")
        return int(rows[0]["version"]), json.loads(rows[0]["document"])

    def publish(self, appliance_id: str, config: dict[str, Any]) -> int:
        """Store ``config`` as the appliance's next configuration version and make it current; the
        version, with a ``config-published`` event."""
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(
                "UPDATE appliances SET config_version = config_version + 1, updated_at = ? WHERE id = ? "
                "RETURNING config_version",
                (now, appliance_id),
            ).fetchone()
            if row is None:
                raise ApplianceNotFound(f"no appliance {appliance_id!r} is registered")
            version = int(row["config_version"])
            conn.execute(
                "INSERT INTO configs (appliance_id, version, document, created_at) VALUES (?, ?, ?, ?)",
                (appliance_id, version, dumps(config), now),
            )
            self._event(conn, appliance_id, "config-published", {"version": version}, now)
            return version

    def current_version(self, appliance_id: str) -> int | None:
        """The appliance's current configuration version (None: not registered)."""
        rows = self._read("SELECT config_version FROM appliances WHERE id = ?", (appliance_id,))
        return int(rows[0]["config_version"]) if rows else None

    def event(self, appliance_id: str, kind: str, data: dict[str, Any]) -> None:
        """Record an event of an appliance."""
        now = utcnow()
        with self._write() as conn:
            self._event(conn, appliance_id, kind, data, now)

    def seen(self, appliance_id: str) -> None:
        """The appliance asked whether its configuration is current: it is alive (no event)."""
        now = utcnow()
        with self._write() as conn:
            conn.execute(
                "UPDATE appliances SET last_seen = ?, updated_at = ? WHERE id = ?", (now, now, appliance_id)
            )

    def remove(self, appliance_id: str, event: dict[str, Any]) -> None:
        now = utcnow()
        with self._write() as conn:
            if conn.execute("DELETE FROM appliances WHERE id = ?", (appliance_id,)).rowcount == 0:
                raise ApplianceNotFound(f"no appliance {appliance_id!r} is registered")
            self._event(conn, appliance_id, "removed", event, now)

    def remove_stale(self, silent_since: str, timeout: float) -> list[EventRow]:
        """Remove every appliance last heard from (or, never heard from, assigned) before
        ``silent_since``, each with a ``removed-stale`` event; returns those events. Appliances
        neither heard from nor assigned (waiting to be launched) are never stale."""
        now = utcnow()
        with self._write() as conn:
            # PostgreSQL: a concurrent sweeper's DELETE waits for this one's row locks, then finds
            # the rows gone: each appliance is removed, and reported, once
            gone = conn.execute(
                "DELETE FROM appliances WHERE COALESCE(last_seen, assigned_at) < ? "
                "RETURNING id, last_seen, assigned_at, tasks, addresses",
                (silent_since,),
            ).fetchall()
            events = []
            for row in sorted(gone, key=lambda r: r["id"]):
                data = {
                    "reason": f"silent for longer than {timeout:g} s",
                    "last_seen": row["last_seen"],
                    "assigned_at": row["assigned_at"],
                    "addresses": json.loads(row["addresses"]),
                    # what it was running at its last report: for the front end to fail over
                    "tasks": json.loads(row["tasks"]),
                }
                event_id = self._event(conn, row["id"], "removed-stale", data, now)
                events.append(EventRow(event_id, now, row["id"], "removed-stale", data))
            return events

    # -- the appliances' side ----------------------------------------------------------------

    def assign(self, instance_id: str) -> tuple[Credentials, bool] | None:
        """The configuration ``instance_id`` holds, else the first unassigned dynamic one, claimed
        for it; (credentials, newly assigned), or None when none is left."""
        now = utcnow()
        with self._write() as conn:
            conn.lock(LOCK_CONTROLLER_ASSIGN)  # assignments take turns (see the module docstring)
            held = conn.execute(
                "SELECT id, secret, last_seq FROM appliances WHERE assigned_to = ?", (instance_id,)
            ).fetchone()
            if held is not None:
                return Credentials.from_row(held), False
            row = conn.execute(
                "UPDATE appliances SET assigned_to = ?, assigned_at = ?, updated_at = ? "
                "WHERE seq = (SELECT seq FROM appliances WHERE dynamic = 1 AND assigned_to IS NULL "
                "ORDER BY seq LIMIT 1) AND assigned_to IS NULL RETURNING id, secret, last_seq",
                (instance_id, now, now),
            ).fetchone()
            if row is None:
                return None
            self._event(conn, row["id"], "assigned", {"instance_id": instance_id}, now)
            return Credentials.from_row(row), True

    def config_fetched(self, appliance_id: str, version: int) -> None:
        """An appliance fetched its configuration: it is alive (``last_seen``), and it is told."""
        now = utcnow()
        with self._write() as conn:
            conn.execute(
                "UPDATE appliances SET last_seen = ?, updated_at = ? WHERE id = ?", (now, now, appliance_id)
            )
            self._event(conn, appliance_id, "config-fetched", {"version": version}, now)

    def update(self, appliance_id: str, update: Update, *, seq: int | None = None) -> tuple[bool, bool]:
        """Record what an appliance reported and that it was heard from now.

        With ``seq`` (a pushed report) the row changes only if ``seq`` is above the last one
        accepted. Returns (accepted, something other than the time changed); an ``updated`` event
        lists the fields that changed.
        """
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(
                "SELECT status, health, addresses, parameters, errors, tasks, applied_version, last_seq "
                "FROM appliances WHERE id = ?" + conn.for_update,
                (appliance_id,),
            ).fetchone()
            if row is None:
                raise ApplianceNotFound(f"no appliance {appliance_id!r} is registered")
            if seq is not None and seq <= row["last_seq"]:
                return False, False
            new = {
                "status": update.status,
                "health": update.health,
                "addresses": None if update.addresses is None else dumps(update.addresses),
                "parameters": None if update.parameters is None else dumps(update.parameters),
                "errors": None if update.errors is None else dumps(update.errors),
                "tasks": None if update.tasks is None else dumps(update.tasks),
                "applied_version": update.applied_version,
            }
            changed = sorted(k for k, v in new.items() if v is not None and v != row[k] and k != "tasks")
            values: dict[str, Any] = {k: v for k, v in new.items() if v is not None}
            values.update(last_seen=now, updated_at=now)
            if seq is not None:
                values["last_seq"] = seq
            cols = ", ".join(f"{k} = ?" for k in values)
            guard = " AND last_seq < ?" if seq is not None else ""
            args = (*values.values(), appliance_id, *((seq,) if seq is not None else ()))
            if conn.execute(f"UPDATE appliances SET {cols} WHERE id = ?{guard}", args).rowcount == 0:
                return False, False
            if changed:
                shown = {k: getattr(update, k) for k in changed if k != "parameters"}
                self._event(conn, appliance_id, "updated", {"changed": changed, **shown}, now)
            return True, bool(changed)

    # -- events -----------------------------------------------------------------------------

    def events(self, after: int = 0, limit: int = 100, appliance_id: str | None = None) -> list[EventRow]:
        sql = "SELECT id, time, appliance_id, kind, data FROM events WHERE id > ?"
        args: list[Any] = [after]
        if appliance_id is not None:
            sql += " AND appliance_id = ?"
            args.append(appliance_id)
        rows = self._read(sql + " ORDER BY id LIMIT ?", (*args, limit))
        return [
            EventRow(int(r["id"]), r["time"], r["appliance_id"], r["kind"], json.loads(r["data"]))
            for r in rows
        ]
