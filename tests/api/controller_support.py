"""`imaging controller serve` as a real process (gunicorn on loopback) for the controller tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.processes import stop_process
from tests.servers import free_port, wait_for_http

ADMIN_TOKEN = "admin-token-0123456789abcdefghij"
ENROL_SECRET = "fleet-enrolment-secret-0123456789"


@dataclass(frozen=True)
class ControllerProcess:
    url: str
    db: Path | str
    log: Path
    pid: int

    def env(self) -> dict[str, str]:
        """The environment the admin commands find the controller and the token in."""
        return dict(os.environ, IMAGING_CONTROLLER_URL=self.url, IMAGING_CONTROLLER_TOKEN=ADMIN_TOKEN)

    def admin(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN) -> tuple[int, Any]:
        """One admin request: (status, decoded JSON body or None)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                text = resp.read()
                return resp.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            text = exc.read()
            return exc.code, json.loads(text) if text else None

    def register(self, appliance_id: str, config: dict[str, Any], secret: str, dynamic: bool = False) -> None:
        status, body = self.admin(
            "POST",
            "/v1/appliances",
            {"appliance_id": appliance_id, "config": config, "secret": secret, "dynamic": dynamic},
        )
        assert status == 201, body

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        _, body = self.admin("GET", "/v1/events?limit=1000")
        return [e for e in body["events"] if kind is None or e["kind"] == kind]


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the controller exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def running_controller(
    tmp: Path,
    *,
    stale_after: float = 0,
    sweep_interval: float = 10.0,
    workers: int = 2,
    tls: tuple[Path, Path] | None = None,
    db: str | None = None,
) -> Iterator[ControllerProcess]:
    """``imaging controller serve`` with the test's admin token and enrolment secret, stopped by PID;
    its database ``db`` (a ``postgresql://`` URL), else ``tmp/controller.db``."""
    port = free_port()
    database: Path | str = db or tmp / "controller.db"
    log = tmp / "controller.log"
    env = dict(os.environ, IMAGING_CONTROLLER_TOKEN=ADMIN_TOKEN, IMAGING_CONTROLLER_ENROL_SECRET=ENROL_SECRET)
    argv = [sys.executable, "-m", "appliance.cli", "controller", "serve", "--db", str(database)]
    argv += ["--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--stale-after", str(stale_after)]
    argv += ["--sweep-interval", str(sweep_interval)]
    if tls is not None:
        argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/v1/health", proc=proc) if tls is None else _wait_for_port(port, proc)
        yield ControllerProcess(url, database, log, proc.pid)
    finally:
        stop_process(proc)
