"""Servers of the source tests: a loopback HTTP server with scripted misbehaviour, the moto S3 server
(a bucket of each test, its client settings and policy); the stalling proxy in front of moto is
tests/conftest.py's. A test module that defines a fixture of the same name uses its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.sources.urlfilter import UrlPolicy
from tests.httpfixtures import TestHTTPServer
from tests.servers import MotoServer


@pytest.fixture
def server() -> Iterator[TestHTTPServer]:
    with TestHTTPServer() as srv:
        yield srv


@pytest.fixture
def http_policy(server: TestHTTPServer) -> UrlPolicy:
    return UrlPolicy(allowed_endpoints=[server.endpoint])


@pytest.fixture
def s3cfg(moto: MotoServer) -> dict[str, Any]:
    return {
        "endpoint_url": moto.endpoint,
        "region": "us-east-1",
        "access_key": "testing",
        "secret_key": "testing",
    }


@pytest.fixture
def s3_policy(moto: MotoServer) -> UrlPolicy:
    return UrlPolicy(allowed_endpoints=[moto.endpoint])


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"reader-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name
