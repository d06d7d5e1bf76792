"""The task database of the running test, for the helpers that write configurations.

The ``store_settings`` fixture (``tests/conftest.py``) puts the test's ``store`` section here while
the test runs; :func:`with_store` adds it to a configuration mapping, so the suites that run on both
backends build every configuration (in-process, or a file for `imaging serve`/`imaging worker`) on
the backend of the current run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from appliance import config as config_mod
from appliance.config import Config
from appliance.database import StoreConfig
from appliance.store import open_database
from tests.postgres import Cluster

_current: dict[str, Any] = {}
#: the running test's PostgreSQL cluster and schema (None on SQLite)
_postgres: tuple[Cluster, str] | None = None


def settings() -> dict[str, Any]:
    """The ``store`` section of the running test (empty: SQLite under ``state_dir``)."""
    return dict(_current)


def with_store(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a configuration mapping) with the running test's ``store`` section; on PostgreSQL
    a ``file`` volume target (the default) is marked ``shared``, as a fleet's must be: the test's
    appliances run on this one machine."""
    if not _current:
        return data
    return shared_volumes({**data, "store": settings()})


def shared_volumes(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its ``file`` volume target (the default one too) marked ``shared``."""
    targets = dict(data.get("targets") or {})
    volume = dict(targets.get("volume") or {"type": "file"})
    if volume.get("type") == "file":
        volume["shared"] = True
    targets["volume"] = volume
    return {**data, "targets": targets}


@contextmanager
def using(store: dict[str, Any], cluster: Cluster | None = None, schema: str | None = None) -> Iterator[None]:
    """Make ``store`` the running test's ``store`` section until the block ends (on PostgreSQL: in
    ``schema`` of ``cluster``)."""
    global _postgres
    previous = (dict(_current), _postgres)
    _current.clear()
    _current.update(store)
    _postgres = (cluster, schema) if cluster is not None and schema is not None else None
    try:
        yield
    finally:
        _current.clear()
        _current.update(previous[0])
        _postgres = previous[1]


def with_password(password: str) -> dict[str, Any]:
    """The running test's ``store`` section logging in with ``password``: on PostgreSQL as a role
    that needs it (SCRAM, a wrong one is refused); on SQLite the password is only configured."""
    if _postgres is None:
        return {**_current, "password": password}
    cluster, schema = _postgres
    role = cluster.create_login(schema, password)
    return {"url": cluster.schema_url(schema, user=role), "password": password}


def config(data: dict[str, Any], **kwargs: Any) -> Config:
    """``appliance.config.from_dict`` of ``data`` with the running test's ``store`` section."""
    return config_mod.from_dict(with_store(data), **kwargs)


def sql(target: StoreConfig, statement: str, args: tuple[Any, ...] = ()) -> list[Any]:
    """Run one statement on the task database itself (``?`` placeholders), in a transaction of its
    own, as another program would; a ``SELECT``'s rows."""
    db = open_database(target)
    try:
        with db.transaction() as conn:
            cur = conn.execute(statement, args)
            return cur.fetchall() if statement.lstrip().upper().startswith(("SELECT", "EXPLAIN")) else []
    finally:
        db.close()
