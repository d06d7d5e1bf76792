"""Helpers for the end-to-end tests of the appliance as clients see it (fixtures in conftest.py)."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY


@dataclass
class Appliance:
    """The running appliance: its endpoint (EC2 API at ``/``, admin API at ``/v1``), files and clients."""

    endpoint: str
    config: Path
    state: Path
    ec2: Any
    start_worker: Callable[[], subprocess.Popen[bytes]]
    worker: subprocess.Popen[bytes]

    def volume_file(self, volume_id: str) -> Path:
        return self.state / "volumes" / f"{volume_id}.raw"


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a process this test started (``sig``, then SIGKILL after 30 s)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``cond`` every 0.2 s; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def conversion_task(ec2: Any, task_id: str) -> dict[str, Any]:
    """DescribeConversionTasks of one task."""
    return ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"][0]


def admin_task(appliance: Appliance, task_id: str) -> dict[str, Any]:
    """``GET /v1/tasks/{task_id}`` of the admin API (HTTP Basic with the test credentials)."""
    token = base64.b64encode(f"{TEST_ACCESS_KEY}:{TEST_SECRET_KEY}".encode()).decode()
    req = urllib.request.Request(
        f"{appliance.endpoint}/v1/tasks/{task_id}", headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())
