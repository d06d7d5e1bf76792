"""The shipped controller end to end: `imaging controller serve` (gunicorn on loopback), the admin
commands over its REST API, and appliances using the real rendezvous client code, `imaging configure`
and `imaging worker` as processes."""

from __future__ import annotations

import json
import multiprocessing
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate

from appliance import config as config_mod
from appliance.boot import rendezvous
from appliance.report import messages
from appliance.report.outbox import Pending
from appliance.report.push import PushReporter
from appliance.store import Store
from tests.api.controller_support import (
    ADMIN_TOKEN,
    ENROL_SECRET,
    ControllerProcess,
    running_controller,
)
from tests.postgres import Cluster
from tests.processes import stop_process, wait_until

# the controller has a database of its own (SQLite): the appliance store backends change nothing here,
# and the module-scoped controller would see both runs' registrations
pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]

SECRET = "appliance-secret-0123456789abcdef"
API_SECRET = "api-secret-key-abcdefghijklmnopqrstuv"
CONFIG: dict[str, Any] = {
    "api": {
        "credentials": [{"access_key": "AKIAAPPLIANCE0000001", "secret_key": API_SECRET}],
        "bind": "127.0.0.1:9999",
    },
    "limits": {"concurrent_tasks": 3},
}


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    with running_controller(tmp_path_factory.mktemp("controller")) as ctl:
        yield ctl


def imaging(ctl: ControllerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        capture_output=True,
        text=True,
        env=ctl.env(),
        input=stdin,
        timeout=120,
        check=False,
    )


