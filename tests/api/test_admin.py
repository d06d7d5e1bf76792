"""The JSON admin API through Falcon's in-process test client, against a real SQLite task store.

Every JSON response a test receives is also checked against the served OpenAPI document
(:func:`assert_documented`), so the document and the implementation cannot drift apart.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import falcon
import falcon.inspect
import pytest
from falcon import testing
from jsonschema import ValidationError
from openapi_spec_validator import validate as validate_spec

from api.app import create_app
from appliance import config as config_mod
from appliance.service.discovery import app_version
from appliance.service.heartbeat import heartbeat_path
from appliance.service.worker import Worker
from appliance.store import Store
from appliance.timestamps import format_time
from tests import stores
from tests.api.ec2_support import sign
from tests.api.openapi_support import SPEC, assert_documented
from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY


def basic(key: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}


AUTH = basic(TEST_ACCESS_KEY, TEST_SECRET_KEY)


def assert_error(result: testing.Result, status: int, code: str) -> dict[str, Any]:
    """A JSON error with ``code`` whose request id matches the response header."""
    assert result.status_code == status, result.text
    assert result.headers["content-type"] == "application/json"
    error = result.json["error"]
    assert error["code"] == code
    assert error["request_id"] == result.headers["x-request-id"]
    assert "Traceback" not in result.text
    return error


def make_config(tmp_path: Path, **extra: Any) -> config_mod.Config:
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "api": {"credentials": [{"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}]},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return stores.config(data, base_dir=tmp_path)


@pytest.fixture
def cfg(tmp_path: Path) -> config_mod.Config:
    return make_config(tmp_path)


@pytest.fixture
def store(cfg: config_mod.Config) -> Iterator[Store]:
    with Store(cfg.store) as s:
        yield s


@pytest.fixture
def client(cfg: config_mod.Config, store: Store) -> testing.TestClient:
    return testing.TestClient(create_app(cfg, store=store))


def finished_task(store: Store, kind: str, state: str, *, seconds: float = 0.0, converted: int = 0) -> str:
    """A task driven through the store's real transitions to ``state``, whose run took ``seconds``."""
    task = store.create_task(kind)
    store.claim(task.id, "test-owner", 30)
    if converted:
        store.update_progress(task.id, phase="writing", bytes_done=converted, bytes_converted=converted)
    if state == "running":
        return task.id
    store.set_state(task.id, state)
    if seconds:
        # The store stamps times with "now"; give the finished task a known run time.
        start = datetime.now(UTC) - timedelta(seconds=seconds)
        stores.sql(
            store.settings, "UPDATE tasks SET started_at = ? WHERE id = ?", (format_time(start), task.id)
        )
    return task.id


# -- discovery, request ids, access log -------------------------------------------------------------


def test_root_without_action_lists_versions_without_credentials(client: testing.TestClient) -> None:
    result = client.simulate_get("/")
    assert result.status_code == 200
    assert result.json["versions"][0]["id"] == "v1"
    assert result.json["versions"][0]["status"] == "CURRENT"
    assert_documented("/", "GET", result)
    version = client.simulate_get("/v1/")  # trailing slash accepted, as the self link is written
    assert version.json["version"]["id"] == "v1"
    assert_documented("/v1", "GET", version)


