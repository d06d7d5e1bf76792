"""The task database's schema (versioned migrations), the SQL that differs by backend, and opening it."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..database import (
    LOCK_MIGRATIONS,
    POSTGRESQL,
    SQLITE,
    Database,
    Row,
    SQLiteDatabase,
    StoreConfig,
    as_settings,
)
from ..errors import StoreError
from .model import ACTIVE_STATES


@dataclass(frozen=True)
class Dialects:
    """A migration statement whose SQL differs by backend; None: nothing to run there."""

    sqlite: str | None
    postgresql: str | None

    def sql(self, dialect: str) -> str | None:
        return self.sqlite if dialect == SQLITE else self.postgresql


#: Ordered schema migrations; each is a sequence of statements. Never edit a released entry:
#: append a new one. (Statements, not scripts: ``executescript`` would commit the transaction.)
#: A plain statement is SQLite's SQL, and PostgreSQL's after :func:`postgresql_ddl` (64-bit
#: integers, double precision, identity keys); a :class:`Dialects` gives each backend its own.
MIGRATIONS: list[tuple[str | Dialects, ...]] = [
    (
        """CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            workflow TEXT,
            params TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL CHECK (state IN
                ('pending','running','cancelling','completed','failed','cancelled')),
            status_message TEXT NOT NULL DEFAULT '',
            phase TEXT,
            bytes_done INTEGER,
            bytes_total INTEGER,
            percent REAL,
            result TEXT,
            error_code TEXT,
            error_message TEXT,
            findings TEXT NOT NULL DEFAULT '[]',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            owner TEXT,
            lease_expires_at TEXT,
            attempts INTEGER NOT NULL DEFAULT 0
        )""",
        # SQLite tables have an implicit ``rowid`` (insertion order: the tie-break of listings);
        # PostgreSQL gets it as a column, so the same queries run on both
        Dialects(None, "ALTER TABLE tasks ADD COLUMN rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE"),
        "CREATE INDEX tasks_state ON tasks (state, created_at)",
        """CREATE TABLE steps (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            idx TEXT NOT NULL,
            name TEXT NOT NULL,
            action TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN
                ('pending','running','completed','failed','skipped','undone','undo_failed')),
            args TEXT,
            result TEXT,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            undo INTEGER NOT NULL DEFAULT 1,
            started_at TEXT,
            finished_at TEXT,
            UNIQUE (task_id, idx)
        )""",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            time TEXT NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX events_task ON events (task_id, id)",
        """CREATE TABLE ledger (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            time TEXT NOT NULL,
            action TEXT NOT NULL CHECK (action IN ('created','removed','leaked')),
            resource TEXT NOT NULL,
            step TEXT
        )""",
        "CREATE INDEX ledger_task ON ledger (task_id, id)",
    ),
    (
        # Why a task was cancelled, as the canceller said it (EC2 ReasonMessage / CancelReason).
        "ALTER TABLE tasks ADD COLUMN cancel_reason TEXT",
        # Bytes written to the target over the whole task (EC2 bytesConverted): never reset by a
        # phase change, unlike bytes_done.
        "ALTER TABLE tasks ADD COLUMN bytes_converted INTEGER NOT NULL DEFAULT 0",
        # The EC2 API lists tasks by kind (conversion tasks, image imports, snapshot imports).
        "CREATE INDEX tasks_kind ON tasks (kind, created_at)",
    ),
    (
        # Reporting to the controlling cloud (appliance.report). The outbox's AUTOINCREMENT key is
        # the message ``seq``: never reused, even after acknowledged rows are deleted, so it stays
        # monotonic across restarts.
        """CREATE TABLE report_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at TEXT NOT NULL,
            type TEXT NOT NULL,
            task_id TEXT,
            payload TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT
        )""",
        # Small persistent key/value state of the reporter (the cursor over ``events``).
        "CREATE TABLE report_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        # Pull mode: the controller's task ids and the local tasks created for them.
        """CREATE TABLE pull_tasks (
            remote_id TEXT PRIMARY KEY,
            task_id TEXT,
            volume_id TEXT,
            state TEXT NOT NULL CHECK (state IN ('active', 'reported', 'cancelled')),
            created_at TEXT NOT NULL
        )""",
    ),
    (
        # Idempotency (EC2 ClientToken): at most one task per (account, kind, token). The account
        # is '' for callers without one; tasks without a token have a NULL token, which a unique
        # index never compares equal, in SQLite as in PostgreSQL.
        "ALTER TABLE tasks ADD COLUMN client_account TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE tasks ADD COLUMN client_token TEXT",
        # Tokens given before this migration were only kept in the params of the two kinds that
        # take one (and the check-then-insert they went through could record one twice): the
        # newest task of each (kind, token), the one a retry was answered with, keeps the token.
        # (A PostgreSQL database is new when it gets here: it has no rows to carry over.)
        Dialects(
            """UPDATE tasks SET client_token = json_extract(params, '$.client_token')
            WHERE kind IN ('import-image', 'import-snapshot')
            AND json_type(params, '$.client_token') = 'text'
            AND json_extract(params, '$.client_token') <> ''
            AND NOT EXISTS (
                SELECT 1 FROM tasks AS newer
                WHERE newer.kind = tasks.kind
                AND json_extract(newer.params, '$.client_token')
                    = json_extract(tasks.params, '$.client_token')
                AND (newer.created_at, newer.rowid) > (tasks.created_at, tasks.rowid)
            )""",
            """UPDATE tasks SET client_token = params::jsonb ->> 'client_token'
            WHERE kind IN ('import-image', 'import-snapshot')
            AND jsonb_typeof(params::jsonb -> 'client_token') = 'string'
            AND params::jsonb ->> 'client_token' <> ''
            AND NOT EXISTS (
                SELECT 1 FROM tasks AS newer
                WHERE newer.kind = tasks.kind
                AND newer.params::jsonb ->> 'client_token' = tasks.params::jsonb ->> 'client_token'
                AND (newer.created_at, newer.rowid) > (tasks.created_at, tasks.rowid)
            )""",
        ),
        "CREATE UNIQUE INDEX tasks_client_token ON tasks (client_account, kind, client_token)",
    ),
    (
        # What a task keeps to run, by name and as given (the hooks recorded at submit, with their
        # arguments): events are stored redacted, for people and the controller, so they cannot.
        """CREATE TABLE task_records (
            task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (task_id, name)
        )""",
    ),
    (
        # Work distribution in a fleet: every claim of a task moves its fencing epoch on, and every
        # write of a task run names the epoch it was granted (see Store.claim and Lease).
        "ALTER TABLE tasks ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        # Where a step got to inside itself (a verified part, an offset), for the next owner of the
        # task to resume from; written fenced like every other write of a run.
        """CREATE TABLE checkpoints (
            task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            step TEXT NOT NULL,
            data TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (task_id, step)
        )""",
    ),
    (
        # Reports in a fleet sharing one outbox: the appliance (controller.appliance_id) that delivers
        # each message, its own heartbeats and the messages of the tasks it runs (NULL: any, the rows
        # of one appliance from before).
        "ALTER TABLE report_outbox ADD COLUMN appliance TEXT",
    ),
    (
        # Each step's own latest progress (phase, done, total, percent; percent never goes back):
        # what one disk of a multi-disk import shows while the task runs (the task row holds the
        # task's progress, whichever step reported it).
        "ALTER TABLE steps ADD COLUMN progress TEXT",
    ),
]

#: doorbell channels (PostgreSQL NOTIFY; see :meth:`Store.listen`): a task became claimable
CHANNEL_TASKS = "tasks"
#: a cancel was requested; the payload is the task id
CHANNEL_CANCEL = "cancel"


def postgresql_ddl(statement: str) -> str:
    """A plain migration statement as PostgreSQL runs it: SQLite's ``INTEGER`` is 64-bit (byte
    counts exceed 2 GiB), ``REAL`` double precision, ``INTEGER PRIMARY KEY AUTOINCREMENT`` a key
    that is never reused (an identity column)."""
    if not statement.lstrip().upper().startswith(("CREATE TABLE", "ALTER TABLE")):
        return statement
    out = statement.replace(
        "INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    )
    out = re.sub(r"\bINTEGER\b", "BIGINT", out)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", out)


def migration_sql(statement: str | Dialects, dialect: str) -> str | None:
    """The SQL ``dialect`` runs for a migration statement (None: nothing)."""
    if isinstance(statement, Dialects):
        return statement.sql(dialect)
    return postgresql_ddl(statement) if dialect == POSTGRESQL else statement


#: SQL that differs by backend, by name
DIALECT_SQL: dict[str, dict[str, str]] = {
    SQLITE: {
        # the single write transaction (BEGIN IMMEDIATE) already excludes every other claimer
        "claim_pending": "UPDATE tasks SET {set} WHERE id IN"
        " (SELECT id FROM tasks WHERE state = 'pending' ORDER BY created_at, rowid LIMIT ?) RETURNING *",
        "table_exists": "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
        "duration": "(julianday(finished_at) - julianday(started_at)) * 86400.0",
        "contains": "instr(resource, ?) > 0",
        "owner_is": "owner IS ?",
    },
    POSTGRESQL: {
        # rows another claimer has locked are skipped, not waited for; the locking clause is in the
        # CTE so that ORDER BY … LIMIT picks the rows before they are locked
        "claim_pending": "WITH c AS (SELECT id FROM tasks WHERE state = 'pending'"
        " ORDER BY created_at, rowid LIMIT ? FOR UPDATE SKIP LOCKED)"
        " UPDATE tasks SET {set} FROM c WHERE tasks.id = c.id AND tasks.state = 'pending' RETURNING tasks.*",
        "table_exists": "SELECT 1 FROM information_schema.tables"
        " WHERE table_schema = current_schema() AND table_name = ?",
        "duration": "EXTRACT(EPOCH FROM (finished_at::timestamptz - started_at::timestamptz))",
        "contains": "strpos(resource, ?) > 0",
        "owner_is": "owner IS NOT DISTINCT FROM ?",
    },
}

#: the task a client token names (served by the unique index ``tasks_client_token``)
TOKEN_LOOKUP = "SELECT * FROM tasks WHERE client_account = ? AND kind = ? AND client_token = ?"
COUNT_ACTIVE = f"SELECT COUNT(*) FROM tasks WHERE state IN ({', '.join('?' * len(ACTIVE_STATES))})"


def open_database(target: StoreConfig | Path | str, *, busy_timeout: float = 30.0) -> Database:
    """Open the task database ``target`` names (see :mod:`appliance.database`): store settings, a
    SQLite file, or a ``sqlite:``/``postgresql:`` URL. Raises :class:`StoreUnavailable` (it cannot be
    reached now) or :class:`StoreError`. Migrating it is :class:`Store`'s job."""
    settings = as_settings(target)
    if settings.backend == POSTGRESQL:
        from ..postgres import PostgresDatabase  # psycopg is imported only where it is configured

        return PostgresDatabase(settings)
    return SQLiteDatabase(settings, busy_timeout=busy_timeout)


