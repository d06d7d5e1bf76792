"""Helpers for the end-to-end tests of the appliance as clients see it (fixtures in conftest.py)."""

from __future__ import annotations

import base64
import functools
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import yaml

from appliance import config as config_mod
from tests import stores
from tests.httpfixtures import TestHTTPServer
from tests.processes import stop_process, wait_until
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer, free_port, wait_for_http

#: the end-to-end tests poll the API every 0.2 s
wait_for = functools.partial(wait_until, interval=0.2)


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

    def task_processes(self) -> list[int]:
        """PIDs of the worker's children: the processes running its tasks."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.worker.pid)], capture_output=True, text=True
        )
        return [int(pid) for pid in out.stdout.split()]


@contextmanager
def api_server(config: Path, endpoint: str) -> Iterator[subprocess.Popen[bytes]]:
    """`imaging serve` (gunicorn with ``api.workers`` processes, as ``config`` says) answering at
    ``endpoint``; stopped by its PID afterwards."""
    server = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "-c", str(config), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"{endpoint}/v1/health", proc=server)
        yield server
    finally:
        stop_process(server)


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


def import_object(
    appliance: Appliance, moto: MotoServer, bucket: str, path: Path, key: str, fmt: str | None
) -> str:
    """ImportImage of ``path``, uploaded to ``bucket/key``, as ``fmt`` (None: no ``Format``); its task id."""
    moto.client("s3").upload_file(str(path), bucket, key)
    container: dict[str, Any] = {"UserBucket": {"S3Bucket": bucket, "S3Key": key}}
    if fmt is not None:
        container["Format"] = fmt
    return str(appliance.ec2.import_image(DiskContainers=[container])["ImportTaskId"])


def finished_import(appliance: Appliance, task_id: str) -> dict[str, Any]:
    """DescribeImportImageTasks of an import, once it has ended (completed, or failed: ``deleted``)."""

    def status() -> dict[str, Any]:
        return appliance.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]

    wait_for(lambda: status()["Status"] in ("completed", "deleted"), what="the image import")
    return status()


def failed_leaving_nothing(appliance: Appliance, task_id: str, code: str) -> dict[str, Any]:
    """The final status of an import that must have failed with ``code`` (its status message and the
    task's error code), having left nothing in scratch or in the image target."""
    final = finished_import(appliance, task_id)
    assert final["Status"] == "deleted" and code in final["StatusMessage"], final
    task = admin_task(appliance, task_id)["task"]
    assert (task["state"], task["error_code"]) == ("failed", code)
    assert leftovers(appliance) == []
    return final


def leftovers(appliance: Appliance) -> list[str]:
    """The files left in scratch (besides its own bookkeeping at its root: ``.lock``, ``.peak.json``) and
    in the image target's directory."""
    cfg = config_mod.load(appliance.config)
    found: list[str] = []
    for root in (cfg.scratch.root, appliance.state / "images"):
        if root.exists():
            files = [p for p in root.rglob("*") if p.is_file()]
            found += [
                str(p.relative_to(root)) for p in files if p.parent != root or not p.name.startswith(".")
            ]
    return found


@contextmanager
def running_appliance(
    tmp_path: Path,
    moto: MotoServer,
    parts_server: TestHTTPServer,
    targets: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    account: str | None = None,
    sources: dict[str, Any] | None = None,
) -> Iterator[Appliance]:
    """`imaging serve` and `imaging worker` on a fresh state directory; ``targets`` overrides the
    configuration's targets section (default: the file targets under the state directory); ``account``
    is the test key's account (default: none configured); ``extra``
    adds top-level sections (e.g. ``bundles``); ``sources`` adds settings to the sources section."""
    port = free_port()
    state = tmp_path / "state"
    cfg = tmp_path / "imaging.yaml"
    cfg.write_text(
        yaml.safe_dump(
            stores.with_store(
                {
                    "state_dir": str(state),
                    "api": {
                        "bind": f"127.0.0.1:{port}",
                        "workers": 2,
                        "credentials": [
                            {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}
                            | ({"account": account} if account else {})
                        ],
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
                    }
                    | (sources or {}),
                    "worker": {"concurrency": 2, "poll_interval": 0.2},
                    "tasks": {"lease_seconds": 5},
                }
                | ({"targets": targets} if targets else {})
                | (extra or {})
            )
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
