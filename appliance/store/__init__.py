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

# the coded errors the store raises, importable from here too
from ..errors import StoreError, StoreUnavailable, TaskNotFound
from .base import StoreBase
from .journal import JournalOps
from .leases import LeaseOps
from .model import (
    ACTIVE_STATES,
    LEDGER_ACTIONS,
    REPORTER_RECORD,
    TASK_ID_RE,
    TERMINAL_STATES,
    TRANSITIONS,
    ActiveTaskLimit,
    Event,
    Lease,
    LedgerEntry,
    StepRecord,
    StepState,
    Task,
    TaskState,
    new_task_id,
)
from .schema import (
    CHANNEL_CANCEL,
    CHANNEL_TASKS,
    MIGRATIONS,
    Dialects,
    apply_migrations,
    migration_sql,
    open_database,
    postgresql_ddl,
)
from .tasks import TaskOps

__all__ = [
    "ACTIVE_STATES",
    "CHANNEL_CANCEL",
    "CHANNEL_TASKS",
    "LEDGER_ACTIONS",
    "MIGRATIONS",
    "REPORTER_RECORD",
    "TASK_ID_RE",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "ActiveTaskLimit",
    "Dialects",
    "Event",
    "Lease",
    "LedgerEntry",
    "StepRecord",
    "StepState",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Task",
    "TaskNotFound",
    "TaskState",
    "apply_migrations",
    "migration_sql",
    "new_task_id",
    "open_database",
    "postgresql_ddl",
]


class Store(TaskOps, LeaseOps, JournalOps, StoreBase):
    """The task database ``target`` names (created and migrated on open): the store settings of the
    configuration (``config.store``), a SQLite file, or a ``sqlite:``/``postgresql:`` URL. Its
    operations are grouped by concern: :class:`~.tasks.TaskOps` (tasks and their states),
    :class:`~.leases.LeaseOps` (claims), :class:`~.journal.JournalOps` (steps, records, events,
    ledger, checkpoints, doorbells) over :class:`~.base.StoreBase` (the connection, migrations,
    fencing); see :class:`~.base.StoreBase` for threads and errors."""
