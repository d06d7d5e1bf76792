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

_current: dict[str, Any] = {}


def settings() -> dict[str, Any]:
    """The ``store`` section of the running test (empty: SQLite under ``state_dir``)."""
    return dict(_current)


def with_store(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a configuration mapping) with the running test's ``store`` section."""
    return {**data, "store": settings()} if _current else data


@contextmanager
def using(store: dict[str, Any]) -> Iterator[None]:
    """Make ``store`` the running test's ``store`` section until the block ends."""
    previous = dict(_current)
    _current.clear()
    _current.update(store)
    try:
        yield
    finally:
        _current.clear()
        _current.update(previous)
