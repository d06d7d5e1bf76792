"""Shared fixtures: real servers on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import MotoServer, moto_server


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server process for the session (S3 and EC2 over HTTP); tests use unique bucket names
    or call ``moto.reset()``."""
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server
