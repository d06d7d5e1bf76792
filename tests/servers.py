"""Real servers the tests talk to over loopback: a moto S3/EC2 server process, free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.processes import stop_process

TEST_ACCESS_KEY = "AKIATESTTESTTEST0001"
TEST_SECRET_KEY = "test-secret-key-0123456789abcdefghij"
REGION = "us-east-1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; races are unlikely and retried by callers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers (any HTTP status), or fail."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s: {last}")


@dataclass(frozen=True)
class MotoServer:
    """A moto server process standing in for S3 and the controlling cloud's EC2 control plane."""

    endpoint: str
    pid: int

    def client(self, service: str):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def reset(self) -> None:
        """Drop every bucket, object and EC2 resource (moto's reset API)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()


@contextmanager
def moto_server(log_dir: Path) -> Iterator[MotoServer]:
    """Start the moto server (:mod:`tests.motoserver`) on a free loopback port; stop it (by PID) after."""
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    log = open(log_dir / f"moto-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("motoserver.py")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{endpoint}/moto-api/", proc=proc)
        yield MotoServer(endpoint, proc.pid)
    finally:
        stop_process(proc, grace=10)
        log.close()