def configure(
    ctl: ControllerProcess, tmp: Path, user_data: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`imaging configure` as at boot, writing under ``tmp``."""
    (tmp / "user-data").write_text(user_data)
    (tmp / "empty.yaml").write_text("")
    argv = ["-c", str(tmp / "empty.yaml"), "configure", "--user-data", str(tmp / "user-data")]
    argv += ["--output", str(tmp / "etc" / "imaging.yaml"), "--error-file", str(tmp / "err.json")]
    argv += ["--owner", "", "--attempts", "1", "--timeout", "10", "--unit-dir", "", *extra]
    return imaging(ctl, *argv)


def test_admin_commands_register_list_show_and_remove_over_the_api(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    (tmp_path / "config.yaml").write_text("#cloud-config\n" + yaml.safe_dump({"imaging": CONFIG}))
    done = imaging(controller, "controller", "register", "cli-1", "--config", str(tmp_path / "config.yaml"))
    assert done.returncode == 0, done.stderr
    assert "registered cli-1 (by id), configuration version 1" in done.stdout

    listed = imaging(controller, "controller", "list")
    shown = imaging(controller, "controller", "show", "cli-1")
    assert "cli-1\tregistered\t-\tstatic\tnever" in listed.stdout
    shown_view = json.loads(shown.stdout)
    assert shown_view["config_version"] == 1
    assert shown_view["config"]["api"]["credentials"][0]["secret_key"] == "REDACTED"
    for out in (listed.stdout, shown.stdout):
        assert API_SECRET not in out

    again = imaging(controller, "controller", "register", "cli-1", "--config", str(tmp_path / "config.yaml"))
    assert (again.returncode, again.stderr.strip()) == (
        1,
        "imaging: ApplianceExists: an appliance 'cli-1' is already registered",
    )
    (tmp_path / "bad.json").write_text(json.dumps({"limits": {"concurrent_tasks": 0}}))
    bad = imaging(controller, "controller", "register", "cli-2", "--config", str(tmp_path / "bad.json"))
    assert bad.returncode == 1
    assert "InvalidConfiguration: imaging.limits.concurrent_tasks:" in bad.stderr

    removed = imaging(controller, "controller", "remove", "cli-1")
    assert (removed.returncode, removed.stdout.strip()) == (0, "removed cli-1")
    gone = imaging(controller, "controller", "show", "cli-1")
    assert "ApplianceNotFound" in gone.stderr
    events = imaging(controller, "controller", "events", "--appliance", "cli-1", "--json")
    assert [e["kind"] for e in json.loads(events.stdout)["events"]] == ["registered", "removed"]


def test_admin_routes_need_the_token(controller: ControllerProcess) -> None:
    status, body = controller.admin("GET", "/v1/appliances", token="not-the-admin-token-000000")
    assert (status, body["error"]["code"]) == (401, "AuthFailure")
    wrong = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "controller", "list"],
        capture_output=True,
        text=True,
        env=controller.env() | {"IMAGING_CONTROLLER_TOKEN": "wrong-token-0123456789"},
        check=False,
    )
    assert wrong.returncode == 1 and "imaging: AuthFailure:" in wrong.stderr


def test_pre_registered_appliance_configures_from_the_controller_and_its_update_is_seen(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    reg = imaging(
        controller,
        "controller",
        "register",
        "appl-boot",
        "--config",
        str(tmp_path / "config.json"),
        "--boot-line",
    )
    assert reg.returncode == 0, reg.stderr
    line = reg.stdout.splitlines()[-1]
    assert line.startswith(f"imaging:v1:appl-boot:{controller.url}:")

    done = configure(controller, tmp_path, line + "\n")

    assert done.returncode == 0, done.stderr
    cfg = config_mod.load(tmp_path / "etc" / "imaging.yaml")
    assert (cfg.controller.appliance_id, cfg.controller.url) == ("appl-boot", controller.url)
    assert cfg.controller.secret == line.rpartition(":")[2] and cfg.worker.concurrency == 3
    status, view = controller.admin("GET", "/v1/appliances/appl-boot")
    assert status == 200 and view["status"] == "configured"
    assert "127.0.0.1" in view["addresses"] and view["last_seen"] is not None
    assert view["parameters"]["limits"] == {"concurrent_tasks": 3}
    assert view["parameters"]["controller"]["secret"] == "REDACTED"
    assert API_SECRET not in json.dumps(view)
    kinds = [e["kind"] for e in controller.events() if e["appliance_id"] == "appl-boot"]
    assert kinds == ["registered", "config-fetched", "updated"]


def _race(url: str, instance: str, barrier: Any, out: Any) -> None:
    """One appliance booting with only the rendezvous address: ask for an assignment, then fetch the
    configuration with the identity received (the real client code)."""
    barrier.wait()
    try:
        appliance_id, secret = rendezvous.request_assignment(url, ENROL_SECRET, instance)
        doc = rendezvous.fetch_config(url, appliance_id, secret)
        out.put((instance, appliance_id, doc["imaging"]["appliance_id"]))
    except rendezvous.RendezvousError as exc:
        out.put((instance, None, exc.message))


def test_appliances_racing_for_dynamic_assignment_each_get_one_configuration(tmp_path: Path) -> None:
    with running_controller(tmp_path, workers=3) as ctl:
        ctl.register("fixed-1", CONFIG, SECRET)
        for i in range(4):
            ctl.register(
                f"pool-{i}", dict(CONFIG, limits={"concurrent_tasks": i + 1}), f"{SECRET}-{i}", dynamic=True
            )
        mp = multiprocessing.get_context("fork")
        barrier, out = mp.Barrier(8), mp.Queue()
        procs = [mp.Process(target=_race, args=(ctl.url, f"instance-{i}", barrier, out)) for i in range(8)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)

        won = [(aid, fetched) for _, aid, fetched in results if aid is not None]
        lost = [why for _, aid, why in results if aid is None]
        assert sorted(aid for aid, _ in won) == [f"pool-{i}" for i in range(4)]
        assert all(aid == fetched for aid, fetched in won)  # each configured itself with its own
        assert len(lost) == 4 and all("NoUnassignedConfiguration" in why for why in lost)
        assigned = ctl.events("assigned")
        assert sorted(e["appliance_id"] for e in assigned) == [f"pool-{i}" for i in range(4)]
        holders = {e["data"]["instance_id"] for e in assigned}
        assert len(holders) == 4
        _, fixed = ctl.admin("GET", "/v1/appliances/fixed-1")
        assert fixed["assigned_to"] is None


def test_appliance_booted_with_only_the_rendezvous_address_configures_as_its_assignment(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    controller.register("pool-boot", dict(CONFIG, limits={"concurrent_tasks": 5}), SECRET, dynamic=True)
    line = f"imaging:v1::{controller.url}:{ENROL_SECRET}\n"

    done = configure(controller, tmp_path, line, "--instance-id", "machine-boot-1")

    assert done.returncode == 0, done.stderr
    cfg = config_mod.load(tmp_path / "etc" / "imaging.yaml")
    assert (cfg.controller.appliance_id, cfg.controller.secret, cfg.worker.concurrency) == (
        "pool-boot",
        SECRET,
        5,
    )
    # a reboot: the same machine is the same appliance
    again = configure(controller, tmp_path, line, "--instance-id", "machine-boot-1")
    assert again.returncode == 0, again.stderr
    assert config_mod.load(tmp_path / "etc" / "imaging.yaml").controller.appliance_id == "pool-boot"
    _, view = controller.admin("GET", "/v1/appliances/pool-boot")
    assert (view["assigned_to"], view["status"]) == ("machine-boot-1", "configured")
    for out in (done.stdout + done.stderr, again.stdout + again.stderr):
        assert ENROL_SECRET not in out and SECRET not in out


def test_without_user_data_the_rendezvous_line_the_image_carries_is_used(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    controller.register("pool-baked", CONFIG, SECRET, dynamic=True)
    baked = tmp_path / "rendezvous"
    baked.write_text(f"imaging:v1::{controller.url}:{ENROL_SECRET}\n")
    (tmp_path / "empty.yaml").write_text("")
    argv = ["-c", str(tmp_path / "empty.yaml"), "configure", "--user-data", str(tmp_path / "no-user-data")]
    argv += ["--rendezvous-file", str(baked), "--instance-id", "machine-baked-1"]
    argv += ["--output", str(tmp_path / "etc" / "imaging.yaml"), "--error-file", str(tmp_path / "err.json")]
    argv += ["--owner", "", "--attempts", "1", "--unit-dir", ""]

    done = imaging(controller, *argv)

    assert done.returncode == 0, done.stderr
    assert config_mod.load(tmp_path / "etc" / "imaging.yaml").controller.appliance_id == "pool-baked"
    # user data, when there is some, wins over the image's line
    (tmp_path / "user-data").write_text("#cloud-config\nimaging: {appliance_id: own-1}\n")
    argv[argv.index(str(tmp_path / "no-user-data"))] = str(tmp_path / "user-data")
    assert imaging(controller, *argv).returncode == 0
    assert config_mod.load(tmp_path / "etc" / "imaging.yaml").controller.appliance_id == "own-1"


def test_a_wrong_enrolment_secret_gets_no_assignment(controller: ControllerProcess, tmp_path: Path) -> None:
    done = configure(controller, tmp_path, f"imaging:v1::{controller.url}:not-the-enrolment-secret\n")
    assert done.returncode == 2
    error = json.loads((tmp_path / "err.json").read_text())["errors"][0]
    assert error["field"] == "imaging.controller.url" and "AuthFailure" in error["message"]


def _worker_config(tmp: Path, url: str, appliance_id: str) -> Path:
    path = tmp / "imaging.yaml"
    path.write_text(
        json.dumps(
            {
                "state_dir": str(tmp / "state"),
                "worker": {"poll_interval": 0.2},
                "controller": {
                    "mode": "push",
                    "url": url,
                    "secret": SECRET,
                    "appliance_id": appliance_id,
                    "report_interval": 0.3,
                    "timeout": 5,
                    "max_backoff": 1,
                },
            }
        )
    )
    return path


def test_a_reporting_appliance_stays_and_is_removed_once_silent_with_the_removal_reported(
    tmp_path: Path,
) -> None:
    with running_controller(tmp_path, stale_after=2, sweep_interval=0.2, workers=1) as ctl:
        ctl.register("worker-1", CONFIG, SECRET)
        ctl.register("not-launched", CONFIG, SECRET)
        cfg = _worker_config(tmp_path, ctl.url, "worker-1")
        worker = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "-c", str(cfg), "worker"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # heartbeats keep it: more of them than fit in the timeout arrive while it stays registered
            wait_until(
                lambda: (
                    len([e for e in ctl.events() if e["appliance_id"] == "worker-1"]) >= 2
                    and ctl.admin("GET", "/v1/appliances/worker-1")[1].get("health") is not None
                ),
                what="the worker's heartbeats",
            )
            first_seen = ctl.admin("GET", "/v1/appliances/worker-1")[1]["last_seen"]
            wait_until(
                lambda: ctl.admin("GET", "/v1/appliances/worker-1")[1]["last_seen"] > first_seen,
                what="a later heartbeat",
            )
            _, view = ctl.admin("GET", "/v1/appliances/worker-1")
            assert "127.0.0.1" in view["addresses"] and ctl.events("removed-stale") == []
        finally:
            stop_process(worker)

        wait_until(lambda: ctl.admin("GET", "/v1/appliances/worker-1")[0] == 404, what="the stale removal")
        [removal] = ctl.events("removed-stale")
        assert removal["appliance_id"] == "worker-1"
        assert removal["data"]["reason"] == "silent for longer than 2 s"
        assert removal["data"]["tasks"] == []
        assert ctl.admin("GET", "/v1/appliances/not-launched")[0] == 200  # never heard from: waiting


def test_remove_stale_by_the_admin_command(controller: ControllerProcess, tmp_path: Path) -> None:
    controller.register("quiet-1", CONFIG, SECRET)
    rendezvous.post_status(controller.url, "quiet-1", SECRET, {"status": "configured", "addresses": []})
    assert controller.admin("GET", "/v1/appliances/quiet-1")[1]["status"] == "configured"

    def removed() -> bool:
        done = imaging(controller, "controller", "remove-stale", "--stale-timeout", "0.01")
        assert done.returncode == 0, done.stderr
        return "removed quiet-1: silent for longer than 0.01 s" in done.stdout

    wait_until(removed, what="quiet-1 to be removed")
    assert controller.admin("GET", "/v1/appliances/quiet-1")[0] == 404
    # this controller runs without --stale-after: there is no default to remove by
    status, answer = controller.admin("POST", "/v1/stale-removals", {})
    assert (status, answer["error"]["message"]) == (
        400,
        "give a timeout: this controller runs without --stale-after",
    )


def test_a_replayed_report_is_refused_and_the_reporter_counts_it_delivered(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    controller.register("pusher", CONFIG, SECRET)
    cfg = config_mod.load(_worker_config(tmp_path, controller.url, "pusher"))
    store = Store(cfg.db_path)
    reporter = PushReporter(cfg, store)
    try:
        reporter.enqueue_heartbeat()
        assert reporter.deliver() == 1
        _, view = controller.admin("GET", "/v1/appliances/pusher")
        assert view["health"] in ("ok", "degraded", "disabled") and view["last_seen"] is not None

        payload = {"type": "heartbeat", "health": "ok"}
        body = messages.encode("pusher", 1, payload)  # seq 1 was the heartbeat just delivered
        request_headers = messages.headers(SECRET, "pusher", body, "application/json")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(
                urllib.request.Request(controller.url + "/v1/reports", body, request_headers, method="POST")
            )
        assert caught.value.code == 409
        assert json.loads(caught.value.read())["error"]["code"] == "ReportReplayed"
        assert reporter._post(Pending(1, "heartbeat", None, payload, 0)) == {}
    finally:
        reporter.outbox.close()
        store.close()


def test_the_controller_serves_https_and_the_appliance_configures_over_it(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
    ]
    openssl += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(openssl, check=True, capture_output=True)
    with running_controller(tmp_path, tls=(cert, key), workers=1) as ctl:
        assert ctl.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        request = urllib.request.Request(ctl.url + "/v1/health")
        with urllib.request.urlopen(request, context=context, timeout=30) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        body = json.dumps({"appliance_id": "tls-1", "config": CONFIG, "secret": SECRET}).encode()
        register = urllib.request.Request(
            ctl.url + "/v1/appliances",
            body,
            {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(register, context=context, timeout=30) as resp:
            assert resp.status == 201
        # the appliance trusts the controller's CA the way the system does: SSL_CERT_FILE
        done = subprocess.run(
            [sys.executable, "-c", FETCH, ctl.url, "tls-1", SECRET],
            capture_output=True,
            text=True,
            env=ctl.env() | {"SSL_CERT_FILE": str(cert)},
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["imaging"]["appliance_id"] == "tls-1"


FETCH = """
import json, sys
from appliance.boot import rendezvous
print(json.dumps(rendezvous.fetch_config(sys.argv[1], sys.argv[2], sys.argv[3])))
"""


def test_the_served_openapi_document_is_valid_and_lists_every_route(controller: ControllerProcess) -> None:
    with urllib.request.urlopen(controller.url + "/v1/openapi.json", timeout=30) as resp:
        doc = json.loads(resp.read())
    validate(doc)
    assert set(doc["paths"]) == {
        *("/", "/v1", "/v1/health", "/v1/openapi.json", "/v1/appliances", "/v1/appliances/{appliance_id}"),
        *("/v1/appliances/{appliance_id}/config", "/v1/appliances/{appliance_id}/status", "/v1/assignments"),
        "/v1/appliances/{appliance_id}/configs",
        *("/v1/reports", "/v1/stale-removals", "/v1/events"),
    }


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            {"appliance_id": "x-1", "config": {}, "secret": "short-secret-1"},
            "secret does not meet minLength 16",
        ),
        ({"appliance_id": "x-1", "config": [], "secret": SECRET}, "config must be of type object"),
        ({"appliance_id": "x-1", "config": {}, "secret": SECRET, "extra": 1}, "'extra' was unexpected"),
        ({"appliance_id": "x-1", "config": {}}, "'secret' is a required property"),
    ],
)
def test_a_malformed_registration_is_refused_by_field_without_echoing_values(
    controller: ControllerProcess, body: dict[str, Any], words: str
) -> None:
    status, answer = controller.admin("POST", "/v1/appliances", body)
    assert (status, answer["error"]["code"]) == (400, "InvalidParameterValue")
    assert words in answer["error"]["message"]
    assert "short-secret-1" not in json.dumps(answer) and SECRET not in json.dumps(answer)


def test_two_controllers_on_one_postgresql_database_serve_the_same_appliances(
    postgres: Cluster, tmp_path: Path
) -> None:
    schema = postgres.create_schema()
    url = postgres.schema_url(schema)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        with running_controller(tmp_path / "a", db=url) as a, running_controller(tmp_path / "b", db=url) as b:
            a.register("pg-1", CONFIG, SECRET)
            status, body = b.admin(
                "POST", "/v1/appliances", {"appliance_id": "pg-1", "config": CONFIG, "secret": SECRET}
            )
            assert (status, body["error"]["code"]) == (409, "ApplianceExists")
            b.register("pg-2", CONFIG, SECRET, dynamic=True)
            for ctl in (a, b):
                _, listed = ctl.admin("GET", "/v1/appliances")
                assert [x["id"] for x in listed["appliances"]] == ["pg-1", "pg-2"]
            assert b.admin("DELETE", "/v1/appliances/pg-1")[0] == 204
            assert a.admin("GET", "/v1/appliances/pg-1")[0] == 404
            assert [(e["appliance_id"], e["kind"]) for e in a.events()] == [
                ("pg-1", "registered"),
                ("pg-2", "registered"),
                ("pg-1", "removed"),
            ]
            assert SECRET not in a.log.read_text() + b.log.read_text()
    finally:
        postgres.drop_schema(schema)


def test_an_event_cursor_beyond_64_bits_is_a_bad_request_and_the_largest_one_lists_nothing(
    controller: ControllerProcess,
) -> None:
    # found by the OpenAPI fuzz test: the cursor overflowed the database driver into a 500
    status, body = controller.admin("GET", "/v1/events?after=9223372036854775808")
    assert status == 400, body
    assert "after" in json.dumps(body)
    status, body = controller.admin("GET", "/v1/events?after=9223372036854775807")
    assert (status, body) == (200, {"events": []})
