"""Fixtures of the end-to-end API tests: `imaging serve` (gunicorn) and `imaging worker` as real
processes, S3 on the session's moto server, a scripted HTTP server for manifest parts; the appliance
that stores images with the S3 image target (``s3_appliance``, in ``image_bucket``).

Every test here runs on both task-database backends, SQLite and PostgreSQL (see tests/conftest.py);
modules of the protocol layer alone say ``pytest.mark.backends("sqlite")``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.e2e_support import Appliance, running_appliance
from tests.httpfixtures import TestHTTPServer
from tests.servers import REGION, MotoServer


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


@pytest.fixture
def image_bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    name = "img-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    moto.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_appliance(
    tmp_path: Path, moto: MotoServer, parts_server: TestHTTPServer, image_bucket: str
) -> Iterator[Appliance]:
    """The appliance storing images with the s3 image target in ``image_bucket`` (5 MiB parts)."""
    image_target = {
        "type": "s3",
        "bucket": image_bucket,
        "prefix": "images/",
        "endpoint_url": moto.endpoint,
        "region": REGION,
        "access_key": "testing",
        "secret_key": "testing",
        "addressing_style": "path",
        "part_size": "5MiB",
    }
    with running_appliance(tmp_path, moto, parts_server, targets={"image": image_target}) as app:
        yield app
