"""Task state store: tasks, their steps, an event queue and a cleanup ledger in one database.

The database is SQLite (one file in ``state_dir``, the default: one appliance) or PostgreSQL
(``store.url``: appliances that share their tasks), through :mod:`appliance.database`; the SQL here
is written once for both, and both give the same answers and the same error codes. Several
processes use it at once (the worker, each task's process, the HTTP API's workers, ``imaging
tasks``): every read-modify-write runs in one short write transaction. On SQLite write transactions
exclude each other (``BEGIN IMMEDIATE``; WAL mode lets readers go on). On PostgreSQL they run
side by side, so what must not interleave is serialised explicitly: a task's row is locked
(``SELECT … FOR UPDATE``) before it is read to be changed; creating a task holds an advisory lock
for the admission decision below; inserting an event holds another until the commit, so event ids
become visible in increasing order and a reader that remembers the last id it saw misses none.

The schema evolves through :data:`MIGRATIONS`, applied in order in one transaction when a store
is opened (under a lock: appliances starting together against one PostgreSQL database migrate it
once); ``schema_version`` holds how many have been applied. A database written by newer code is
refused rather than misread.

Two admission rules are decisions of the store, not of its callers, because callers run in several
processes (the API's gunicorn workers): :meth:`Store.create_task` counts the active tasks against a
limit and inserts in one write transaction, and a client token is unique per (account, kind) by a
unique index, so a repeated request gets the task the first one created.

What people and the controller read is stored redacted (:mod:`appliance.redact`): events, status and
error messages, step errors and cancel reasons. Params, step arguments and results, and the task's
records (:meth:`Store.set_record`) keep what the task needs to run (presigned URLs, hook arguments)
and are redacted wherever they are shown.

Task states and the transitions between them are defined once, in :data:`TRANSITIONS`.
Timestamps are UTC ISO-8601 strings with a ``Z`` suffix and microseconds, so they sort as text.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from .database import (
    LOCK_ADMISSION,
    LOCK_EVENTS,
    LOCK_MIGRATIONS,
    POSTGRESQL,
    SQLITE,
    Connection,
    Database,
    Listener,
    Row,
    SQLiteDatabase,
    StoreConfig,
    as_settings,
)
from .errors import (
    DuplicateKey,
    IdempotentParameterMismatch,
    IncorrectState,
    LeaseLost,
    ResourceLimitExceeded,
    TaskNotFound,
    UsageError,
)

# defined with the other coded errors, importable from here too (where they are raised)
from .errors import StoreError as StoreError
from .errors import StoreUnavailable as StoreUnavailable
from .redact import redact, redact_text
from .timestamps import format_time, utc_now, utcnow


class ActiveTaskLimit(ResourceLimitExceeded):
    """Creating the task would make more than ``limit`` tasks active; ``active`` were counted."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} tasks are active (pending, running or cancelling), the limit is {limit}")
        self.active = active
        self.limit = limit


class TaskState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})
#: The states that count against an active-task limit: every state that is not terminal. A
#: ``cancelling`` task still holds its worker slot and scratch until its undo has finished.
ACTIVE_STATES = frozenset(TaskState) - TERMINAL_STATES

#: The only legal task state changes. ``pending → failed`` covers a task whose workflow can no
#: longer be loaded when a worker picks it up; ``cancelling → failed`` a cancel whose undo failed.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.RUNNING, TaskState.CANCELLED, TaskState.FAILED}),
    TaskState.RUNNING: frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLING}),
    TaskState.CANCELLING: frozenset({TaskState.CANCELLED, TaskState.FAILED}),
    TaskState.COMPLETED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.CANCELLED: frozenset(),
}


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNDONE = "undone"
    UNDO_FAILED = "undo_failed"


_STEP_FINISHED = frozenset(
    {StepState.COMPLETED, StepState.FAILED, StepState.SKIPPED, StepState.UNDONE, StepState.UNDO_FAILED}
)

