"""Every test here runs on both task-database backends, SQLite and PostgreSQL (see tests/conftest.py);
a module that never opens the task database says so with ``pytest.mark.backends("sqlite")``."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _both_backends(store_settings: dict[str, Any]) -> None:
    """The configurations the tests build use this run's backend (tests.stores.with_store)."""
