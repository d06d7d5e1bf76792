"""A bucket of each test on the moto server process, for the target tests that write objects; a test
module that defines its own ``bucket`` uses that one."""

from __future__ import annotations

import uuid

import pytest

from tests.servers import MotoServer


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"multipart-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name
