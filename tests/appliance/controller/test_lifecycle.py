"""The controller's lifecycle over its real store (no HTTP): registration, assignment, updates,
removal and staleness, with several processes on one database where the rule must hold across them.

Every test runs on SQLite and on PostgreSQL (the ``store_backend`` fixture of ``tests/conftest.py``:
a fresh schema of the session's server), except those that open the SQLite file themselves."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.boot import rendezvous
from appliance.controller.lifecycle import (
    AuthFailure,
    ConfigurationInvalid,
    Registry,
    ReportRefused,
    appliance_view,
    event_view,
)
from appliance.controller.store import (
    MIGRATIONS,
    ApplianceExists,
    ApplianceNotFound,
    ControllerStore,
    Update,
)
from appliance.database import StoreConfig
from appliance.errors import UsageError
from appliance.report import messages
from appliance.store import Store, StoreError, open_database
from appliance.timestamps import format_time, utc_now

SECRET = "appliance-secret-0123456789abcdef"
ENROL = "fleet-enrolment-secret-0123456789"
API_SECRET = "api-secret-key-abcdefghijklmnopqrstuv"
CONFIG: dict[str, Any] = {
    "api": {"credentials": [{"access_key": "AKIAAPPLIANCE0000001", "secret_key": API_SECRET}]},
    "limits": {"concurrent_tasks": 2},
}


#: every test of this module runs on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("store_backend")


@pytest.fixture
def controller_db(store_settings: dict[str, Any], tmp_path: Path) -> StoreConfig:
    """The controller's database for this test: ``tmp_path/controller.db``, or a fresh PostgreSQL schema."""
    if not store_settings:
        return StoreConfig.sqlite(tmp_path / "controller.db")
    return StoreConfig(url=store_settings["url"])


@pytest.fixture
def registry(controller_db: StoreConfig) -> Iterator[Registry]:
    registry = Registry(ControllerStore(controller_db), enrol_secret=ENROL)
    yield registry
    registry.store.close()


@pytest.mark.backends("sqlite")
def test_the_database_is_private_and_migrated(tmp_path: Path) -> None:
    store = ControllerStore(tmp_path / "c.db")
    assert (tmp_path / "c.db").stat().st_mode & 0o777 == 0o600
    assert store.schema_version == len(MIGRATIONS) == 2


@pytest.mark.backends("sqlite")
def test_a_database_of_the_first_schema_is_migrated_keeping_its_appliances(
    tmp_path: Path, registry: Registry
) -> None:
    registry.pre_register("old-1", CONFIG, SECRET)
    registry.store.close()
    with sqlite3.connect(tmp_path / "controller.db") as conn:
        conn.execute("ALTER TABLE appliances DROP COLUMN applied_version")
        conn.execute("UPDATE schema_version SET version = 1")
    store = ControllerStore(tmp_path / "controller.db")
    assert store.schema_version == 2
    row = store.get("old-1")
    assert (row.config_version, row.applied_version) == (1, None)


@pytest.mark.backends("sqlite")
def test_a_database_of_a_newer_controller_is_refused(tmp_path: Path) -> None:
    ControllerStore(tmp_path / "c.db").close()
    with sqlite3.connect(tmp_path / "c.db") as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        ControllerStore(tmp_path / "c.db")


def test_a_newer_schema_is_refused_on_either_backend(controller_db: StoreConfig) -> None:
    ControllerStore(controller_db).close()
    db = open_database(controller_db)
    with db.transaction() as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    db.close()
    with pytest.raises(StoreError, match=r"controller database .* schema version 99"):
        ControllerStore(controller_db)


def test_a_task_database_is_not_taken_for_the_controllers(controller_db: StoreConfig) -> None:
    # both have an events table and a schema_version: one would misread the other
    Store(controller_db).close()
    with pytest.raises(StoreError, match="task database"):
        ControllerStore(controller_db)


