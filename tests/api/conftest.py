"""Fixtures of the end-to-end API tests: `imaging serve` (gunicorn) and `imaging worker` as real
processes, S3 on the session's moto server, a scripted HTTP server for manifest parts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml

from tests.api.e2e_support import Appliance
from tests.httpfixtures import TestHTTPServer
from tests.processes import stop_process
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer, free_port, wait_for_http


@pytest.fixture
def parts_server() -> Iterator[TestHTTPServer]:
    """A scripted HTTP server (stalls on demand) that the appliance may fetch parts from."""
    with TestHTTPServer() as server:
        yield server


@pytest.fixture
def appliance(tmp_path: Path, moto: MotoServer, parts_server: TestHTTPServer) -> Iterator[Appliance]:
    port = free_port()
    state = tmp_path / "state"
    cfg = tmp_path / "imaging.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(state),
                "api": {
                    "bind": f"127.0.0.1:{port}",
                    "workers": 2,
                    "credentials": [{"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}],
                },
                "sources": {
                    "allowed_endpoints": [moto.endpoint, parts_server.endpoint],
                    "manifest_poll_interval": 0.2,
                    "manifest_poll_max_interval": 0.5,
                    "s3": {
                        "endpoint_url": moto.endpoint,
                        "region": REGION,
                        "access_key": "testing",
                        "secret_key": "testing",
                    },
                },
                "worker": {"concurrency": 2, "poll_interval": 0.2},
                "tasks": {"lease_seconds": 5},
            }
        )
    )

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "-c", str(cfg), "worker"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    server = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "-c", str(cfg), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = start_worker()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{endpoint}/v1/health", proc=server)
        ec2 = boto3.client(
            "ec2",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
        )
        app = Appliance(endpoint, cfg, state, ec2, start_worker, worker)
        yield app
    finally:
        stop_process(app.worker if "app" in locals() else worker)
        stop_process(server)


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    name = "e2e-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    moto.client("s3").create_bucket(Bucket=name)
    return name