def schema_version(db: Database, read: Callable[[str, Sequence[Any]], list[Row]] | None = None) -> int:
    """How many migrations ``db`` has (``schema_version``; 0 before the first), read with ``read``
    (default: :meth:`Database.read`; a transaction's connection inside one)."""
    read = read or db.read
    if not read(DIALECT_SQL[db.dialect]["table_exists"], ("schema_version",)):
        return 0
    rows = read("SELECT version FROM schema_version", ())
    return int(rows[0][0]) if rows else 0


def apply_migrations(
    db: Database, migrations: Sequence[Sequence[str | Dialects]], what: str, reader: str
) -> None:
    """Apply the ``migrations`` ``db`` lacks, in order, in one write transaction, and count them in
    ``schema_version``; a database with more than this code knows is refused (:class:`StoreError`
    naming ``what`` it is and ``reader``, what does not understand it). The task store and the
    controller's store both migrate this way.

    The version is read first without a lock (a process opening a current database never waits
    behind a writer), then again under :data:`~appliance.database.LOCK_MIGRATIONS`: processes
    starting together against one PostgreSQL database wait there for the first to migrate (SQLite's
    write transaction excludes the others already)."""
    if schema_version(db) == len(migrations):
        return
    with db.transaction() as conn:
        conn.lock(LOCK_MIGRATIONS)
        version = schema_version(db, lambda sql, args: conn.execute(sql, args).fetchall())
        if version > len(migrations):
            raise StoreError(
                f"{what} {db.name} has schema version {version}, newer than {reader} understands "
                f"({len(migrations)}); upgrade it or point it at another database"
            )
        if version == 0:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        for statements in migrations[version:]:
            for statement in statements:
                sql = migration_sql(statement, conn.dialect)
                if sql is not None:
                    conn.execute(sql)
        conn.execute("UPDATE schema_version SET version = ?", (len(migrations),))
