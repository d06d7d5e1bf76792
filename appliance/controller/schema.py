"""The controller database's schema: versioned migrations, applied as the task store's are
(:func:`appliance.store.apply_migrations`: SQLite's SQL, PostgreSQL's after
:func:`appliance.store.postgresql_ddl`)."""

from __future__ import annotations

from ..store import Dialects

#: Ordered schema migrations (statements, never edited once released: append a new entry).
MIGRATIONS: list[tuple[str | Dialects, ...]] = [
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

#: the columns of an appliance's view (:class:`~.model.ApplianceRow`): all but its secret
APPLIANCE_COLUMNS = (
    "seq, id, dynamic, config_version, registered_at, assigned_to, assigned_at, status, health, "
    "addresses, parameters, errors, tasks, last_seen, last_seq, updated_at, applied_version"
)