def test_every_response_carries_its_own_request_id(client: testing.TestClient) -> None:
    ids = [
        client.simulate_get(path).headers["x-request-id"] for path in ("/", "/v1/health", "/nope", "/v1/info")
    ]
    assert all(uuid.UUID(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_access_log_line_has_request_id_and_no_query_string(
    client: testing.TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="api.access"):
        result = client.simulate_get("/v1/tasks", query_string="limit=5&kind=sekrit", headers=AUTH)
    lines = [r.getMessage() for r in caplog.records if r.name == "api.access"]
    assert len(lines) == 1
    assert '"GET /v1/tasks" 200' in lines[0]
    assert f"request_id={result.headers['x-request-id']}" in lines[0]
    assert f"principal={TEST_ACCESS_KEY}" in lines[0]
    assert "sekrit" not in lines[0]


# -- health --------------------------------------------------------------------------------------


def test_health_without_worker_heartbeat_is_degraded_but_up(client: testing.TestClient) -> None:
    result = client.simulate_get("/v1/health")
    assert result.status_code == 200
    body = result.json
    assert body["status"] == "degraded"
    assert "heartbeat" in body["reason"]
    assert body["checks"]["store"]["status"] == "ok"
    assert body["checks"]["qemu_img"]["status"] == "ok"
    assert body["checks"]["qemu_img"]["version"].startswith("qemu-img version")
    assert body["checks"]["scratch"]["status"] == "ok"
    assert body["checks"]["worker"]["status"] == "failed"
    assert body["version"] == app_version()
    assert_documented("/v1/health", "GET", result)


def test_health_is_ok_with_a_fresh_worker_heartbeat(
    cfg: config_mod.Config, client: testing.TestClient
) -> None:
    worker = Worker(cfg)
    try:
        worker.poll()  # the real worker writes its real heartbeat (no tasks to start)
    finally:
        worker.store.close()
    result = client.simulate_get("/v1/health")
    assert result.status_code == 200
    assert result.json["status"] == "ok", result.json
    assert "reason" not in result.json
    assert result.json["checks"]["worker"]["worker_status"] == "ok"
    assert_documented("/v1/health", "GET", result)


def test_health_is_degraded_when_the_worker_heartbeat_is_stale(
    cfg: config_mod.Config, client: testing.TestClient
) -> None:
    worker = Worker(cfg)
    try:
        worker.poll()
    finally:
        worker.store.close()
    path = heartbeat_path(cfg)
    beat = json.loads(path.read_text())
    beat["updated_at"] = format_time(datetime.now(UTC) - timedelta(seconds=cfg.lease_seconds + 60))
    path.write_text(json.dumps(beat))
    result = client.simulate_get("/v1/health")
    assert result.status_code == 200
    assert result.json["status"] == "degraded"
    assert "stale" in result.json["checks"]["worker"]["reason"]


def test_health_is_disabled_when_qemu_img_is_not_on_path(
    client: testing.TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = client.simulate_get("/v1/health")
    assert result.status_code == 503
    assert result.json["status"] == "disabled"
    assert "qemu-img" in result.json["reason"]
    assert result.json["checks"]["qemu_img"]["status"] == "failed"
    assert_documented("/v1/health", "GET", result)
    head = client.simulate_head("/v1/health")
    assert head.status_code == 503
    assert head.text == ""


@pytest.mark.backends("sqlite")
def test_health_is_disabled_and_tasks_unavailable_when_the_database_cannot_open(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    cfg.db_path.mkdir(parents=True)  # a directory where the database file should be
    client = testing.TestClient(create_app(cfg))
    health = client.simulate_get("/v1/health")
    assert health.status_code == 503
    assert health.json["status"] == "disabled"
    assert "task database" in health.json["reason"]
    tasks = client.simulate_get("/v1/tasks", headers=AUTH)
    assert_error(tasks, 503, "StateStoreError")
    assert_documented("/v1/tasks", "GET", tasks)


def test_health_is_disabled_and_tasks_unavailable_when_the_database_is_from_newer_code(
    tmp_path: Path,
) -> None:
    cfg = make_config(tmp_path)
    Store(cfg.store).close()
    stores.sql(cfg.store, "UPDATE schema_version SET version = 999")
    client = testing.TestClient(create_app(cfg))
    health = client.simulate_get("/v1/health")
    assert health.status_code == 503
    assert health.json["status"] == "disabled"
    assert "schema version 999" in health.json["reason"]
    assert "transient" not in health.json["checks"]["store"]
    assert_error(client.simulate_get("/v1/tasks", headers=AUTH), 503, "StateStoreError")


def test_health_is_degraded_when_scratch_is_below_min_free(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, scratch={"min_free": "1000PiB"})
    client = testing.TestClient(create_app(cfg))
    result = client.simulate_get("/v1/health")
    assert result.status_code == 200
    scratch = result.json["checks"]["scratch"]
    assert scratch["status"] == "warning"
    assert "min_free" in scratch["reason"]
    assert scratch["free_bytes"] < scratch["min_free_bytes"]
    assert result.json["status"] == "degraded"


# -- info ----------------------------------------------------------------------------------------


def test_info_reports_actions_formats_targets_and_limits(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        api={"sigv2": True},
        safety={"iso_policy": "reject", "banned_formats": ["qed", "vhdx"]},
        tasks={"max_active": 3},
        limits={"max_virtual_size": "100GiB"},
    )
    client = testing.TestClient(create_app(cfg))
    result = client.simulate_get("/v1/info", headers=AUTH)
    assert result.status_code == 200
    info = result.json
    assert "ImportVolume" in info["ec2"]["actions"]
    assert "DescribeImportSnapshotTasks" in info["ec2"]["actions"]
    assert info["ec2"]["sigv2"] is True
    assert info["ec2"]["signature_versions"] == ["4", "2"]
    assert info["import"]["input_formats"] == ["raw", "qcow2", "vmdk", "vhd"]
    assert info["import"]["wire_formats"]["ImportVolume"] == ["VMDK", "RAW", "VHD"]
    assert info["import"]["targets"] == {"image": "file", "volume": "file"}
    assert info["limits"]["max_active_tasks"] == 3
    assert info["limits"]["max_virtual_size"] == 100 * 1024**3
    assert_documented("/v1/info", "GET", result)


# -- authentication ------------------------------------------------------------------------------

PROTECTED = ("/v1/info", "/v1/tasks", "/v1/tasks/t-000000000000", "/metrics")


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(TEST_ACCESS_KEY, TEST_SECRET_KEY + "x"),
        basic("AKIAUNKNOWNUNKNOWN01", TEST_SECRET_KEY),
        {"Authorization": "Basic !!!not-base64!!!"},
        {"Authorization": f"Bearer {TEST_ACCESS_KEY}:{TEST_SECRET_KEY}"},
    ],
    ids=["none", "wrong-secret", "unknown-key", "malformed", "bearer"],
)
def test_admin_routes_refuse_missing_or_wrong_credentials(
    client: testing.TestClient, path: str, headers: dict[str, str]
) -> None:
    result = client.simulate_get(path, headers=headers)
    assert_error(result, 401, "AuthFailure")
    assert result.headers["www-authenticate"].startswith('Basic realm="imaging-admin"')
    template = "/v1/tasks/{task_id}" if path.startswith("/v1/tasks/") else path
    assert_documented(template, "GET", result)


def test_admin_routes_refuse_everyone_when_no_credentials_are_configured(tmp_path: Path) -> None:
    cfg = stores.config({"state_dir": str(tmp_path)}, base_dir=tmp_path)
    client = testing.TestClient(create_app(cfg))
    assert_error(client.simulate_get("/v1/info", headers=AUTH), 401, "AuthFailure")
    assert client.simulate_get("/v1/health").status_code in (200, 503)


@pytest.mark.parametrize("path", PROTECTED[:2] + PROTECTED[3:])
def test_admin_routes_accept_the_configured_key_pair(client: testing.TestClient, path: str) -> None:
    assert client.simulate_get(path, headers=AUTH).status_code == 200


# -- tasks ---------------------------------------------------------------------------------------


def test_task_list_is_newest_first_and_filters_by_state_and_kind(
    client: testing.TestClient, store: Store
) -> None:
    a = finished_task(store, "import-volume", "completed")
    b = finished_task(store, "import-image", "failed")
    c = store.create_task("import-volume").id
    result = client.simulate_get("/v1/tasks", headers=AUTH)
    assert [t["id"] for t in result.json["tasks"]] == [c, b, a]
    assert result.json["next_marker"] is None
    assert result.json["tasks"][0]["links"] == [{"rel": "self", "href": f"/v1/tasks/{c}"}]
    assert_documented("/v1/tasks", "GET", result)

    by_kind = client.simulate_get("/v1/tasks", query_string="kind=import-volume", headers=AUTH)
    assert [t["id"] for t in by_kind.json["tasks"]] == [c, a]
    by_state = client.simulate_get("/v1/tasks", query_string="state=completed&state=failed", headers=AUTH)
    assert [t["id"] for t in by_state.json["tasks"]] == [b, a]
    both = client.simulate_get(
        "/v1/tasks", query_string="state=pending,completed&kind=import-volume", headers=AUTH
    )
    assert [t["id"] for t in both.json["tasks"]] == [c, a]


def test_task_list_pages_with_marker_and_next_link(client: testing.TestClient, store: Store) -> None:
    ids = [store.create_task("import-volume").id for _ in range(7)]
    store.create_task("import-image")  # filtered out: the next link must keep the filter
    newest_first = list(reversed(ids))
    seen: list[str] = []
    query = "limit=3&kind=import-volume"
    pages = 0
    while True:
        result = client.simulate_get("/v1/tasks", query_string=query, headers=AUTH)
        assert_documented("/v1/tasks", "GET", result)
        page = result.json
        seen += [t["id"] for t in page["tasks"]]
        pages += 1
        if page["next_marker"] is None:
            assert page["links"] == []
            break
        assert page["next_marker"] == page["tasks"][-1]["id"]
        (link,) = page["links"]
        assert link["rel"] == "next"
        query = link["href"].split("?", 1)[1]
    assert seen == newest_first
    assert pages == 3


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=0", "InvalidParameterValue"),
        ("limit=1001", "InvalidParameterValue"),
        ("limit=ten", "InvalidParameterValue"),
        ("state=finished", "InvalidParameterValue"),
        ("marker=t-doesnotexist", "InvalidMarker"),
    ],
)
def test_task_list_rejects_bad_parameters(client: testing.TestClient, query: str, code: str) -> None:
    result = client.simulate_get("/v1/tasks", query_string=query, headers=AUTH)
    error = assert_error(result, 400, code)
    assert error["message"]
    assert_documented("/v1/tasks", "GET", result)


