"""The PostgreSQL backend of the task database (see :mod:`appliance.database`): psycopg 3 and a small pool.

Imported only when ``store.url`` is a ``postgresql://`` URL. Each process keeps up to
``store.pool_size`` connections, shared by its threads (:class:`Pool`); every connection is in
autocommit mode, so a read is one statement and a write transaction an explicit ``BEGIN`` …
``COMMIT`` (:meth:`PostgresDatabase.transaction`).

The pool is this module's own, not psycopg_pool, for how it behaves when the database goes away,
which is what a fleet sharing one database must get right: a call connects when it needs a
connection, in the calling thread, so while the server cannot be reached each call fails at once
with :class:`~appliance.errors.StoreUnavailable` naming the cause (psycopg_pool makes every caller
wait its full timeout, then reports only that it timed out, while background threads retry with a
growing back-off and log each failure), and the first call after the server is back gets a new
connection (no back-off to wait out). An idle connection is checked before it is handed out, so one
that a server restart broke is replaced instead of failing a call: a poll of its socket, which a
server ending the session makes readable, and an empty query only when it is (a round trip per call
would double the cost of a one-row read). There are no
threads to survive a ``fork`` or to outlive a closed store.

SQL arrives with ``?`` placeholders (the store's SQL is written once for both backends) and is
rewritten to psycopg's ``%s``. Rows behave like ``sqlite3.Row``.
"""

from __future__ import annotations

import functools
import math
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
from psycopg.pq import TransactionStatus
from psycopg.rows import RowMaker

from . import redact
from .database import POSTGRESQL, StoreConfig
from .errors import DuplicateKey, StoreError, StoreUnavailable
from .redact import redact_text, redact_url

#: the name connections show in ``pg_stat_activity``
APPLICATION_NAME = "imaging-appliance"


class PgRow:
    """One row, as ``sqlite3.Row`` is: by column name or position, iterating over the values,
    ``keys()`` the column names (so ``dict(row)`` maps them to the values)."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: Sequence[Any]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key] if isinstance(key, int) else self._values[self._index[key]]

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PgRow) and self._index == other._index and self._values == other._values

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PgRow({dict(self)!r})"


def pg_row(cursor: Any) -> RowMaker[PgRow]:
    """psycopg row factory making :class:`PgRow` rows."""
    index = {column.name: i for i, column in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(index, values)

    return make


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """``sql`` with ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled); quoted text is
    left alone."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if quote is not None:
            out.append("%%" if ch == "%" else ch)
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out)


def read_password(settings: StoreConfig) -> str | None:
    """The password: ``store.password``, or the first line of ``store.password_file`` (read for
    every new connection, so a rotated password is picked up). The value is remembered as a secret, so
    it shows as REDACTED wherever it might surface."""
    if settings.password_file is not None:
        try:
            text = Path(settings.password_file).read_text()
        except OSError as exc:
            raise StoreError(
                f"cannot read store.password_file {settings.password_file}: {exc.strerror or exc}"
            ) from exc
        lines = text.splitlines()
        password = lines[0] if lines else ""
        if not password:
            raise StoreError(f"store.password_file {settings.password_file} is empty")
        redact.remember([password])
        return password
    return settings.password


def connect_kwargs(settings: StoreConfig) -> dict[str, Any]:
    """Connection parameters besides the URL (libpq keywords and psycopg options)."""
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "row_factory": pg_row,
        "application_name": APPLICATION_NAME,
        # libpq counts whole seconds and treats less than 2 as 2
        "connect_timeout": max(2, math.ceil(settings.connect_timeout)),
        # no server-side prepared statements: a plan cached before another appliance migrated the
        # schema would fail ("cached plan must not change result type")
        "prepare_threshold": None,
        # over TCP: a server that vanished (a failover, a partition) is noticed within about half a
        # minute instead of the kernel's quarter of an hour; ignored on a Unix socket
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    }
    password = read_password(settings)
    if password is not None:
        kwargs["password"] = password
    for key in ("sslmode", "sslrootcert", "sslcert", "sslkey"):
        value = getattr(settings, key)
        if value is not None:
            kwargs[key] = str(value)
    return kwargs


def coded(exc: psycopg.Error, name: str) -> StoreError:
    """The coded error for a psycopg one (its text redacted: a server may quote what it was sent).

    Refused credentials and a database that does not exist are configuration errors
    (:class:`StoreError`); a server that cannot be reached, is starting, shutting down or is a
    read-only standby is an outage (:class:`StoreUnavailable`)."""
    lines = str(exc).strip().splitlines()
    text = redact_text(" ".join(line.strip() for line in lines[:2]) if lines else type(exc).__name__)
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return DuplicateKey(f"task database {name}: {text}")
    if sqlstate.startswith("28") or sqlstate == "3D000" or "authentication failed" in text:
        return StoreError(f"task database {name} refused the connection: {text}")
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.ReadOnlySqlTransaction):
        return StoreUnavailable(f"task database {name} cannot be reached: {text}")
    return StoreError(f"task database {name}: {text}")