def test_pre_register_checks_the_configuration_as_configure_will(registry: Registry) -> None:
    bad = dict(CONFIG, limits={"concurrent_tasks": 0}, log_level="loud")
    with pytest.raises(ConfigurationInvalid) as caught:
        registry.pre_register("appl-1", bad, SECRET)
    fields = {e.field for e in caught.value.errors}
    assert fields == {"imaging.limits.concurrent_tasks", "imaging.log_level"}
    assert API_SECRET not in str(caught.value) and SECRET not in str(caught.value)
    assert registry.appliances() == []


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (dict(CONFIG, appliance_id="someone-else"), "imaging.appliance_id"),
        (dict(CONFIG, controller={"secret": "another-secret-0123456789"}), "imaging.controller.secret"),
        (dict(CONFIG, controller={"mode": "sideways"}), "imaging.controller.mode"),
        (dict(CONFIG, hooks={"points": {"after_convert": [{"hook": "no-such-hook"}]}}), "imaging.hooks"),
    ],
)
def test_pre_register_refuses_what_the_appliance_would_refuse(
    registry: Registry, config: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigurationInvalid) as caught:
        registry.pre_register("appl-1", config, SECRET)
    assert any(e.field.startswith(field) for e in caught.value.errors), caught.value.errors


@pytest.mark.parametrize(
    ("appliance_id", "secret"),
    [("has:colon", SECRET), ("", SECRET), ("trailing\n", SECRET), ("ok", "short"), ("ok", SECRET + ":x")],
)
def test_pre_register_refuses_bad_ids_and_secrets(registry: Registry, appliance_id: str, secret: str) -> None:
    with pytest.raises(UsageError):
        registry.pre_register(appliance_id, CONFIG, secret)


def test_an_id_is_registered_once_and_views_carry_no_secret(registry: Registry) -> None:
    row = registry.pre_register("appl-1", {"imaging": CONFIG}, SECRET)
    with pytest.raises(ApplianceExists):
        registry.pre_register("appl-1", CONFIG, SECRET)
    shown = json.dumps([appliance_view(row), *(event_view(e) for e in registry.events())])
    assert SECRET not in shown and API_SECRET not in shown
    assert [e.kind for e in registry.events()] == ["registered"]


def _claim(target: StoreConfig, instance: str, barrier: Any, out: Any) -> None:
    store = ControllerStore(target)  # each process its own connection, as each gunicorn worker
    barrier.wait()
    got = store.assign(instance)
    out.put((instance, got[0].appliance_id if got else None))


def test_concurrent_instances_each_get_a_different_configuration_once(controller_db: StoreConfig) -> None:
    registry = Registry(ControllerStore(controller_db))
    registry.pre_register("static-1", CONFIG, SECRET)  # not in the pool
    for i in range(4):
        registry.pre_register(f"pool-{i}", CONFIG, SECRET, dynamic=True)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(7), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(controller_db, f"inst-{i}", barrier, out)) for i in range(7)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    handed = [aid for aid in results.values() if aid is not None]
    assert sorted(handed) == [f"pool-{i}" for i in range(4)]  # each once, none twice, static untouched
    assert list(results.values()).count(None) == 3
    assigned = [e for e in registry.events() if e.kind == "assigned"]
    assert sorted(e.appliance_id for e in assigned) == sorted(handed)
    assert registry.get("static-1").assigned_to is None


def test_the_same_instance_asking_again_gets_the_same_configuration(registry: Registry) -> None:
    registry.pre_register("pool-a", CONFIG, SECRET, dynamic=True)
    registry.pre_register("pool-b", CONFIG, SECRET, dynamic=True)
    first = registry.store.assign("machine-1")
    again = registry.store.assign("machine-1")
    assert first is not None and again is not None
    assert (first[0].appliance_id, first[1]) == ("pool-a", True)
    assert (again[0].appliance_id, again[1]) == ("pool-a", False)
    other = registry.store.assign("machine-2")
    assert other is not None and other[0].appliance_id == "pool-b"