def test_task_detail_has_steps_progress_findings_ledger_and_events(
    client: testing.TestClient, store: Store
) -> None:
    url = "https://bucket.example/disk.manifest.xml?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123&x=1"
    task = store.create_task("import-volume", params={"manifest_url": url, "s3": {"secret_key": "hush"}})
    store.claim(task.id, "test-owner", 30)
    store.record_step(
        task.id, "1", name="inspect", action="image.inspect", state="completed", result={"ok": 1}
    )
    store.record_step(task.id, "2", name="convert", action="image.convert", state="running")
    store.update_progress(task.id, phase="converting", bytes_done=512, bytes_total=1024, percent=50.0)
    store.add_findings(task.id, [{"code": "UnsafeImage.Test", "severity": "warning", "message": "m"}])
    store.add_ledger(task.id, "created", "/scratch/x.raw", step="2")

    result = client.simulate_get(f"/v1/tasks/{task.id}", headers=AUTH)
    assert result.status_code == 200
    detail = result.json
    assert_documented("/v1/tasks/{task_id}", "GET", result)
    assert detail["task"]["id"] == task.id
    assert detail["task"]["state"] == "running"
    assert detail["task"]["owner"] == "test-owner"
    assert detail["progress"]["phase"] == "converting"
    assert detail["progress"]["percent"] == 50.0
    assert detail["progress"]["bytes_done"] == 512
    assert [(s["idx"], s["state"]) for s in detail["steps"]] == [("1", "completed"), ("2", "running")]
    assert detail["findings"] == [{"code": "UnsafeImage.Test", "severity": "warning", "message": "m"}]
    assert [(e["action"], e["resource"]) for e in detail["ledger"]] == [("created", "/scratch/x.raw")]
    kinds = [e["kind"] for e in detail["events"]]
    assert kinds[0] == "task.state" and "task.claimed" in kinds and kinds[-1] == "ledger"
    # presigned URL signatures and secrets are not shown; the rest of the URL is
    shown = detail["task"]["params"]["manifest_url"]
    assert "abc123" not in shown and "AKIA" not in shown
    assert shown.startswith("https://bucket.example/disk.manifest.xml?") and "x=1" in shown
    assert detail["task"]["params"]["s3"]["secret_key"] == "REDACTED"