LEDGER_ACTIONS = ("created", "removed", "leaked")

#: Caller-supplied task ids become scratch directory names, so they are restricted to a safe
#: alphabet (the same one :mod:`appliance.scratch` accepts).
TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
_DIALECT_SQL: dict[str, dict[str, str]] = {
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
_TOKEN_LOOKUP = "SELECT * FROM tasks WHERE client_account = ? AND kind = ? AND client_token = ?"
_COUNT_ACTIVE = f"SELECT COUNT(*) FROM tasks WHERE state IN ({', '.join('?' * len(ACTIVE_STATES))})"


def open_database(target: StoreConfig | Path | str, *, busy_timeout: float = 30.0) -> Database:
    """Open the task database ``target`` names (see :mod:`appliance.database`): store settings, a
    SQLite file, or a ``sqlite:``/``postgresql:`` URL. Raises :class:`StoreUnavailable` (it cannot be
    reached now) or :class:`StoreError`. Migrating it is :class:`Store`'s job."""
    settings = as_settings(target)
    if settings.backend == POSTGRESQL:
        from .postgres import PostgresDatabase  # psycopg is imported only where it is configured

        return PostgresDatabase(settings)
    return SQLiteDatabase(settings, busy_timeout=busy_timeout)


def new_task_id() -> str:
    return "t-" + secrets.token_hex(6)


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"value is not JSON-serialisable: {exc}") from exc


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class Task:
    """A snapshot of one task row (JSON columns decoded)."""

    id: str
    kind: str
    workflow: str | None
    params: dict[str, Any]
    state: TaskState
    status_message: str
    phase: str | None
    bytes_done: int | None
    bytes_total: int | None
    percent: float | None
    result: Any
    error_code: str | None
    error_message: str | None
    findings: list[dict[str, Any]]
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    owner: str | None
    lease_expires_at: str | None
    attempts: int
    cancel_reason: str | None = None
    bytes_converted: int = 0
    #: the account the task belongs to (its creator's); '' for none
    client_account: str = ""
    #: the fencing epoch: how many times the task was claimed (see :class:`Lease`)
    epoch: int = 0

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @property
    def lease(self) -> Lease | None:
        """The current owner's lease (None while nobody owns the task)."""
        return Lease(self.owner, self.epoch) if self.owner else None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; every field by name, ``state`` as its string."""
        d = asdict(self)
        d["state"] = str(self.state)
        return d

    @classmethod
    def _from_row(cls, row: Row) -> Task:
        d = dict(row)
        d["state"] = TaskState(d["state"])
        for key in ("params", "result", "findings"):
            d[key] = _loads(d[key])
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Lease:
    """A claim on a task: its owner and the task's fencing epoch the claim was granted.

    Every claim of a task (:meth:`Store.claim`, :meth:`Store.claim_pending`) increments the
    task's epoch. A write of a task run is made under a lease and the write statement itself
    checks it (``… WHERE id = ? AND owner = ? AND epoch = ?``): once another worker has claimed the
    task, the former owner's writes change nothing and raise :class:`LeaseLost`. A lease is never
    compared with a clock; its expiry only decides when another worker may claim the task.
    """

    owner: str
    epoch: int


@dataclass(frozen=True)
class StepRecord:
    """One executed (or skipped) step of a task; ``idx`` is its path, e.g. ``2.loop1`` or ``4/include/1``."""

    task_id: str
    seq: int
    idx: str
    name: str
    action: str
    state: StepState
    args: Any
    result: Any
    error: dict[str, Any] | None
    attempts: int
    undo: bool
    started_at: str | None
    finished_at: str | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        return d

    @classmethod
    def _from_row(cls, row: Row) -> StepRecord:
        d = dict(row)
        d["state"] = StepState(d["state"])
        d["undo"] = bool(d["undo"])
        for key in ("args", "result", "error"):
            d[key] = _loads(d[key])
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Event:
    """One entry of the event queue; ``id`` increases monotonically across all tasks."""

    id: int
    task_id: str
    time: str
    kind: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LedgerEntry:
    """A resource a task created, removed, or could not remove (``leaked``)."""

    id: int
    task_id: str
    time: str
    action: str
    resource: str
    step: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Store:
    """The task database ``target`` names (created and migrated on open): the store settings of the
    configuration (``config.store``), a SQLite file, or a ``sqlite:``/``postgresql:`` URL.

    Methods are thread-safe (SQLite: one connection behind a lock; PostgreSQL: a small connection
    pool), so an engine's step, heartbeat and watcher threads can share a store. Other processes
    open their own :class:`Store`. A database that cannot be reached raises
    :class:`StoreUnavailable` (from the constructor too); nothing was written then.
    """

    def __init__(self, target: StoreConfig | Path | str, *, busy_timeout: float = 30.0) -> None:
        #: what this store was opened with: another process (or the outbox) opens the same database
        self.settings = as_settings(target)
        self._db: Database = open_database(self.settings, busy_timeout=busy_timeout)
        #: the leases this store's process holds (task id → lease): every write of those tasks
        #: through this store is fenced with it (see :meth:`hold`)
        self._leases: dict[str, Lease] = {}
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The SQLite file; None on PostgreSQL."""
        return self.settings.path

    @property
    def dialect(self) -> str:
        """:data:`~appliance.config.SQLITE` or :data:`~appliance.config.POSTGRESQL`."""
        return self._db.dialect

    @property
    def name(self) -> str:
        """What messages call the database: its file or its URL (never with a password)."""
        return self._db.name

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self) -> AbstractContextManager[Connection]:
        """A short write transaction (see the module docstring for what it excludes)."""
        return self._db.transaction()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._db.read(sql, args)

    def _sql(self, name: str) -> str:
        return _DIALECT_SQL[self._db.dialect][name]

    def _version(self, read: Callable[[str, Sequence[Any]], list[Row]]) -> int:
        if not read(self._sql("table_exists"), ("schema_version",)):
            return 0
        rows = read("SELECT version FROM schema_version", ())
        return int(rows[0][0]) if rows else 0

    def _migrate(self) -> None:
        # Check first without a lock: a reader opening a current database never waits behind a writer.
        if self._version(self._read) == len(MIGRATIONS):
            return
        with self._write() as conn:
            # PostgreSQL: appliances starting together wait here for the first to migrate (SQLite's
            # write transaction excludes the others already)
            conn.lock(LOCK_MIGRATIONS)
            version = self._version(lambda sql, args: conn.execute(sql, args).fetchall())
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"task database {self.name} has schema version {version}, newer than this toolkit "
                    f"understands ({len(MIGRATIONS)}); upgrade the toolkit or point the store elsewhere"
                )
            if version == 0:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    sql = migration_sql(statement, conn.dialect)
                    if sql is not None:
                        conn.execute(sql)
            conn.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    @property
    def schema_version(self) -> int:
        """How many migrations the database has (a real read: health checks use it)."""
        return self._version(self._read)

    # -- fencing ------------------------------------------------------------------------------

    def hold(self, task_id: str, lease: Lease | None) -> None:
        """Make ``lease`` the one this store's writes of ``task_id`` carry (None: none). A claim
        through this store holds its lease already; a task's process that was handed a lease
        (:meth:`adopt`) holds that."""
        if lease is None:
            self._leases.pop(task_id, None)
        else:
            self._leases[task_id] = lease

    def held(self, task_id: str) -> Lease | None:
        """The lease this store's writes of ``task_id`` carry, if any."""
        return self._leases.get(task_id)

    def _fence(self, conn: Connection, task_id: str, lease: Lease | None = None) -> None:
        """Refuse the write transaction ``conn`` is in unless ``lease`` (default: the one held for
        the task) is still the task's: a write statement (it changes nothing) whose condition is
        the lease, so the check and the write are one. On PostgreSQL it also locks the task's row
        until the commit: a claim moving the epoch on waits for this transaction, or this statement
        waits for the claim and then finds the new epoch. Without a lease the write is unfenced
        (the API, the CLI, recovery sweeps: they are nobody's run)."""
        lease = lease or self._leases.get(task_id)
        if lease is None:
            return
        cur = conn.execute(
            "UPDATE tasks SET epoch = epoch WHERE id = ? AND owner = ? AND epoch = ?",
            (task_id, lease.owner, lease.epoch),
        )
        if cur.rowcount != 1:
            raise LeaseLost(
                f"task {task_id}: {lease.owner} (epoch {lease.epoch}) no longer holds it: another worker"
                " claimed it after the lease expired; nothing was written"
            )

    def check_lease(self, task_id: str, lease: Lease | None = None) -> None:
        """Raise :class:`LeaseLost` unless ``lease`` (default: the one held) is still the task's: a
        run calls this right before it finalises a target, so an owner that lost the task does not
        publish anything."""
        with self._write() as conn:
            self._fence(conn, task_id, lease)

    @staticmethod
    def _task_row(conn: Connection, task_id: str, *, lock: bool = False) -> Row:
        """The task's row; ``lock``: the transaction is about to change it (row-locked on PostgreSQL
        until the transaction ends, so concurrent read-modify-writes of one task take turns)."""
        sql = "SELECT * FROM tasks WHERE id = ?" + (conn.for_update if lock else "")
        row = conn.execute(sql, (task_id,)).fetchone()
        if row is None:
            raise TaskNotFound(f"no task {task_id!r}")
        return row

    @staticmethod
    def _require_task(conn: Connection, task_id: str) -> None:
        """:class:`TaskNotFound` unless the task exists; on PostgreSQL the row is share-locked (as the
        foreign key of a row referring to it would), so a transaction that goes on to insert an event
        takes the row's lock before the event lock, as every other transaction does."""
        lock = " FOR KEY SHARE" if conn.dialect == POSTGRESQL else ""
        if conn.execute("SELECT 1 FROM tasks WHERE id = ?" + lock, (task_id,)).fetchone() is None:
            raise TaskNotFound(f"no task {task_id!r}")

    @classmethod
    def _event(
        cls, conn: Connection, task_id: str, kind: str, data: dict[str, Any], now: str
    ) -> tuple[int, str]:
        """Insert an event; its data is stored redacted (events are read by people and the
        controller, never to run anything). Returns the id and the stored JSON.

        The event lock is held until the transaction ends: ids are handed out and become visible
        in the same order, one transaction at a time (lock order: the task's row, then this lock)."""
        stored = _dumps(redact(data))
        cls._require_task(conn, task_id)
        conn.lock(LOCK_EVENTS)
        row = conn.execute(
            "INSERT INTO events (task_id, time, kind, data) VALUES (?, ?, ?, ?) RETURNING id",
            (task_id, now, kind, stored),
        ).fetchone()
        return int(row[0]), stored

    def _update(self, conn: Connection, task_id: str, values: dict[str, Any]) -> Task:
        cols = ", ".join(f"{k} = ?" for k in values)
        row = conn.execute(
            f"UPDATE tasks SET {cols} WHERE id = ? RETURNING *", (*values.values(), task_id)
        ).fetchone()
        if row is None:
            raise TaskNotFound(f"no task {task_id!r}")
        return Task._from_row(row)

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
        params_json = _dumps(params or {})
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
                row = conn.execute(_TOKEN_LOOKUP, (client_account, kind, token)).fetchone()
                if json.loads(row["params"]) != json.loads(params_json):
                    raise IdempotentParameterMismatch(
                        f"the client token {token!r} was already used for task {row['id']} with "
                        "different parameters; repeat that request unchanged, or use a new token"
                    )
                return Task._from_row(row)
            if max_active is not None:
                others = int(conn.execute(_COUNT_ACTIVE, sorted(ACTIVE_STATES)).fetchone()[0]) - 1
                if others >= max_active:
                    raise ActiveTaskLimit(others, max_active)  # and the insert is rolled back
            self._event(conn, task_id, "task.state", {"state": "pending"}, now)
            conn.notify(CHANNEL_TASKS, task_id)
            return Task._from_row(self._task_row(conn, task_id))

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
        return Task._from_row(rows[0])

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
        return [Task._from_row(r) for r in self._read(sql, args)]

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
        Entering ``running`` stamps ``started_at``; a terminal state stamps ``finished_at`` and
        drops the lease.
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
            if new is TaskState.COMPLETED:
                values["percent"] = 100.0
            if status_message is not None:
                values["status_message"] = redact_text(status_message)
            if result is not None:
                values["result"] = _dumps(result)
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
                return Task._from_row(self._task_row(conn, task_id))
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
            task = Task._from_row(claimed)
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
            tasks = sorted((Task._from_row(r) for r in rows), key=lambda t: (t.created_at, t.id))
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
        task = Task._from_row(row)
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
    ) -> Task:
        """Record progress without ever moving it backwards.

        ``percent`` never decreases over the task's life. ``bytes_done``/``bytes_total`` never
        decrease within a phase; a new ``phase`` starts its own byte counters (a download's bytes
        and a conversion's bytes are different quantities). ``bytes_converted`` (bytes written to
        the target) never decreases over the task's life.
        """
        now = utcnow()
        with self._write() as conn:
            self._fence(conn, task_id, lease)
            row = self._task_row(conn, task_id, lock=True)
            values: dict[str, Any] = {"updated_at": now}
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
            return self._update(conn, task_id, values)

    def add_findings(self, task_id: str, findings: Iterable[Any]) -> Task:
        """Add findings to the task's, each once (several steps judge one task: inspection, guest
        validation, policy; a retried step reports the same findings again)."""
        items = [f.to_dict() if hasattr(f, "to_dict") else dict(f) for f in findings]
        with self._write() as conn:
            self._fence(conn, task_id)
            current = json.loads(self._task_row(conn, task_id, lock=True)["findings"])
            merged = current + [f for i, f in enumerate(items) if f not in current and f not in items[:i]]
            return self._update(conn, task_id, {"findings": _dumps(merged), "updated_at": utcnow()})

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
        finished = now if st in _STEP_FINISHED else None
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
                    _dumps(args),
                    _dumps(result),
                    None if error is None else _dumps(redact(error)),
                    attempts or 0,
                    int(undo),
                    started,
                    finished,
                    attempts,
                ),
            ).fetchone()
            return StepRecord._from_row(row)

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
                (str(st), None if error is None else _dumps(redact(error)), utcnow(), task_id, idx),
            ).fetchone()
            if row is None:
                raise UsageError(f"task {task_id} has no step {idx!r}")
            return StepRecord._from_row(row)

    def step_results(self, task_id: str) -> list[StepRecord]:
        """The task's step records in the order they were first started."""
        rows = self._read("SELECT * FROM steps WHERE task_id = ? ORDER BY seq", (task_id,))
        return [StepRecord._from_row(r) for r in rows]

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
                (task_id, name, _dumps(value)),
            )

    def record(self, task_id: str, name: str) -> Any:
        """The value kept under ``name`` for the task (:meth:`set_record`), or None."""
        rows = self._read("SELECT data FROM task_records WHERE task_id = ? AND name = ?", (task_id, name))
        return _loads(rows[0]["data"]) if rows else None

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
            Event(r["id"], r["task_id"], r["time"], r["kind"], _loads(r["data"]))
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
                (task_id, step, _dumps(data), epoch, utcnow()),
            )

    def load_checkpoint(self, task_id: str, step: str) -> dict[str, Any] | None:
        """The step's last checkpoint (:meth:`save_checkpoint`), or None."""
        rows = self._read("SELECT data FROM checkpoints WHERE task_id = ? AND step = ?", (task_id, step))
        return _loads(rows[0]["data"]) if rows else None

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
