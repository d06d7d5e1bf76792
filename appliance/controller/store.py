"""The controller's database: appliances, their configuration versions and the lifecycle events.

Every SQL statement of the controller is in this module (the rules are in :mod:`.lifecycle`), so
another backend (PostgreSQL) replaces this one module. The SQLite file is separate from any
appliance's task database and follows the conventions of :mod:`appliance.store`: WAL mode, a
``busy_timeout``, every read-modify-write in one ``BEGIN IMMEDIATE`` transaction (so the gunicorn
workers, each with its own connection, serialise their writes), and :data:`MIGRATIONS` applied in
order when the store is opened, ``schema_version`` counting them; a database written by newer
code is refused.

Decisions that must hold across processes are single statements inside such a transaction:

* :meth:`ControllerStore.assign` hands the first unassigned dynamic configuration to an instance
  with one ``UPDATE … WHERE assigned_to IS NULL … RETURNING``; the unique index on
  ``assigned_to`` makes one instance hold at most one configuration, and a retry by the same
  instance gets the one it already holds. (PostgreSQL: the same statement with the sub-select
  ``FOR UPDATE SKIP LOCKED``.)
* :meth:`ControllerStore.record_report` advances an appliance's report ``seq`` with a compare
  (``WHERE last_seq < ?``), so a replayed message is refused by whichever worker sees it second.
* :meth:`ControllerStore.remove_stale` deletes and records its events in one transaction, so an
  appliance is removed (and the removal reported) once however many sweepers run.

The per-appliance secrets are stored as given (the controller needs them to compute HMACs): the
file is created mode 0600, and no method returning a view of an appliance includes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..timestamps import utcnow

#: Ordered schema migrations (statements, never edited once released: append a new entry).
MIGRATIONS: list[tuple[str, ...]] = [
    (
        # ``seq`` is the registration order: "the first unassigned configuration" is the lowest seq.
        """CREATE TABLE appliances (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            secret TEXT NOT NULL,
            dynamic INTEGER NOT NULL DEFAULT 0 CHECK (dynamic IN (0, 1)),
            config_version INTEGER NOT NULL,
            registered_at TEXT NOT NULL,
            assigned_to TEXT,
            assigned_at TEXT,
            status TEXT NOT NULL DEFAULT 'registered',
            health TEXT,
            addresses TEXT NOT NULL DEFAULT '[]',
            parameters TEXT,
            errors TEXT NOT NULL DEFAULT '[]',
            tasks TEXT NOT NULL DEFAULT '[]',
            last_seen TEXT,
            last_seq INTEGER NOT NULL DEFAULT 0,
            updated_at TEXT NOT NULL
        )""",
        # NULLs never compare equal in a unique index (SQLite and PostgreSQL alike): only claimed
        # rows are constrained, one configuration per instance.
        "CREATE UNIQUE INDEX appliances_assigned_to ON appliances (assigned_to)",
        "CREATE INDEX appliances_unassigned ON appliances (dynamic, assigned_to, seq)",
        """CREATE TABLE configs (
            appliance_id TEXT NOT NULL REFERENCES appliances (id) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            document TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (appliance_id, version)
        )""",
        # No foreign key: the events of an appliance outlive its removal (they report it).
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            time TEXT NOT NULL,
            appliance_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX events_appliance ON events (appliance_id, id)",
    ),
    # live configuration updates: the version the appliance says it runs
    ("ALTER TABLE appliances ADD COLUMN applied_version INTEGER",),
]

_APPLIANCE_COLUMNS = (
    "seq, id, dynamic, config_version, registered_at, assigned_to, assigned_at, status, health, "
    "addresses, parameters, errors, tasks, last_seen, last_seq, updated_at, applied_version"
)


class ApplianceExists(StoreError):
    code = "ApplianceExists"


class ApplianceNotFound(StoreError):
    code = "ApplianceNotFound"


@dataclass(frozen=True)
class ApplianceRow:
    """One appliance as stored, without its secret."""

    seq: int
    id: str
    dynamic: bool
    config_version: int
    registered_at: str
    assigned_to: str | None
    assigned_at: str | None
    status: str
    health: str | None
    addresses: list[str]
    parameters: dict[str, Any] | None
    errors: list[dict[str, Any]]
    tasks: list[dict[str, Any]]
    last_seen: str | None
    last_seq: int
    updated_at: str
    #: the configuration version the appliance last reported running (None: not reported)
    applied_version: int | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ApplianceRow:
        d = dict(row)
        d["dynamic"] = bool(d["dynamic"])
        for key in ("addresses", "parameters", "errors", "tasks"):
            d[key] = None if d[key] is None else json.loads(d[key])
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class EventRow:
    id: int
    time: str
    appliance_id: str
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Credentials:
    """What the protocol needs to check an appliance's signatures: its secret and last report seq."""

    appliance_id: str
    secret: str
    last_seq: int


@dataclass(frozen=True)
class Update:
    """What an appliance reported (None: not part of this report, the stored value stays)."""

    status: str | None = None
    health: str | None = None
    addresses: list[str] | None = None
    parameters: dict[str, Any] | None = None
    errors: list[dict[str, Any]] | None = None
    tasks: list[dict[str, Any]] | None = None
    applied_version: int | None = None


def connect(path: Path | str, busy_timeout: float = 30.0) -> sqlite3.Connection:
    """A connection shared across threads (callers serialise use with a lock); no implicit
    transactions: writers open them with :func:`write_transaction`."""
    conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    return conn