def test_task_detail_of_unknown_task_is_404(client: testing.TestClient) -> None:
    result = client.simulate_get("/v1/tasks/import-vol-zzzzzzzz", headers=AUTH)
    assert_error(result, 404, "TaskNotFound")
    assert_documented("/v1/tasks/{task_id}", "GET", result)


def test_task_detail_of_malformed_id_is_400(client: testing.TestClient) -> None:
    result = client.simulate_get("/v1/tasks/" + quote("-bad id"), headers=AUTH)
    assert_error(result, 400, "InvalidTaskId.Malformed")
    assert_documented("/v1/tasks/{task_id}", "GET", result)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("accept", ["application/json", "text/html", "application/xml"])
def test_unknown_route_is_a_json_404_whatever_the_client_accepts(
    client: testing.TestClient, accept: str
) -> None:
    result = client.simulate_get("/v2/tasks", headers={"Accept": accept, **AUTH})
    error = assert_error(result, 404, "NotFound")
    assert "/v2/tasks" in error["message"]


def test_wrong_method_is_a_json_405_with_allow(client: testing.TestClient) -> None:
    result = client.simulate_post("/v1/tasks", headers=AUTH, body="{}")
    error = assert_error(result, 405, "MethodNotAllowed")
    assert "GET" in result.headers["allow"]
    assert "POST" in error["message"]
    assert_error(client.simulate_delete("/v1/health"), 405, "MethodNotAllowed")