def _signed(secret: str, who: str, method: str, path: str, body: bytes) -> dict[str, str]:
    return rendezvous.signed_headers(who, secret, method, path, body)


def test_assignment_needs_the_enrolment_secret(registry: Registry) -> None:
    registry.pre_register("pool-a", CONFIG, SECRET, dynamic=True)
    body = json.dumps({"ver": 1, "instance_id": "m-1"}).encode()
    path = "/v1/assignments"
    with pytest.raises(AuthFailure):
        registry.assign(path, _signed("not-the-enrolment-secret-000", "m-1", "POST", path, body), body)
    with pytest.raises(AuthFailure):  # the header must name the instance the body names
        registry.assign(path, _signed(ENROL, "m-2", "POST", path, body), body)
    answer, headers = registry.assign(path, _signed(ENROL, "m-1", "POST", path, body), body)
    rendezvous.verify(ENROL, "RESPONSE", path, headers, answer)
    assert json.loads(answer) == {"ver": 1, "appliance_id": "pool-a", "secret": SECRET}


def test_status_updates_record_changes_as_events(registry: Registry) -> None:
    registry.pre_register("appl-1", CONFIG, SECRET)
    path = "/v1/appliances/appl-1/status"
    message = {"status": "configured", "addresses": ["192.0.2.7"], "parameters": {"api": {"x": 1}}}
    body = json.dumps(message).encode()
    with pytest.raises(AuthFailure):
        registry.record_status(
            "appl-1", path, _signed("wrong-secret-0123456789", "appl-1", "POST", path, body), body
        )
    registry.record_status("appl-1", path, _signed(SECRET, "appl-1", "POST", path, body), body)
    registry.record_status("appl-1", path, _signed(SECRET, "appl-1", "POST", path, body), body)  # no change
    row = registry.get("appl-1")
    assert (row.status, row.addresses, row.parameters) == ("configured", ["192.0.2.7"], {"api": {"x": 1}})
    updates = [e.data for e in registry.events() if e.kind == "updated"]
    assert updates == [
        {"changed": ["addresses", "parameters", "status"], "addresses": ["192.0.2.7"], "status": "configured"}
    ]


def test_pushed_reports_are_accepted_once_in_seq_order(registry: Registry) -> None:
    registry.pre_register("appl-1", CONFIG, SECRET)
    payload = {
        "type": "heartbeat",
        "health": "ok",
        "addresses": ["192.0.2.9"],
        "tasks": [{"id": "t-1", "state": "running"}],
    }
    body = messages.encode("appl-1", 5, payload)
    headers = messages.headers(SECRET, "appl-1", body, "application/json")
    assert registry.record_report(body, headers) == {"ok": True, "seq": 5, "cancel": [], "config_version": 1}
    with pytest.raises(ReportRefused) as caught:
        registry.record_report(body, headers)
    assert (caught.value.status, caught.value.code) == (409, "ReportReplayed")
    forged = messages.headers("wrong-secret-0123456789", "appl-1", body, "application/json")
    with pytest.raises(AuthFailure):
        registry.record_report(messages.encode("appl-1", 6, payload), forged)
    row = registry.get("appl-1")
    assert (row.health, row.addresses, row.tasks) == (
        "ok",
        ["192.0.2.9"],
        [{"id": "t-1", "state": "running"}],
    )


