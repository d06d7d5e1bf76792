"""Live configuration updates end to end, with real processes: `imaging controller serve` (gunicorn on
loopback), an appliance configured from it by `imaging configure` (the compact boot line), its
`imaging serve` and `imaging worker`, and `imaging reconfigure` applying what the admin publishes with
`imaging controller publish`. A running task is held mid-download by :class:`tests.stallproxy.StallingProxy`
in front of the moto S3 server; an in-flight API request is held by sending its body in two parts."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from appliance import config as config_mod
from appliance.boot.liveeffects import Effect
from appliance.boot.livefiles import previous_file
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer
from appliance.store import TaskState
from tests import imagefactory as imgs
from tests import processes
from tests.api.controller_support import ControllerProcess, running_controller
from tests.euca_upload import random_file
from tests.servers import REGION, MotoServer, free_port, wait_for_http
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
APPLIANCE = "live-1"
SECRET = "live-appliance-secret-0123456789ab"
OLD = {"access_key": "AKIALIVEOLD000000001", "secret_key": "old-api-secret-0123456789abcdefghij"}
NEW = {"access_key": "AKIALIVENEW000000002", "secret_key": "new-api-secret-0123456789abcdefghij"}


def wait_until(condition: Any, what: str) -> None:
    processes.wait_until(condition, timeout=90.0, interval=0.1, what=what)


@dataclass
class Appliance:
    """One appliance as processes: its API (gunicorn, with a pid file) and its worker."""

    ctl: ControllerProcess
    tmp: Path
    section: dict[str, Any]
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.tmp / "etc" / "imaging.yaml"

    def imaging(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", *args],
            capture_output=True,
            text=True,
            env=self.ctl.env(),
            timeout=120,
            check=False,
        )

    def start(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        with open(self.tmp / log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "-c", str(self.config), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def publish(self, section: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path = self.tmp / "publish.yaml"
        path.write_text(yaml.safe_dump(section))
        return self.imaging("controller", "publish", APPLIANCE, "--config", str(path))

    def reconfigure(self) -> dict[str, Any]:
        done = self.imaging(
            "-c", str(self.config), "reconfigure", "--json", "--api-pid-file", str(self.tmp / "api.pid"),
            "--unit-dir", "", "--owner", "",
        )  # fmt: skip
        assert done.returncode in (0, 2), done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    def admin_status(self, cred: dict[str, str], port: int | None = None) -> int:
        """HTTP status of an authenticated admin API request with ``cred``."""
        token = base64.b64encode(f"{cred['access_key']}:{cred['secret_key']}".encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port or self.port}/v1/tasks", headers={"Authorization": f"Basic {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def show(self) -> dict[str, Any]:
        done = self.imaging("controller", "show", APPLIANCE)
        assert done.returncode == 0, done.stderr
        view: dict[str, Any] = json.loads(done.stdout)
        return view

    def close(self) -> None:
        for proc in reversed(self.procs):
            processes.stop_process(proc)


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    (tmp_path / "controller").mkdir()
    with running_controller(tmp_path / "controller", workers=1) as ctl:
        yield ctl


def launch(ctl: ControllerProcess, tmp: Path, extra: dict[str, Any] | None = None) -> Appliance:
    """Register, configure from the compact boot line, start the API and the worker."""
    port = free_port()
    section: dict[str, Any] = {
        "api": {"bind": f"127.0.0.1:{port}", "credentials": [OLD]},
        "limits": {"concurrent_tasks": 1, "scratch": {"path": str(tmp / "scratch")}},
        "controller": {"report_interval": 1},
        **(extra or {}),
    }
    ctl.register(APPLIANCE, section, SECRET)
    app = Appliance(ctl, tmp, section, port)
    (tmp / "user-data").write_text(f"imaging:v1:{APPLIANCE}:{ctl.url}:{SECRET}\n")
    (tmp / "empty.yaml").write_text("")
    done = app.imaging(
        "-c", str(tmp / "empty.yaml"), "configure", "--user-data", str(tmp / "user-data"),
        "--output", str(app.config), "--error-file", str(tmp / "err.json"), "--owner", "",
        "--attempts", "1", "--unit-dir", "",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # the image's state directory (/var/lib/imaging) stands here under tmp; live updates keep it
    rendered = yaml.safe_load(app.config.read_text())
    rendered["state_dir"] = str(tmp / "state")
    app.config.write_text(yaml.safe_dump(rendered))
    api = app.start("serve", "--pid-file", str(tmp / "api.pid"), log="api.log")
    wait_for_http(f"http://127.0.0.1:{port}/v1/health", proc=api)
    app.start("worker", log="worker.log")
    return app


def signed_describe(port: int, cred: dict[str, str], region: str) -> tuple[bytes, bytes]:
    """(head, body) of a SigV4-signed ``DescribeConversionTasks`` POST to the EC2 API."""
    body = b"Action=DescribeConversionTasks&Version=2016-11-15"
    host = f"127.0.0.1:{port}"
    request = AWSRequest(
        method="POST",
        url=f"http://{host}/",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", "Host": host},
    )
    SigV4Auth(Credentials(cred["access_key"], cred["secret_key"]), "ec2", region).add_auth(request)
    lines = ["POST / HTTP/1.1", *(f"{k}: {v}" for k, v in request.headers.items())]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode(), body


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def heartbeat_concurrency(app: Appliance) -> int | None:
    try:
        value = json.loads((app.tmp / "state" / "worker.json").read_text()).get("concurrency")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def test_an_update_rotating_the_credential_and_raising_the_limit_leaves_a_running_task_untouched(
    controller: ControllerProcess, moto: MotoServer, tmp_path: Path
) -> None:
    bucket = "live-update"
    moto.client("s3").create_bucket(Bucket=bucket)
    raw = random_file(tmp_path / "disk.raw", 4 * MiB, seed=1)
    imgs.qemu_img("convert", "-f", "raw", "-O", "vhdx", raw, tmp_path / "disk.vhdx")
    moto.client("s3").upload_file(str(tmp_path / "disk.vhdx"), bucket, "disk.vhdx")
    with StallingProxy(moto.endpoint) as proxy:
        sources = {
            "allowed_endpoints": [proxy.endpoint, moto.endpoint],
            "s3": {
                "endpoint_url": proxy.endpoint,
                "region": REGION,
                "access_key": "testing",
                "secret_key": "testing",
            },
        }
        app = launch(controller, tmp_path, {"sources": sources})
        try:
            first = app.reconfigure()  # nothing is recorded yet: it fetches version 1, which changes nothing
            assert (first["status"], first["version"], first["changes"]) == ("applied", 1, [])
            assert app.reconfigure()["status"] == "unchanged"  # the controller's signed 304
            assert app.show()["applied_version"] == 1

            # past the preflight's first 2 MiB (the proxy would hold that ranged GET instead)
            proxy.arm("/disk.vhdx", after=3 * MiB)
            service = ImportService(config_mod.load(app.config))
            task = service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key="disk.vhdx"))
            wait_until(lambda: proxy.stalled >= 1, what="the task's download to be held")
            running = service.store.get_task(task.id)
            assert running.state is TaskState.RUNNING and heartbeat_concurrency(app) == 1
            region = config_mod.load(app.config).api.region

            # an API request in flight across the reload: its body is not all sent yet
            head, body = signed_describe(app.port, OLD, region)
            in_flight = socket.create_connection(("127.0.0.1", app.port), timeout=60)
            in_flight.sendall(head + body[:10])

            update = dict(app.section, api={**app.section["api"], "credentials": [NEW]})
            update["limits"] = {**app.section["limits"], "concurrent_tasks": 3}
            published = app.publish(update)
            assert published.returncode == 0, published.stderr
            assert "published configuration version 2 for live-1" in published.stdout
            # the controller's reply to the worker's next pushed report announces it
            announced = tmp_path / "state" / "config-announced"
            wait_until(lambda: announced.exists() and announced.read_text() == "2\n", what="the announcement")
            outcome = app.reconfigure()

            assert outcome["status"] == "applied" and outcome["version"] == 2, outcome
            assert outcome["changes"] == ["api.credentials", "limits.concurrent_tasks"]
            assert outcome["effects"] == [str(Effect.API_RELOAD), str(Effect.WORKER_RELOADS)]
            assert outcome["pending"] == []
            wait_until(
                lambda: app.admin_status(NEW) == 200 and app.admin_status(OLD) == 401,
                what="the new credential to work and the old one to be refused",
            )
            wait_until(lambda: heartbeat_concurrency(app) == 3, what="the worker to take the new limit")
            # the request that was in flight is answered by the configuration it started under
            in_flight.sendall(body[10:])
            answer = read_all(in_flight)
            in_flight.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
            assert b"DescribeConversionTasksResponse" in answer

            proxy.release()
            wait_until(lambda: service.store.get_task(task.id).state.terminal, what="the task to end")
            done = service.store.get_task(task.id)
            assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
            assert done.attempts == 1  # never suspended, resumed or restarted
            kinds = [e.kind for e in service.store.events(task_id=task.id, limit=100_000)]
            assert "step.stopping" not in kinds and "step.abandoned" not in kinds

            view = app.show()
            assert (view["config_version"], view["applied_version"], view["status"]) == (2, 2, "configured")
            assert NEW["secret_key"] not in json.dumps(view)
            assert [e["data"]["version"] for e in controller.events("config-published")] == [2]
            assert yaml.safe_load(previous_file(app.config).read_text())["api"]["credentials"] == [OLD]
            service.store.close()
        finally:
            app.close()


def test_an_update_the_appliance_refuses_names_the_field_and_the_old_configuration_keeps_serving(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    app = launch(controller, tmp_path)
    try:
        # refused at publish: the controller validates as the appliance will, naming the field
        bad = dict(app.section, limits={**app.section["limits"], "concurrent_tasks": 0})
        refused = app.publish(bad)
        assert refused.returncode != 0 and "imaging.limits.concurrent_tasks" in refused.stderr
        # refused by the appliance: a certificate and a key of two different pairs (only loading
        # them together tells)
        pems = []
        for name in ("a", "b"):
            key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                check=True, capture_output=True,
            )  # fmt: skip
            pems.append((cert.read_text(), key.read_text()))
        mismatched = {"cert": pems[0][0], "key": pems[1][1]}
        update = dict(app.section, api={"bind": app.section["api"]["bind"], "credentials": [NEW]})
        update["api"]["tls"] = mismatched
        assert app.publish(update).returncode == 0
        before = app.config.read_text()

        outcome = app.reconfigure()

        assert outcome["status"] == "refused" and outcome["version"] == 2
        [error] = outcome["errors"]
        assert error["field"] == "imaging.api.tls" and "do not load together" in error["message"]
        assert app.config.read_text() == before
        assert app.admin_status(OLD) == 200 and app.admin_status(NEW) == 401
        view = app.show()
        assert view["status"] == "config-refused" and view["applied_version"] is None
        assert view["errors"] == [error]
        [event] = controller.events("config-refused")
        assert event["data"] == {"version": 2, "errors": [error]}
        assert "PRIVATE KEY" not in json.dumps(controller.events())
        # asked again, the same refused version is not applied nor reported again
        assert app.reconfigure()["status"] == "refused"
        assert len(controller.events("config-refused")) == 1
    finally:
        app.close()


def test_a_bind_change_announced_in_a_report_reply_is_a_graceful_reload_without_failing_a_request_in_flight(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    app = launch(controller, tmp_path)
    try:
        # the watcher polls at start, then not for ten minutes: only the announcement in the reply to
        # the worker's pushed reports can make it fetch version 2 within this test
        watcher = app.start(
            "reconfigure", "--watch", "--interval", "600", "--json", "--api-pid-file",
            str(tmp_path / "api.pid"), "--unit-dir", "", "--owner", "", log="reconfigure.log",
        )  # fmt: skip
        wait_until(lambda: app.show()["applied_version"] == 1, what="the watcher's first poll")
        region = config_mod.load(app.config).api.region
        head, body = signed_describe(app.port, OLD, region)
        in_flight = socket.create_connection(("127.0.0.1", app.port), timeout=60)
        in_flight.sendall(head + body[:10])
        new_port = free_port()
        update = dict(app.section, api={**app.section["api"], "bind": f"127.0.0.1:{new_port}"})
        assert app.publish(update).returncode == 0

        wait_until(lambda: _answers(new_port), what="the API on its new address")

        assert app.admin_status(OLD, port=new_port) == 200
        wait_until(lambda: not _answers(app.port), what="the old address to be closed")
        in_flight.sendall(body[10:])
        answer = read_all(in_flight)
        in_flight.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert app.show()["applied_version"] == 2
        processes.stop_process(watcher)
        log = (tmp_path / "reconfigure.log").read_text().splitlines()
        lines = [json.loads(line) for line in log if line.startswith("{")]  # warnings share the log
        outcome = [o for o in lines if o["version"] == 2][-1]
        assert outcome["changes"] == ["api.bind"] and outcome["effects"] == [str(Effect.API_RELOAD)]
    finally:
        app.close()


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