def test_unexpected_exception_is_a_500_without_traceback(
    cfg: config_mod.Config, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    class Exploding:
        auth_required = False

        def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
            raise RuntimeError("secret internal detail /etc/imaging")

    app = create_app(cfg, store=store)
    app.add_route("/v1/explode", Exploding())
    with caplog.at_level(logging.ERROR, logger="api.app"):
        result = testing.TestClient(app).simulate_get("/v1/explode")
    error = assert_error(result, 500, "InternalError")
    assert "secret internal detail" not in result.text
    assert "RuntimeError" not in result.text
    assert "request id" in error["message"]
    logged = [r for r in caplog.records if r.name == "api.app"]
    assert logged and logged[0].exc_info is not None  # the traceback goes to the log instead
    assert error["request_id"] in logged[0].getMessage()


# -- metrics -------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """A minimal exposition-format parser: (TYPE by family, value by (name, labels))."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("#") or not line:
            continue
        else:
            m = _SAMPLE.match(line)
            assert m, f"not an exposition line: {line!r}"
            labels = frozenset(_LABEL.findall(m.group(2) or ""))
            key = (m.group(1), labels)
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = float(m.group(3))
    return types, samples


def test_metrics_count_tasks_bytes_and_durations(client: testing.TestClient, store: Store) -> None:
    finished_task(store, "import-volume", "completed", seconds=90, converted=1000)
    finished_task(store, "import-volume", "completed", seconds=4000, converted=24)
    finished_task(store, "import-volume", "failed", seconds=2)
    finished_task(store, "import-image", "running", converted=7)  # not completed: not counted as converted
    store.create_task("import-image")

    result = client.simulate_get("/metrics", headers=AUTH)
    assert result.status_code == 200
    assert result.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert_documented("/metrics", "GET", result)
    types, samples = parse_metrics(result.text)
    assert types == {
        "imaging_build_info": "gauge",
        "imaging_tasks": "gauge",
        "imaging_converted_bytes_total": "counter",
        "imaging_task_duration_seconds": "histogram",
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("imaging_tasks", kind="import-volume", state="completed") == 2
    assert value("imaging_tasks", kind="import-volume", state="failed") == 1
    assert value("imaging_tasks", kind="import-volume", state="pending") == 0
    assert value("imaging_tasks", kind="import-image", state="running") == 1
    assert value("imaging_tasks", kind="import-image", state="pending") == 1
    assert value("imaging_converted_bytes_total", kind="import-volume") == 1024
    assert value("imaging_converted_bytes_total", kind="import-image") == 0

    done = {"kind": "import-volume", "state": "completed"}
    assert value("imaging_task_duration_seconds_count", **done) == 2
    assert 4089 < value("imaging_task_duration_seconds_sum", **done) < 4092
    assert value("imaging_task_duration_seconds_bucket", **done, le="60.0") == 0
    assert value("imaging_task_duration_seconds_bucket", **done, le="120.0") == 1
    assert value("imaging_task_duration_seconds_bucket", **done, le="3600.0") == 1
    assert value("imaging_task_duration_seconds_bucket", **done, le="7200.0") == 2
    assert value("imaging_task_duration_seconds_bucket", **done, le="+Inf") == 2
    failed = {"kind": "import-volume", "state": "failed"}
    assert value("imaging_task_duration_seconds_bucket", **failed, le="1.0") == 0
    assert value("imaging_task_duration_seconds_bucket", **failed, le="5.0") == 1
    # buckets are cumulative
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in samples.items()
        if k[0] == "imaging_task_duration_seconds_bucket" and ("state", "completed") in k[1]
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert (
        value("imaging_build_info", version=app_version(), python=__import__("platform").python_version())
        == 1
    )


def test_metrics_of_an_empty_store_are_valid_and_only_build_info(client: testing.TestClient) -> None:
    types, samples = parse_metrics(client.simulate_get("/metrics", headers=AUTH).text)
    assert [k[0] for k in samples] == ["imaging_build_info"]
    assert "imaging_tasks" in types


# -- the OpenAPI document ------------------------------------------------------------------------


def test_openapi_document_is_valid_openapi_3_1(client: testing.TestClient) -> None:
    result = client.simulate_get("/v1/openapi.json")  # open: no credentials
    assert result.status_code == 200
    assert result.json["openapi"].startswith("3.1")
    assert result.json["info"]["version"] == app_version()
    validate_spec(result.json)
    assert_documented("/v1/openapi.json", "GET", result)


def test_openapi_document_describes_exactly_the_served_routes(cfg: config_mod.Config) -> None:
    served = {
        route.path: {m.method.lower() for m in route.methods if not m.internal}
        for route in falcon.inspect.inspect_routes(create_app(cfg))
    }
    assert set(SPEC["paths"]) == set(served)
    for template, item in SPEC["paths"].items():
        assert set(item) <= served[template], f"{template}: documents {set(item)}, serves {served[template]}"


def test_openapi_security_matches_what_the_app_enforces(client: testing.TestClient) -> None:
    for template, item in SPEC["paths"].items():
        path = template.replace("{task_id}", "t-000000000000").replace("{image_id}", "ami-0123456789abcdef0")
        # GET, and POST of the admin routes (POST / is the EC2 API, signed with SigV4)
        for method in [m for m in ("get", "post") if m in item and not (template == "/" and m == "post")]:
            open_route = item[method].get("security", SPEC["security"]) == []
            status = client.simulate_request(method.upper(), path).status_code
            assert (status != 401) == open_route, (
                f"{method} {template}: documented open={open_route}, got {status}"
            )


def test_response_check_rejects_an_undocumented_body(client: testing.TestClient) -> None:
    # The helper every test relies on must be able to fail.
    result = client.simulate_get("/v1/tasks", headers=AUTH)
    assert_documented("/v1/tasks", "GET", result)
    body = result.json
    body["tasks"].append({"id": 1})
    with pytest.raises(ValidationError):
        assert_documented("/v1/tasks", "GET", result, body)


# -- the EC2 Query API shares the root --------------------------------------------------------------


def test_get_root_with_an_action_is_answered_by_the_ec2_api(client: testing.TestClient) -> None:
    result = client.simulate_get("/", query_string="Action=DescribeConversionTasks&Version=2016-11-15")
    assert result.headers["content-type"].startswith("text/xml")
    assert 400 <= result.status_code < 500  # unsigned
    request_id = result.headers["x-request-id"]
    assert f"<RequestID>{request_id}</RequestID>" in result.text  # the same id in header and XML
    assert result.headers["x-amzn-requestid"] == request_id


def test_post_root_is_always_the_ec2_api(client: testing.TestClient) -> None:
    for body in ("Action=DescribeConversionTasks&Version=2016-11-15", "Version=2016-11-15"):
        result = client.simulate_post(
            "/", body=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert result.headers["content-type"].startswith("text/xml"), body
        assert "<Errors>" in result.text


def test_info_lists_the_actions_the_ec2_resource_dispatches(client: testing.TestClient) -> None:
    from api.ec2.resource import ACTIONS

    actions = client.simulate_get("/v1/info", headers=AUTH).json["ec2"]["actions"]
    assert sorted(actions) == sorted(ACTIONS)


# -- the document and the served API agree (issue 10, item 12) --------------------------------------


def test_an_empty_marker_is_the_first_page(client: testing.TestClient, store: Store) -> None:
    task = store.create_task("import-volume")
    result = client.simulate_get("/v1/tasks", query_string="marker=", headers=AUTH)
    assert result.status_code == 200, result.text
    assert [t["id"] for t in result.json["tasks"]] == [task.id]
    assert_documented("/v1/tasks", "GET", result)


def _documented_gets() -> list[str]:
    return [template for template, item in SPEC["paths"].items() if "get" in item]


@pytest.mark.parametrize("template", _documented_gets())
def test_an_unknown_query_parameter_is_a_documented_400(client: testing.TestClient, template: str) -> None:
    path = template.replace("{task_id}", "import-vol-abcd1234")
    result = client.simulate_get(path, query_string="colour=blue", headers=AUTH)
    error = assert_error(result, 400, "UnknownParameter")
    assert "'colour'" in error["message"]
    assert_documented(template, "GET", result)


def test_a_single_valued_query_parameter_given_twice_is_refused(client: testing.TestClient) -> None:
    result = client.simulate_get("/v1/tasks", query_string="limit=1&limit=2", headers=AUTH)
    assert "limit" in assert_error(result, 400, "InvalidParameterValue")["message"]
    assert_documented("/v1/tasks", "GET", result)
    # an unknown parameter is named first, wherever it is
    result = client.simulate_get("/v1/tasks", query_string="limit=1&limit=2&colour=blue", headers=AUTH)
    assert "'colour'" in assert_error(result, 400, "UnknownParameter")["message"]
    # array parameters may repeat
    result = client.simulate_get("/v1/tasks", query_string="state=pending&state=failed", headers=AUTH)
    assert result.status_code == 200
    assert_documented("/v1/tasks", "GET", result)


def test_post_root_is_documented_as_the_ec2_query_api(client: testing.TestClient) -> None:
    operation = SPEC["paths"]["/"]["post"]
    assert operation["security"] == [{"sigv4": []}]
    assert "application/x-www-form-urlencoded" in operation["requestBody"]["content"]
    signed = sign({"Action": "DescribeConversionTasks", "Version": "2016-11-15"}, host="falconframework.org")
    ok = client.simulate_post("/", headers=signed.headers, body=signed.body)
    assert ok.status_code == 200, ok.text
    assert_documented("/", "POST", ok)
    unsigned = client.simulate_post(
        "/",
        body="Action=DescribeConversionTasks",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert unsigned.status_code == 401
    assert_documented("/", "POST", unsigned)


def test_get_root_with_ec2_signature_but_no_action_is_an_ec2_error(
    client: testing.TestClient,
) -> None:
    # what an EC2 client sends is answered by the EC2 API (XML), not refused as an unknown admin parameter
    for query in ("Version=2016-11-15", "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20260101T000000Z"):
        result = client.simulate_get("/", query_string=query)
        assert result.headers["content-type"].startswith("text/xml") and "<Errors>" in result.text, query
    # a SigV4-signed GET / without parameters is an EC2 client's too
    signed = sign({}, method="GET", host="falconframework.org")
    result = client.simulate_get("/", headers=signed.headers)
    assert (
        result.headers["content-type"].startswith("text/xml") and "<Code>MissingAction</Code>" in result.text
    )
