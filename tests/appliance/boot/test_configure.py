"""``imaging configure`` end to end: real files, a real rendezvous controller over loopback HTTP."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance.boot import configure as configure_mod
from appliance.boot import rendezvous, worker_dropin
from appliance.cli import main as cli
from appliance.hooks.privileges import privileged_hooks
from appliance.service.taskcgroup import TaskCaps, host_problems
from tests.api.controller_support import ControllerProcess, running_controller
from tests.processes import stop_process
from tests.servers import free_port, wait_for_http

SECRET = "controller-shared-secret-0123456789"
API_SECRET = "api-secret-key-abcdefghijklmnop"
ACCESS = "AKIAAPPLIANCE00001"


def section(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "appliance_id": "appl-1",
        "api": {"credentials": [{"access_key": ACCESS, "secret_key": API_SECRET}], "bind": "127.0.0.1:9999"},
        "limits": {"concurrent_tasks": 2, "task_cpu_quota": "50%"},
    }
    base.update(over)
    return base


def cloud_config(sec: dict[str, Any]) -> str:
    return "#cloud-config\n" + yaml.safe_dump({"imaging": sec})


@dataclass
class Paths:
    user_data: Path
    output: Path
    error_file: Path
    empty_config: Path
    unit_dir: Path


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    return Paths(
        tmp_path / "user-data",
        tmp_path / "etc" / "imaging.yaml",
        tmp_path / "run" / "err.json",
        empty,
        tmp_path / "systemd",
    )


def run_configure(p: Paths, *extra: str) -> int:
    # -c: the CLI loads a service config before any command; keep it away from /etc
    return cli.main(
        [
            "-c",
            str(p.empty_config),
            "configure",
            "--user-data",
            str(p.user_data),
            "--output",
            str(p.output),
            "--error-file",
            str(p.error_file),
            "--owner",
            "",
            "--attempts",
            "1",
            "--timeout",
            "5",
            "--unit-dir",
            str(p.unit_dir),
            *extra,
        ]
    )


# --- a rendezvous controller ----------------------------------------------------------------------
#
# The shipped controller (`imaging controller serve`, :func:`shipped`) where it can play the part; this
# scripted one where a real controller cannot: a forged answer, a configuration for another appliance
# or one the controller would have refused at registration, a controller under a path prefix.


@dataclass
class Controller:
    url: str
    appliance_id: str
    secret: str
    config: dict[str, Any]
    #: sign responses with this instead of ``secret`` (a forged controller)
    response_secret: str | None = None
    statuses: list[dict[str, Any]] = field(default_factory=list)
    raw_statuses: list[bytes] = field(default_factory=list)
    request_errors: list[str] = field(default_factory=list)


def _handler(ctl: Controller) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: bytes) -> None:
            headers = rendezvous.signed_headers(
                ctl.appliance_id, ctl.response_secret or ctl.secret, "RESPONSE", self.path, body
            )
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _verified(self, body: bytes) -> bool:
            try:
                rendezvous.verify(ctl.secret, self.command, self.path, self.headers, body)
            except rendezvous.RendezvousError as exc:
                ctl.request_errors.append(exc.message)
                self._answer(401, b'{"error": "unauthorized"}')
                return False
            return True

        def do_GET(self) -> None:
            if self.path != f"/ctl/v1/appliances/{ctl.appliance_id}/config":
                self._answer(404, b"{}")
            elif self._verified(b""):
                self._answer(200, json.dumps({"imaging": ctl.config}).encode())

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == f"/ctl/v1/appliances/{ctl.appliance_id}/status" and self._verified(body):
                ctl.raw_statuses.append(body)
                ctl.statuses.append(json.loads(body))
                self._answer(204, b"")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    """`imaging controller serve` (gunicorn on loopback)."""
    with running_controller(tmp_path_factory.mktemp("shipped-controller"), workers=1) as ctl:
        yield ctl


@pytest.fixture
def controller() -> Iterator[Controller]:
    port = free_port()
    ctl = Controller(f"http://127.0.0.1:{port}/ctl", "appl-9", SECRET, {})
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(ctl))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ctl
    finally:
        server.shutdown()
        server.server_close()


# --- full #cloud-config ---------------------------------------------------------------------------


def test_valid_user_data_writes_a_private_loadable_config(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths.user_data.write_text(
        cloud_config(section(controller={"url": "https://ctl.example", "secret": SECRET}))
    )
    paths.error_file.parent.mkdir()
    paths.error_file.write_text('{"status": "invalid-config"}')  # left by an earlier, bad boot

    assert run_configure(paths) == 0

    assert paths.output.stat().st_mode & 0o777 == 0o600
    cfg = config_mod.load(paths.output)
    assert cfg.api.credentials == {ACCESS: API_SECRET}
    assert cfg.api.bind == "127.0.0.1:9999"
    assert cfg.worker.concurrency == 2 and cfg.worker.task_cpu_quota == "50%"
    assert (cfg.controller.appliance_id, cfg.controller.mode, cfg.controller.secret) == (
        "appl-1",
        "push",
        SECRET,
    )
    assert not paths.error_file.exists()
    out, err = capsys.readouterr()
    assert "configured appliance appl-1" in out
    assert SECRET not in out + err and API_SECRET not in out + err
    assert [p.name for p in paths.output.parent.iterdir()] == ["imaging.yaml"]  # no temp files left


def test_config_is_chowned_to_the_owner_when_that_user_exists(paths: Paths) -> None:
    if os.getuid() != 0:
        pytest.skip("chown needs root")
    paths.user_data.write_text(cloud_config(section()))
    assert run_configure(paths, "--owner", "nobody") == 0
    assert paths.output.stat().st_uid == pwd.getpwnam("nobody").pw_uid


OPENSSL_SELF_SIGNED = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
OPENSSL_SELF_SIGNED += ["-subj", "/CN=appliance"]


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(cert, key, another key): a real self-signed pair and a key that does not match it."""
    d = tmp_path_factory.mktemp("tls")
    for name in ("a", "b"):
        subprocess.run(
            [*OPENSSL_SELF_SIGNED, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.crt")],
            check=True,
            capture_output=True,
        )
    return (d / "a.crt").read_text(), (d / "a.key").read_text(), (d / "b.key").read_text()


def test_tls_cert_and_key_are_written_private_and_referenced(
    paths: Paths, tls_pair: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key, _ = tls_pair
    sec = section()
    sec["api"]["tls"] = {"cert": cert, "key": key}
    paths.user_data.write_text(cloud_config(sec))
    assert run_configure(paths) == 0
    cfg = config_mod.load(paths.output)
    assert cfg.api.tls_key is not None and cfg.api.tls_key.read_text() == key
    assert cfg.api.tls_key.stat().st_mode & 0o777 == 0o600
    assert cfg.api.tls_cert is not None and cfg.api.tls_cert.read_text() == cert
    out, err = capsys.readouterr()
    assert "PRIVATE KEY" not in out + err


def test_mismatched_tls_key_is_refused_before_anything_is_written(
    paths: Paths, tls_pair: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cert, _, other_key = tls_pair
    sec = section()
    sec["api"]["tls"] = {"cert": cert, "key": other_key}
    paths.user_data.write_text(cloud_config(sec))
    assert run_configure(paths) == 2
    assert not paths.output.exists() and not (paths.output.parent / "tls").exists()
    assert json.loads(paths.error_file.read_text())["errors"][0]["field"] == "imaging.api.tls"


def _without(key: str) -> dict[str, Any]:
    sec = section()
    del sec[key]
    return sec


@pytest.mark.parametrize(
    ("user_data", "field", "in_message"),
    [
        (cloud_config(_without("appliance_id")), "imaging.appliance_id", "required field is missing"),
        (
            cloud_config(section(controller={"url": "ftp://x", "secret": SECRET})),
            "imaging.controller.url",
            "'ftp://x' does not match '^https?://'",
        ),
        (
            cloud_config(section(api={"credentials": [{"access_key": "short", "secret_key": API_SECRET}]})),
            "imaging.api.credentials.0.access_key",
            "does not match",
        ),
        (cloud_config(section(api={"credentials": []})), "imaging.api.credentials", "should be non-empty"),
        (cloud_config(section(limits={"cpu": 1})), "imaging.limits.cpu", "unknown key"),
        ("#cloud-config\npackages: [htop]\n", "imaging", "no 'imaging:' section"),
    ],
    ids=["missing-appliance-id", "bad-url", "bad-access-key", "no-credentials", "unknown-key", "no-section"],
)
def test_invalid_user_data_names_the_field_and_writes_nothing(
    paths: Paths, capsys: pytest.CaptureFixture[str], user_data: str, field: str, in_message: str
) -> None:
    paths.user_data.write_text(user_data)

    assert run_configure(paths) == 2

    assert not paths.output.exists()
    doc = json.loads(paths.error_file.read_text())
    assert doc["status"] == "invalid-config"
    assert [e["field"] for e in doc["errors"]] == [field]
    assert in_message in doc["errors"][0]["message"]
    err = capsys.readouterr().err
    assert f"imaging: invalid config: {field}: " in err
    assert API_SECRET not in err + paths.error_file.read_text()


def test_missing_user_data_is_an_invalid_config(paths: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_configure(paths) == 2
    assert json.loads(paths.error_file.read_text())["errors"][0]["field"] == "user-data"
    assert "no user data" in capsys.readouterr().err


def test_invalid_user_data_leaves_the_previous_config_intact(paths: Paths) -> None:
    paths.user_data.write_text(cloud_config(section()))
    assert run_configure(paths) == 0
    before = paths.output.read_bytes()
    paths.user_data.write_text(cloud_config(section(log_level="loud")))
    assert run_configure(paths) == 2
    assert paths.output.read_bytes() == before
    assert json.loads(paths.error_file.read_text())["errors"][0]["field"] == "imaging.log_level"


def test_failed_write_leaves_no_partial_file_and_reports(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths.user_data.write_text(cloud_config(section()))
    paths.output.mkdir(parents=True)  # os.replace onto a directory fails after the temp file is written

    assert run_configure(paths) == 1

    assert list(paths.output.parent.iterdir()) == [paths.output]  # the temp file is gone
    assert json.loads(paths.error_file.read_text())["errors"][0]["field"] == "output"
    assert "cannot write" in capsys.readouterr().err


def test_secret_in_an_invalid_value_is_not_echoed(paths: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    # the secret pasted into the wrong field: the message must not carry it
    sec = section(controller={"url": "https://ctl.example", "secret": SECRET}, log_level=SECRET)
    paths.user_data.write_text(cloud_config(sec))
    assert run_configure(paths) == 2
    assert SECRET not in capsys.readouterr().err + paths.error_file.read_text()


def test_invalid_config_is_reported_to_a_reachable_controller(paths: Paths, controller: Controller) -> None:
    sec = section(
        appliance_id="appl-9", log_level="loud", controller={"url": controller.url, "secret": SECRET}
    )
    paths.user_data.write_text(cloud_config(sec))

    assert run_configure(paths) == 2

    assert controller.request_errors == []  # it was signed with the shared secret
    [report] = controller.statuses
    assert (report["type"], report["status"], report["appliance_id"]) == (
        "config-error",
        "invalid-config",
        "appl-9",
    )
    assert report["errors"][0]["field"] == "imaging.log_level"
    assert SECRET.encode() not in controller.raw_statuses[0]


# --- compact form and rendezvous ------------------------------------------------------------------


def test_compact_form_fetches_applies_and_reports(
    paths: Paths, shipped: ControllerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped.register("appl-9", section(appliance_id="appl-9", limits={"concurrent_tasks": 4}), SECRET)
    paths.user_data.write_text(f"imaging:v1:appl-9:{shipped.url}:{SECRET}\n")

    assert run_configure(paths) == 0

    cfg = config_mod.load(paths.output)
    assert cfg.worker.concurrency == 4
    assert (cfg.controller.url, cfg.controller.secret, cfg.controller.appliance_id) == (
        shipped.url,
        SECRET,
        "appl-9",
    )
    status, report = shipped.admin("GET", "/v1/appliances/appl-9")
    assert (status, report["status"], report["id"]) == (200, "configured", "appl-9")
    assert "127.0.0.1" in report["addresses"]  # the source address towards the controller
    assert report["parameters"]["api"]["credentials"][0] == {"access_key": ACCESS, "secret_key": "REDACTED"}
    assert report["parameters"]["controller"]["secret"] == "REDACTED"
    assert SECRET not in json.dumps(report) and API_SECRET not in json.dumps(report)
    out, err = capsys.readouterr()
    assert SECRET not in out + err


def test_forged_controller_response_is_refused(
    paths: Paths, controller: Controller, capsys: pytest.CaptureFixture[str]
) -> None:
    controller.config = section(appliance_id="appl-9")
    controller.response_secret = "not-the-shared-secret-at-all-000"
    paths.user_data.write_text(f"imaging:v1:appl-9:{controller.url}:{SECRET}")

    assert run_configure(paths) == 2

    assert not paths.output.exists()
    [error] = json.loads(paths.error_file.read_text())["errors"]
    assert error["field"] == "imaging.controller.url"
    assert "signature is invalid" in error["message"]
    assert "signature is invalid" in capsys.readouterr().err


def test_controller_refuses_a_request_signed_with_the_wrong_secret(
    paths: Paths, shipped: ControllerProcess
) -> None:
    shipped.register("appl-10", section(appliance_id="appl-10"), SECRET)
    paths.user_data.write_text(f"imaging:v1:appl-10:{shipped.url}:wrong-secret-but-long-enough")

    assert run_configure(paths) == 2

    assert "signature is invalid" in shipped.log.read_text()
    assert "HTTP 401" in json.loads(paths.error_file.read_text())["errors"][0]["message"]
    assert [e["kind"] for e in shipped.events() if e["appliance_id"] == "appl-10"] == ["registered"]


def test_fetched_config_for_another_appliance_is_refused(paths: Paths, controller: Controller) -> None:
    controller.config = section(appliance_id="someone-else")
    paths.user_data.write_text(f"imaging:v1:appl-9:{controller.url}:{SECRET}")
    assert run_configure(paths) == 2
    assert json.loads(paths.error_file.read_text())["errors"][0]["field"] == "imaging.appliance_id"


def test_invalid_fetched_config_is_reported_by_field(paths: Paths, controller: Controller) -> None:
    controller.config = section(appliance_id="appl-9", limits={"concurrent_tasks": 0})
    paths.user_data.write_text(f"imaging:v1:appl-9:{controller.url}:{SECRET}")

    assert run_configure(paths) == 2

    assert json.loads(paths.error_file.read_text())["errors"][0]["field"] == "imaging.limits.concurrent_tasks"
    [report] = controller.statuses
    assert report["status"] == "invalid-config"


def test_unreachable_controller_in_compact_form_is_a_clear_error(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    paths.user_data.write_text(f"imaging:v1:appl-9:{url}:{SECRET}")

    assert run_configure(paths) == 2

    [error] = json.loads(paths.error_file.read_text())["errors"]
    assert error["field"] == "imaging.controller.url"
    assert (
        f"cannot fetch the config from the controller at {url}/v1/appliances/appl-9/config"
        in error["message"]
    )
    err = capsys.readouterr().err
    assert "cannot fetch the config" in err and SECRET not in err


# --- health responder -----------------------------------------------------------------------------


def test_health_responder_serves_the_errors_with_503(paths: Paths, tmp_path: Path) -> None:
    paths.user_data.write_text(cloud_config(section(controller={"url": "ftp://x", "secret": SECRET})))
    assert run_configure(paths) == 2
    port = free_port()
    command = [sys.executable, "-m", "appliance.cli", "-c", str(paths.empty_config), "health-responder"]
    proc = subprocess.Popen([*command, "--error-file", str(paths.error_file), "--bind", f"127.0.0.1:{port}"])
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/health", proc=proc)
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=60)
        assert exc.value.code == 503
        doc = json.loads(exc.value.read())
        assert doc["status"] == "invalid-config"
        assert doc["errors"] == [
            {"field": "imaging.controller.url", "message": "'ftp://x' does not match '^https?://'"}
        ]
    finally:
        stop_process(proc, grace=10)


def test_health_responder_binds_the_user_datas_api_address(paths: Paths) -> None:
    from appliance.boot import health_responder

    port = free_port()
    sec = section(log_level="loud")
    sec["api"]["bind"] = f"127.0.0.1:{port}"
    paths.user_data.write_text(cloud_config(sec))
    assert run_configure(paths) == 2

    server = health_responder.make_server(health_responder.bind_from(paths.error_file), paths.error_file)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=60)
        assert exc.value.code == 503
        assert json.loads(exc.value.read())["errors"][0]["field"] == "imaging.log_level"
    finally:
        server.shutdown()
        server.server_close()


# --- guest hooks: the worker's privileges ---------------------------------------------------------

INJECT = {"hook": "inject-metadata", "with": {"files": [{"path": "/etc/marker", "content": "x"}]}}
WORKER_UNIT = (
    Path(__file__).parents[3] / "elements/imaging-services/static/etc/systemd/system/imaging-worker.service"
)


def configure_with_reload(p: Paths, reloads: list[str]) -> int:
    opts = configure_mod.Options(
        user_data=p.user_data,
        output=p.output,
        error_file=p.error_file,
        owner=None,
        attempts=1,
        timeout=5,
        unit_dir=p.unit_dir,
        reload=lambda: reloads.append("daemon-reload"),
    )
    return configure_mod.configure(opts)


def dropin_directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_guest_mounting_hook_gets_the_worker_a_root_dropin_and_reloads_once(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths.user_data.write_text(cloud_config(section(hooks={"points": {"after_convert": [INJECT]}})))
    reloads: list[str] = []

    assert configure_with_reload(paths, reloads) == 0

    dropin = worker_dropin.dropin_path(paths.unit_dir)
    assert dropin == paths.unit_dir / "imaging-worker.service.d" / "guest-hooks.conf"
    d = dropin_directives(dropin)
    assert d["User"] == ["root"] and d["Group"] == ["imaging"]
    # reset, then exactly the capabilities mounting and writing guest files need
    assert d["CapabilityBoundingSet"] == [
        "",
        "CAP_SYS_ADMIN CAP_SYS_CHROOT CAP_DAC_OVERRIDE CAP_CHOWN CAP_FOWNER",
    ]
    assert d["DeviceAllow"] == ["/dev/loop-control rw", "block-loop rw"]
    assert "after_convert[0] inject-metadata" in dropin.read_text()
    assert reloads == ["daemon-reload"]
    assert "runs as root to mount guests for: after_convert[0] inject-metadata" in capsys.readouterr().out

    assert configure_with_reload(paths, reloads) == 0  # same config again: nothing changed, no reload
    assert reloads == ["daemon-reload"]


def test_user_data_store_section_reaches_the_config_and_the_dropin_creates_no_sqlite_file(
    paths: Paths,
) -> None:
    store = {"url": "postgresql://imaging@db.example:5432/imaging", "password": "DbPassword0123456789"}
    paths.user_data.write_text(
        cloud_config(
            section(
                store=store,
                targets={"volume": {"type": "file", "directory": "/srv/volumes", "shared": True}},
                hooks={"points": {"after_convert": [INJECT]}},
            )
        )
    )
    assert configure_with_reload(paths, []) == 0
    written = yaml.safe_load(paths.output.read_text())
    assert written["store"] == store
    # the tasks are in PostgreSQL: no task database file for the drop-in to create first
    dropin = worker_dropin.dropin_path(paths.unit_dir).read_text()
    assert "ExecStartPre" not in dropin and "imaging.db" not in dropin
    # with SQLite (no store section) it does
    paths.user_data.write_text(cloud_config(section(hooks={"points": {"after_convert": [INJECT]}})))
    assert configure_with_reload(paths, []) == 0
    assert "ExecStartPre=+-/bin/sh -c 'set -C; { : > /var/lib/imaging/imaging.db; }" in (
        worker_dropin.dropin_path(paths.unit_dir).read_text()
    )


def test_dropin_is_removed_when_no_hook_mounts_the_guest(paths: Paths) -> None:
    reloads: list[str] = []
    paths.user_data.write_text(cloud_config(section(hooks={"points": {"before_write": [INJECT]}})))
    assert configure_with_reload(paths, reloads) == 0
    assert worker_dropin.dropin_path(paths.unit_dir).exists()

    # a hook that does not mount (policy) keeps the worker unprivileged
    policy = {"hook": "policy", "with": {"deny_formats": ["vhd"]}}
    paths.user_data.write_text(cloud_config(section(hooks={"points": {"before_write": [policy]}})))
    assert configure_with_reload(paths, reloads) == 0

    assert not worker_dropin.dropin_path(paths.unit_dir).exists()
    assert not (paths.unit_dir / "imaging-worker.service.d").exists()
    assert reloads == ["daemon-reload", "daemon-reload"]
    assert configure_with_reload(paths, reloads) == 0 and len(reloads) == 2  # nothing to remove twice


def test_run_hook_needs_root_only_in_the_chroot() -> None:
    hooks = config_mod.hooks_from_dict(
        {
            "after_fetch": [{"hook": "policy"}, {"hook": "util.echo"}],
            "after_convert": [{"hook": "run", "with": {"command": "true"}}, INJECT],
            "before_write": [{"hook": "run", "with": {"command": "true", "where": "chroot"}}],
        }
    )
    assert privileged_hooks(hooks) == ["after_convert[1] inject-metadata", "before_write[0] run"]


def test_invalid_config_leaves_the_worker_dropin_alone(paths: Paths) -> None:
    reloads: list[str] = []
    paths.user_data.write_text(cloud_config(section(hooks={"points": {"after_convert": [INJECT]}})))
    assert configure_with_reload(paths, reloads) == 0
    paths.user_data.write_text(cloud_config(section(hooks={"points": {"after_convret": []}})))

    assert configure_with_reload(paths, reloads) == 2

    assert worker_dropin.dropin_path(paths.unit_dir).exists()  # as with the config: nothing replaced
    assert reloads == ["daemon-reload"]


def test_artifact_store_secret_is_redacted_from_the_console_and_error_file(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    store_secret = "Artifact+Store/Secret_0123456789"
    arts = {"bucket": store_secret, "access_key": "AKIASTORE", "secret_key": store_secret, "region": ""}
    paths.user_data.write_text(cloud_config(section(artifacts=arts)))

    assert run_configure(paths) == 2

    err = capsys.readouterr().err
    assert "imaging.artifacts.bucket" in err and "imaging.artifacts.region" in err
    assert store_secret not in err + paths.error_file.read_text()


def test_worker_unit_with_the_dropin_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    units = tmp_path / "units"
    units.mkdir()
    for unit in WORKER_UNIT.parent.glob("*.service"):
        # verify insists that ExecStart exists; the appliance's /usr/local/bin/imaging is not here
        text = unit.read_text().replace("ExecStart=/usr/local/bin/imaging", "ExecStart=/bin/true")
        (units / unit.name).write_text(text)
    worker_dropin.sync_dropin(units, ["after_convert[0] inject-metadata"])
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:", "SYSTEMD_LOG_LEVEL": "debug"}

    proc = subprocess.run(
        [exe, "verify", str(units / "imaging-worker.service")], capture_output=True, text=True, env=env
    )

    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    dropin = worker_dropin.dropin_path(units)
    assert f"DropIn Path: {dropin}" in out  # the drop-in was read...
    assert f"{dropin}:" not in out  # ...without a warning about any of its lines


def test_an_io_weight_selects_bfq_through_the_flag_and_unenforceable_caps_are_warned(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    retriggers: list[str] = []

    def configure(limits: dict[str, Any]) -> int:
        paths.user_data.write_text(cloud_config(section(limits=limits)))
        opts = configure_mod.Options(
            user_data=paths.user_data,
            output=paths.output,
            error_file=paths.error_file,
            owner=None,
            attempts=1,
            timeout=5,
            unit_dir=None,
            retrigger=lambda: retriggers.append("udevadm trigger"),
        )
        return configure_mod.configure(opts)

    flag = paths.error_file.parent / configure_mod.IO_WEIGHT_FLAG
    limits = {"task_io_weight": 300, "task_cpu_quota": "50%", "task_memory_max": "512MiB"}
    assert configure(limits) == 0
    assert flag.exists() and retriggers == ["udevadm trigger"]
    written = yaml.safe_load(paths.output.read_text())["worker"]
    assert written["task_io_weight"] == 300 and written["task_memory_max"] == "512MiB"
    # what this machine cannot enforce is said on the console (and the configuration still applies)
    caps = TaskCaps.from_config(config_mod.load(paths.output).worker)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("imaging: warning: ")]
    assert warnings == [f"imaging: warning: {p}" for p in host_problems(caps)]

    assert configure(limits) == 0  # unchanged: no second trigger
    assert retriggers == ["udevadm trigger"]
    assert configure({"task_cpu_quota": "50%"}) == 0  # no weight any more: the flag goes
    assert not flag.exists() and retriggers == ["udevadm trigger"] * 2
