"""The store's plumbing: opening and migrating the database, write transactions, lease fencing."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Self

from ..database import (
    LOCK_EVENTS,
    POSTGRESQL,
    Connection,
    Database,
    Row,
    StoreConfig,
    as_settings,
)
from ..errors import (
    LeaseLost,
    TaskNotFound,
)
from ..redact import redact
from .model import Lease, Task, dumps
from .schema import DIALECT_SQL, MIGRATIONS, apply_migrations, open_database, schema_version


class StoreBase:
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self) -> AbstractContextManager[Connection]:
        """A short write transaction (see the module docstring for what it excludes)."""
        return self._db.transaction()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._db.read(sql, args)

    def _sql(self, name: str) -> str:
        return DIALECT_SQL[self._db.dialect][name]

    def _migrate(self) -> None:
        apply_migrations(self._db, MIGRATIONS, "task database", "this toolkit")

    @property
    def schema_version(self) -> int:
        """How many migrations the database has (a real read: health checks use it)."""
        return schema_version(self._db)

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
        stored = dumps(redact(data))
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
        return Task.from_row(row)
