"""Shared fixtures: real servers on loopback, and the task database of each test on both backends.

Also the per-test S3 set-up most import tests share: a new ``bucket`` on that server and the stalling
``proxy`` in front of it (:mod:`tests.stallproxy`); a ``conftest.py`` or module below that defines a
fixture of the same name uses its own.

A test (or a whole suite, through an autouse fixture in its ``conftest.py``) that uses
``store_backend`` runs twice: on SQLite and on PostgreSQL (a real server, one per session, a fresh
schema per test). ``@pytest.mark.backends("sqlite")`` keeps a test to the backends it names
(e.g. one that opens the SQLite file itself).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.database import StoreConfig
from tests import stores
from tests.postgres import Cluster, postgres_cluster
from tests.servers import MotoServer, moto_server
from tests.stallproxy import StallingProxy

BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        metafunc.parametrize("store_backend", marker.args if marker else BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server process for the session (S3 and EC2 over HTTP); tests use unique bucket names
    or call ``moto.reset()``."""
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    """A new bucket of this test on the session's moto server: named after the test so that the
    server's requests can be told apart, and unique because the server outlives every test (the
    variants of a parametrized test share their first 40 characters)."""
    readable = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{readable}-{uuid.uuid4().hex[:8]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[StallingProxy]:
    """The stalling proxy in front of the moto server (counts what it serves, holds GETs on demand)."""
    with StallingProxy(moto.endpoint) as p:
        yield p


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """One PostgreSQL server for the session (started on first use, stopped and removed at the end)."""
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgresql``: the backend of this run of the test."""
    return str(request.param)


@pytest.fixture
def store_settings(store_backend: str, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The configuration's ``store`` section for this test: empty for SQLite (the default file in
    ``state_dir``), a fresh PostgreSQL database otherwise; the configurations the test helpers build
    include it while the test runs (:mod:`tests.stores`)."""
    if store_backend == "sqlite":
        with stores.using({}):
            yield {}
        return
    cluster: Cluster = request.getfixturevalue("postgres")
    schema = cluster.create_schema()  # a fresh schema: a database takes 0.3 s to create, a schema 1 ms
    settings = {"url": cluster.schema_url(schema)}
    try:
        with stores.using(settings, cluster, schema):
            yield settings
    finally:
        cluster.drop_schema(schema)


@pytest.fixture
def store_target(store_settings: dict[str, Any], tmp_path: Path) -> StoreConfig:
    """Where this test's task database is: ``tmp_path/state/imaging.db``, or its PostgreSQL database."""
    if not store_settings:
        return StoreConfig.sqlite(tmp_path / "state" / "imaging.db")
    return StoreConfig(url=store_settings["url"])
