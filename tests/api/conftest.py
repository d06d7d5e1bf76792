"""Fixtures of the end-to-end API tests: `imaging serve` (gunicorn) and `imaging worker` as real
processes, S3 on the session's moto server, a scripted HTTP server for manifest parts.

Every test here runs on both task-database backends, SQLite and PostgreSQL (see tests/conftest.py);
modules of the protocol layer alone say ``pytest.mark.backends("sqlite")``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.e2e_support import Appliance, running_appliance
from tests.httpfixtures import TestHTTPServer
from tests.servers import MotoServer


@pytest.fixture(autouse=True)
def _both_backends(store_settings: dict[str, Any]) -> None:
    """The configurations the tests build use this run's backend (tests.stores.with_store)."""


@pytest.fixture
def parts_server() -> Iterator[TestHTTPServer]:
    """A scripted HTTP server (stalls on demand) that the appliance may fetch parts from."""
    with TestHTTPServer() as server:
        yield server


@pytest.fixture
def appliance(tmp_path: Path, moto: MotoServer, parts_server: TestHTTPServer) -> Iterator[Appliance]:
    with running_appliance(tmp_path, moto, parts_server) as app:
        yield app


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    name = "e2e-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    moto.client("s3").create_bucket(Bucket=name)
    return name