def _passthrough(exc: BaseException) -> bool:
    """Errors of the caller, not of the database (a closed connection used): they propagate as they are."""
    return isinstance(exc, psycopg.InterfaceError)


class PgConnection:
    """A pooled psycopg connection with the :class:`appliance.database.Connection` interface."""

    dialect = POSTGRESQL
    for_update = " FOR UPDATE"

    def __init__(self, conn: psycopg.Connection[Any], name: str) -> None:
        self._conn = conn
        self._name = name

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        try:
            return self._conn.execute(pg_sql(sql), tuple(args))
        except psycopg.Error as exc:
            if _passthrough(exc):
                raise
            raise coded(exc, self._name) from exc

    def lock(self, key: int) -> None:
        self.execute("SELECT pg_advisory_xact_lock(?)", (key,))

    def notify(self, channel: str, payload: str = "") -> None:
        # channels are per schema: stores in other schemas of the same database hear nothing
        self.execute("SELECT pg_notify(current_schema() || ':' || ?, ?)", (channel, payload))


class PgListener:
    """A connection of its own (never pooled, autocommit) that ``LISTEN``s; see
    :class:`appliance.database.Listener`."""

    def __init__(self, conn: psycopg.Connection[Any], channels: Sequence[str], name: str) -> None:
        self._conn = conn
        self._name = name
        try:
            row = conn.execute("SELECT current_schema()").fetchone()
            self._prefix = f"{row[0] if row else 'public'}:"
            for channel in channels:
                quoted = (self._prefix + channel).replace('"', '""')
                conn.execute(f'LISTEN "{quoted}"')
        except psycopg.Error as exc:
            conn.close()
            raise coded(exc, name) from exc

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        try:
            for note in self._conn.notifies(timeout=max(0.0, timeout), stop_after=1):
                out.append((note.channel.removeprefix(self._prefix), note.payload))
            if out:  # what else already arrived, without waiting
                for note in self._conn.notifies(timeout=0.0):
                    out.append((note.channel.removeprefix(self._prefix), note.payload))
        except psycopg.Error as exc:
            raise coded(exc, self._name) from exc
        return out

    def close(self) -> None:
        self._conn.close()


def _suspect(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle pooled connection may be broken: closed, or its socket readable. An idle
    connection in autocommit mode has nothing to read unless the server spoke unasked, and a server
    that ends a session (a restart, a shutdown, ``pg_terminate_backend``) says so and closes the
    socket: it becomes readable. Checked with a poll of the socket (no round trip), so a healthy
    connection is handed out as it is and only a suspect one is tried with an empty query."""
    if conn.closed:
        return True
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


class Pool:
    """Up to ``size`` connections made by ``connect``, shared by threads (see the module docstring)."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], size: int, timeout: float) -> None:
        self._connect = connect
        self._timeout = timeout
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for the block; given back (or dropped, if it broke or was left in a
        transaction) at its end. Waits up to ``timeout`` seconds for a free one."""
        if self._closed:
            raise RuntimeError("the task database was closed")
        if not self._slots.acquire(timeout=self._timeout):
            raise psycopg.OperationalError(f"all connections stayed busy for {self._timeout:g} s")
        try:
            conn = self._take()
            try:
                yield conn
            finally:
                self._give_back(conn)
        finally:
            self._slots.release()

    def _take(self) -> psycopg.Connection[Any]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if not _suspect(conn):
                return conn
            try:
                conn.execute("")  # the server may have restarted since this connection was last used
                return conn
            except psycopg.Error:
                conn.close()

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        usable = not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE
        with self._lock:
            if usable and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresDatabase:
    """A PostgreSQL database through a :class:`Pool` (see the module docstring)."""

    dialect = POSTGRESQL

    def __init__(self, settings: StoreConfig) -> None:
        self.settings = settings
        self.name = redact_url(settings.url)
        self.path = None

        def connect() -> psycopg.Connection[Any]:
            return psycopg.connect(settings.url, **connect_kwargs(settings))

        self._connect = connect
        self._pool = Pool(connect, settings.pool_size, settings.connect_timeout)
        # one connection now: a database that cannot be used is reported when it is opened
        with self._connection():
            pass

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            if _passthrough(exc):
                raise
            raise coded(exc, self.name) from exc

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        with self._connection() as conn, conn.transaction():
            yield PgConnection(conn, self.name)

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._connection() as conn:
            return PgConnection(conn, self.name).execute(sql, args).fetchall()

    def listen(self, channels: Sequence[str]) -> PgListener:
        try:
            conn = self._connect()
        except psycopg.Error as exc:
            raise coded(exc, self.name) from exc
        return PgListener(conn, channels, self.name)