def test_stale_removal_takes_only_silent_appliances_and_reports_their_tasks(registry: Registry) -> None:
    for name in ("silent", "waiting"):
        registry.pre_register(name, CONFIG, SECRET)
    registry.store.update("silent", Update(status="configured", tasks=[{"id": "t-9", "state": "running"}]))
    # everything heard from before a moment in the future is silent "since" then
    later = format_time(utc_now() + timedelta(seconds=5))
    removed = registry.store.remove_stale(later, 5)
    assert [(e.appliance_id, e.kind) for e in removed] == [("silent", "removed-stale")]
    assert removed[0].data["tasks"] == [{"id": "t-9", "state": "running"}]
    assert registry.store.remove_stale(later, 5) == []  # once
    assert [a.id for a in registry.appliances()] == ["waiting"]  # never launched: never stale
    assert [e.kind for e in registry.events(appliance_id="silent")][-1] == "removed-stale"
    # a removed appliance is no longer recognised
    path = "/v1/appliances/silent/config"
    with pytest.raises(AuthFailure):
        registry.serve_config("silent", path, _signed(SECRET, "silent", "GET", path, b""))


def test_a_recently_heard_appliance_is_not_stale(registry: Registry) -> None:
    registry.pre_register("alive", CONFIG, SECRET)
    registry.store.update("alive", Update(status="configured"))
    assert registry.remove_stale(3600) == []
    with pytest.raises(UsageError):
        registry.remove_stale(0)


# -- live configuration updates -------------------------------------------------------------------


def test_a_published_version_is_validated_served_and_announced_and_the_applied_one_recorded(
    registry: Registry,
) -> None:
    registry.pre_register("live-1", CONFIG, SECRET)
    path = "/v1/appliances/live-1/config"
    with pytest.raises(ConfigurationInvalid) as caught:
        registry.publish("live-1", dict(CONFIG, limits={"concurrent_tasks": 0}))
    assert [e.field for e in caught.value.errors] == ["imaging.limits.concurrent_tasks"]
    with pytest.raises(ApplianceNotFound):
        registry.publish("nobody", CONFIG)
    # the version it runs is current: a signed empty answer
    body, headers = registry.serve_config("live-1", path, _signed(SECRET, "live-1", "GET", path, b""), have=1)
    assert body is None
    rendezvous.verify(SECRET, "RESPONSE", path, headers, b"")

    assert registry.publish("live-1", dict(CONFIG, limits={"concurrent_tasks": 4})) == 2

    body, headers = registry.serve_config("live-1", path, _signed(SECRET, "live-1", "GET", path, b""), have=1)
    assert body is not None
    doc = json.loads(body)
    assert (doc["version"], doc["imaging"]["limits"]) == (2, {"concurrent_tasks": 4})
    status_path = "/v1/appliances/live-1/status"
    report = json.dumps({"status": "configured", "config_version": 2}).encode()
    registry.record_status(
        "live-1", status_path, _signed(SECRET, "live-1", "POST", status_path, report), report
    )
    row = registry.get("live-1")
    assert (row.config_version, row.applied_version, row.status) == (2, 2, "configured")
    assert [e.data for e in registry.events() if e.kind == "config-published"] == [{"version": 2}]


def test_a_refused_version_is_recorded_with_its_fields_and_the_applied_one_stays(registry: Registry) -> None:
    registry.pre_register("live-2", CONFIG, SECRET)
    registry.publish("live-2", CONFIG)
    status_path = "/v1/appliances/live-2/status"
    errors = [{"field": "imaging.api.tls", "message": "certificate and key do not load together"}]
    report = json.dumps({"status": "config-refused", "config_version": 2, "errors": errors}).encode()
    registry.record_status(
        "live-2", status_path, _signed(SECRET, "live-2", "POST", status_path, report), report
    )
    row = registry.get("live-2")
    assert (row.status, row.applied_version, row.errors) == ("config-refused", None, errors)
    assert [e.data for e in registry.events() if e.kind == "config-refused"] == [
        {"version": 2, "errors": errors}
    ]
    bad = json.dumps({"status": "configured", "config_version": "2"}).encode()
    with pytest.raises(UsageError, match="config_version"):
        registry.record_status(
            "live-2", status_path, _signed(SECRET, "live-2", "POST", status_path, bad), bad
        )
