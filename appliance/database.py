"""The connection layer under the task database: SQLite or PostgreSQL behind one small interface.

:class:`appliance.store.Store`, the report outbox and the pull reporter's table go through
:func:`open_database` and nothing else: they write SQL once, with ``?`` placeholders, and the
backend runs it. What a backend provides:

- :meth:`Database.transaction`: a short write transaction, committed at the end of the block and
  rolled back on any exception. SQLite takes the database's write lock at its start (``BEGIN
  IMMEDIATE``: writers never deadlock on a lock upgrade), so every write transaction is serialised.
  PostgreSQL runs them concurrently (READ COMMITTED); the store serialises what must be, with row
  locks (:attr:`Connection.for_update`) and transaction-scoped advisory locks (:meth:`Connection.lock`).
- :meth:`Database.read`: one statement outside any write transaction.
- coded errors: :class:`~appliance.errors.StoreUnavailable`
  when the database cannot be reached (PostgreSQL down or restarting, a SQLite file locked past the
  busy timeout), :class:`~appliance.errors.DuplicateKey` for a unique-constraint violation, and
  :class:`~appliance.errors.StoreError` for anything else. No driver exception leaves this layer.

SQLite is the embedded default, one file in ``state_dir``, in WAL mode: readers never block the
writer nor each other, and every connection waits ``busy_timeout`` for the write lock instead of
failing. PostgreSQL (:mod:`appliance.postgres`, imported only when configured) lets several
appliances share one database; it brings its own high availability.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from .errors import DuplicateKey, StoreError, StoreUnavailable
from .redact import redact_url
from .statedir import private_dir, private_file

#: keys of the transaction-scoped locks (PostgreSQL advisory locks; one 64-bit namespace shared
#: with every other user of the database, hence the ``imag`` prefix)
LOCK_MIGRATIONS = 0x696D_6167_0000_0001
LOCK_ADMISSION = 0x696D_6167_0000_0002
LOCK_EVENTS = 0x696D_6167_0000_0003
LOCK_OUTBOX = 0x696D_6167_0000_0004
#: the controller's store (:mod:`appliance.controller.store`): handing out dynamic configurations, events
LOCK_CONTROLLER_ASSIGN = 0x696D_6167_0000_0101
LOCK_CONTROLLER_EVENTS = 0x696D_6167_0000_0102


SQLITE = "sqlite"
POSTGRESQL = "postgresql"


@dataclass(frozen=True)
class StoreConfig:
    """Where the task database is: a SQLite file (``sqlite:///…``) or a PostgreSQL database
    (``postgresql://…``), with what it takes to connect (see :mod:`appliance.database`)."""

    #: ``sqlite:////absolute/path`` (made absolute at load) or a libpq URI without a password
    url: str
    #: the PostgreSQL password as configured; never shown (``repr`` hides it)
    password: str | None = field(default=None, repr=False)
    #: a file holding the password, read when the database is opened
    password_file: Path | None = None
    sslmode: str | None = None
    sslrootcert: Path | None = None
    sslcert: Path | None = None
    sslkey: Path | None = None
    connect_timeout: float = 5.0
    pool_size: int = 4

    @classmethod
    def sqlite(cls, path: Path | str) -> StoreConfig:
        """The SQLite database at ``path`` (made absolute)."""
        return cls(url="sqlite:///" + str(Path(path).absolute()))

    @property
    def backend(self) -> str:
        """:data:`SQLITE` or :data:`POSTGRESQL`."""
        return SQLITE if self.url.startswith("sqlite:") else POSTGRESQL

    @property
    def path(self) -> Path | None:
        """The SQLite file; None for PostgreSQL."""
        return Path(self.url.removeprefix("sqlite:///")) if self.backend == SQLITE else None


def check_store_url(url: str) -> str | None:
    """What is wrong with a ``store.url`` beyond the schema's pattern, or None. A PostgreSQL URL must
    not carry a password (in its user info or as a ``password`` parameter): secrets live under
    secret keys (``store.password``, ``store.password_file``), where every output hides them."""
    if url.startswith("sqlite:"):
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
        params = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError as exc:
        return f"is not a valid PostgreSQL URL: {exc}"
    if parts.password is not None or any(k == "password" for k, _ in params):
        return "must not carry a password: put it in store.password or store.password_file"
    if parts.fragment:
        return "must not have a fragment"
    return None


class Row(Protocol):
    """A result row: by column name or position; ``dict(row)`` gives the columns by name."""

    def __getitem__(self, key: Any) -> Any: ...

    def keys(self) -> Iterable[str]: ...


class Cursor(Protocol):
    """What a statement returns."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """A connection inside a transaction of :meth:`Database.transaction`."""

    #: :data:`~appliance.config.SQLITE` or :data:`~appliance.config.POSTGRESQL`
    dialect: str
    #: appended to a ``SELECT`` of rows the transaction will change (``FOR UPDATE`` on PostgreSQL;
    #: nothing on SQLite, whose write transactions exclude each other already)
    for_update: str

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        """Run one statement (``?`` placeholders)."""
        ...

    def lock(self, key: int) -> None:
        """Hold the lock ``key`` until the transaction ends: a PostgreSQL advisory lock; nothing on
        SQLite (the write transaction holds the whole database)."""
        ...

    def notify(self, channel: str, payload: str = "") -> None:
        """Ring ``channel`` when the transaction commits (PostgreSQL ``NOTIFY``, scoped to the
        store's schema); nothing on SQLite, where a worker only polls."""
        ...


class Listener(Protocol):
    """A dedicated connection listening for :meth:`Connection.notify` doorbells (PostgreSQL only).
    A doorbell is a hint that something changed, never the thing itself: what it announces is
    read from the tables, and a doorbell missed while disconnected is made up for by polling."""

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """The ``(channel, payload)`` pairs that arrived within ``timeout`` seconds (returns at the
        first); raises :class:`StoreUnavailable` when the connection is lost."""
        ...

    def close(self) -> None: ...


class Database(Protocol):
    """An open task database (see the module docstring)."""

    dialect: str
    #: what messages call it: the file, or the URL (never with a password)
    name: str
    settings: StoreConfig

    def transaction(self) -> AbstractContextManager[Connection]: ...

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...

    def listen(self, channels: Sequence[str]) -> Listener | None:
        """A :class:`Listener` on ``channels``, or None where there are no doorbells (SQLite)."""
        ...

    def close(self) -> None: ...


def describe(settings: StoreConfig) -> str:
    """How messages name the database: its file, or its URL (user info redacted)."""
    path = settings.path
    return str(path) if path is not None else redact_url(settings.url)


def as_settings(target: StoreConfig | Path | str) -> StoreConfig:
    """``target`` as store settings: a path is a SQLite file, a string with ``://`` a URL. Anything
    else (``None``: e.g. the SQLite path of a PostgreSQL store) is refused rather than turned into a
    file named after it in the working directory."""
    if isinstance(target, StoreConfig):
        return target
    if not isinstance(target, str | Path) or not str(target):
        raise StoreError(f"no task database given ({target!r}): store settings, a SQLite file or a URL")
    text = str(target)
    if "://" in text:
        if text.startswith("sqlite:"):
            return StoreConfig.sqlite(text.removeprefix("sqlite:///"))
        return StoreConfig(url=text)
    return StoreConfig.sqlite(Path(text))


# -- SQLite ---------------------------------------------------------------------------------------


def _sqlite_error(exc: sqlite3.Error, name: str) -> StoreError:
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE constraint failed" in text:
        return DuplicateKey(f"task database {name}: {text}")
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return StoreUnavailable(f"task database {name} is busy ({text}); retry later")
    return StoreError(f"task database {name}: {text}")


class _SQLiteConnection:
    """A sqlite3 connection with the :class:`Connection` interface (errors coded)."""

    dialect = SQLITE
    for_update = ""

    def __init__(self, conn: sqlite3.Connection, name: str) -> None:
        self._conn = conn
        self._name = name

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, args)
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # misuse (a closed store, a bad statement): a bug, not a state of the database
        except sqlite3.Error as exc:
            raise _sqlite_error(exc, self._name) from exc

    def lock(self, key: int) -> None:
        return None

    def notify(self, channel: str, payload: str = "") -> None:
        return None


def _enter_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another connection holds the lock it needs.

    Switching a new database into WAL needs an exclusive lock, and SQLite answers ``SQLITE_BUSY`` at
    once, without its busy handler, when that would deadlock against another connection doing the
    same: several processes opening a fresh database together (the API's workers and the worker at
    first boot) then fail with "database is locked" although waiting would do.
    """
    deadline = time.monotonic() + busy_timeout
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


class SQLiteDatabase:
    """One SQLite file, one connection shared by the process's threads behind a lock.

    ``isolation_level=None``: no implicit transactions; :meth:`transaction` opens them.
    """

    dialect = SQLITE

    def __init__(self, settings: StoreConfig, *, busy_timeout: float = 30.0) -> None:
        path = settings.path
        assert path is not None
        self.settings = settings
        self.path = path
        self.name = str(path)
        self._lock = threading.RLock()
        try:
            # created private (0700 directory, 0600 file) before SQLite opens it under the umask; its
            # WAL and shared-memory files take the database file's mode
            private_file(private_dir(path.parent) / path.name)
            conn = sqlite3.connect(
                str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open task database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._conn = conn
        self._wrapped = _SQLiteConnection(conn, self.name)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            _enter_wal(conn, busy_timeout)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot use task database {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self._lock:
            self._wrapped.execute("BEGIN IMMEDIATE")
            try:
                yield self._wrapped
                self._wrapped.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._wrapped.execute(sql, args).fetchall()

    def listen(self, channels: Sequence[str]) -> Listener | None:
        return None