def inserted_id(cur: sqlite3.Cursor) -> int:
    """The id of the row the ``INSERT`` just run on ``cur`` added."""
    if cur.lastrowid is None:
        raise StoreError("the database returned no id for an inserted row")
    return cur.lastrowid


@contextmanager
def write_transaction(conn: sqlite3.Connection, lock: Any) -> Iterator[sqlite3.Connection]:
    """A short write transaction holding the write lock from its start (``BEGIN IMMEDIATE``), rolled
    back on any exception. The controller's own SQLite plumbing: its sqlite3 errors (an
    ``IntegrityError`` for a duplicate id) are part of its logic, so it does not use the task
    database's coded connection layer."""
    with lock:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # a failed COMMIT must not leave the shared connection inside a transaction either
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


class ControllerStore:
    """The controller database at ``path`` (created mode 0600 and migrated on open); thread-safe."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            # it holds the appliances' secrets: private from its first byte
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._lock = threading.RLock()
        try:
            self._conn = connect(self.path, busy_timeout)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open controller database {self.path}: {exc}") from exc
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"cannot use controller database {self.path}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._conn, self._lock)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _version(self) -> int:
        row = self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if row is None:
            return 0
        version = self._conn.execute("SELECT version FROM schema_version").fetchone()
        return 0 if version is None else int(version[0])

    def _migrate(self) -> None:
        if self._version() == len(MIGRATIONS):
            return
        with self._write() as conn:
            version = self._version()
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"controller database {self.path} has schema version {version}, newer than this "
                    f"controller understands ({len(MIGRATIONS)}); upgrade it or use another database"
                )
            if version == 0:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._version()

    @staticmethod
    def _event(conn: sqlite3.Connection, appliance_id: str, kind: str, data: dict[str, Any], now: str) -> int:
        cur = conn.execute(
            "INSERT INTO events (time, appliance_id, kind, data) VALUES (?, ?, ?, ?)",
            (now, appliance_id, kind, _dumps(data)),
        )
        return inserted_id(cur)

    @staticmethod
    def _row(conn: sqlite3.Connection, appliance_id: str) -> sqlite3.Row:
        row = conn.execute(
            f"SELECT {_APPLIANCE_COLUMNS} FROM appliances WHERE id = ?", (appliance_id,)
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
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO appliances (id, secret, dynamic, config_version, registered_at, updated_at) "
                    "VALUES (?, ?, ?, 1, ?, ?)",
                    (appliance_id, secret, int(dynamic), now, now),
                )
            except sqlite3.IntegrityError as exc:
                raise ApplianceExists(f"an appliance {appliance_id!r} is already registered") from exc
            conn.execute(
                "INSERT INTO configs (appliance_id, version, document, created_at) VALUES (?, 1, ?, ?)",
                (appliance_id, _dumps(config), now),
            )
            self._event(conn, appliance_id, "registered", event, now)
            return ApplianceRow.from_row(self._row(conn, appliance_id))

    def get(self, appliance_id: str) -> ApplianceRow:
        with self._lock:
            return ApplianceRow.from_row(self._row(self._conn, appliance_id))

    def appliances(self) -> list[ApplianceRow]:
        rows = self._read(f"SELECT {_APPLIANCE_COLUMNS} FROM appliances ORDER BY seq")
        return [ApplianceRow.from_row(r) for r in rows]

    def credentials(self, appliance_id: str) -> Credentials | None:
        rows = self._read("SELECT id, secret, last_seq FROM appliances WHERE id = ?", (appliance_id,))
        return Credentials(rows[0]["id"], rows[0]["secret"], rows[0]["last_seq"]) if rows else None

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
                (appliance_id, version, _dumps(config), now),
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
        for it in one statement; (credentials, newly assigned), or None when none is left."""
        now = utcnow()
        with self._write() as conn:
            held = conn.execute(
                "SELECT id, secret, last_seq FROM appliances WHERE assigned_to = ?", (instance_id,)
            ).fetchone()
            if held is not None:
                return Credentials(held["id"], held["secret"], held["last_seq"]), False
            row = conn.execute(
                "UPDATE appliances SET assigned_to = ?, assigned_at = ?, updated_at = ? "
                "WHERE seq = (SELECT seq FROM appliances WHERE dynamic = 1 AND assigned_to IS NULL "
                "ORDER BY seq LIMIT 1) AND assigned_to IS NULL RETURNING id, secret, last_seq",
                (instance_id, now, now),
            ).fetchone()
            if row is None:
                return None
            self._event(conn, row["id"], "assigned", {"instance_id": instance_id}, now)
            return Credentials(row["id"], row["secret"], row["last_seq"]), True

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
                "FROM appliances "
                "WHERE id = ?",
                (appliance_id,),
            ).fetchone()
            if row is None:
                raise ApplianceNotFound(f"no appliance {appliance_id!r} is registered")
            if seq is not None and seq <= row["last_seq"]:
                return False, False
            new = {
                "status": update.status,
                "health": update.health,
                "addresses": None if update.addresses is None else _dumps(update.addresses),
                "parameters": None if update.parameters is None else _dumps(update.parameters),
                "errors": None if update.errors is None else _dumps(update.errors),
                "tasks": None if update.tasks is None else _dumps(update.tasks),
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
            EventRow(r["id"], r["time"], r["appliance_id"], r["kind"], json.loads(r["data"])) for r in rows
        ]
