"""The PostgreSQL backend of the task database (see :mod:`appliance.database`): psycopg 3 and its pool.

Imported only when ``store.url`` is a ``postgresql://`` URL. Each process keeps a small pool
(``store.pool_size`` connections, one opened up front) shared by its threads; every connection is
in autocommit mode, so a read is one statement and a write transaction is an explicit ``BEGIN`` …
``COMMIT`` (:meth:`PostgresDatabase.transaction`). A connection is checked before it is handed
out, so one that a server restart broke is replaced instead of failing a call; while the server
cannot be reached every call fails within ``store.connect_timeout`` seconds with
:class:`~appliance.errors.StoreUnavailable` and the pool keeps reconnecting in the background.

SQL arrives with ``?`` placeholders (the store's SQL is written once for both backends) and is
rewritten to psycopg's ``%s``. Rows support ``row["name"]``, ``row[0]`` and ``dict(row)``, as
``sqlite3.Row`` does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import psycopg_pool
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
    """The password: ``store.password``, or the first line of ``store.password_file`` (read anew for
    every connection, so a rotated password is picked up). The value is remembered as a secret, so
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
    """Errors of the caller, not of the database (a closed store): they propagate as they are."""
    return isinstance(exc, psycopg_pool.PoolClosed | psycopg.InterfaceError)


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


class PostgresDatabase:
    """A PostgreSQL database through a connection pool (see the module docstring)."""

    dialect = POSTGRESQL

    def __init__(self, settings: StoreConfig) -> None:
        self.settings = settings
        self.name = redact_url(settings.url)
        self.path = None
        kwargs: Callable[[], dict[str, Any]] = functools.partial(connect_kwargs, settings)
        # One connection first, outside the pool: a refused password or a missing database is then
        # reported as what it is, not as a pool that timed out retrying in the background.
        try:
            psycopg.connect(settings.url, **kwargs()).close()
        except psycopg.Error as exc:
            raise coded(exc, self.name) from exc
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
            settings.url,
            kwargs=kwargs,
            min_size=1,
            max_size=settings.pool_size,
            open=False,
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=settings.connect_timeout,
            name="imaging-store",
        )
        try:
            self._pool.open(wait=True, timeout=settings.connect_timeout)
        except psycopg.Error as exc:
            self._pool.close(timeout=0)
            if isinstance(exc, psycopg_pool.PoolTimeout):
                raise StoreUnavailable(
                    f"task database {self.name} cannot be reached (no connection within "
                    f"{settings.connect_timeout:g} s)"
                ) from exc
            raise coded(exc, self.name) from exc
        except BaseException:
            self._pool.close(timeout=0)
            raise

    def close(self) -> None:
        self._pool.close(timeout=5)

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

    def execute_script(self, statements: Sequence[str]) -> None:
        """Run ``statements`` in autocommit mode (administration, e.g. ``CREATE DATABASE``)."""
        with self._connection() as conn:
            for statement in statements:
                PgConnection(conn, self.name).execute(statement)
