"""The report receiver: signature, version, replay and staleness checks over real HTTP on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.report import messages
from appliance.report.euca_auth import InstanceCredentials, sign_request
from appliance.report.imaging_service import ImagingService
from appliance.report.receiver import Controller, ReceiverServer, ReportRejected, ReportVerifier
from appliance.timestamps import format_time, utcnow
from tests.euca_controller import make_cloud_key
from tests.processes import stop_process
from tests.servers import free_port, wait_for_http

#: the reference controller: never opens the task database
pytestmark = pytest.mark.backends("sqlite")

SECRET = "receiver-test-secret-0123456789"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ReceiverServer]:
    srv = ReceiverServer(f"127.0.0.1:{free_port()}", Controller(SECRET, tmp_path / "log.jsonl")).start()
    yield srv
    srv.stop()


def post(url: str, body: bytes, signature: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers[messages.SIGNATURE_HEADER] = signature
    req = urllib.request.Request(url + messages.REPORTS_PATH, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def heartbeat(seq: int, ts: datetime | None = None, appliance: str = "app-1") -> bytes:
    return messages.encode(appliance, seq, {"type": "heartbeat", "health": "ok"}, ts)


def logged(path: Path) -> list[dict]:
    return [json.loads(line)["message"] for line in path.read_text().splitlines()]


def test_accepts_a_signed_message_and_logs_it(server: ReceiverServer, tmp_path: Path) -> None:
    body = heartbeat(1)
    status, reply = post(server.url, body, messages.sign(SECRET, body))
    assert status == 200 and reply == {"ok": True, "seq": 1, "cancel": []}
    assert logged(tmp_path / "log.jsonl") == [json.loads(body)]


def test_refuses_a_message_signed_with_another_key(server: ReceiverServer, tmp_path: Path) -> None:
    body = heartbeat(1)
    status, reply = post(server.url, body, messages.sign("some-other-secret-0123456789", body))
    assert (status, reply["error"]) == (401, "forged")
    assert not (tmp_path / "log.jsonl").exists()


def test_refuses_a_body_altered_after_signing(server: ReceiverServer) -> None:
    body = heartbeat(1)
    signature = messages.sign(SECRET, body)
    tampered = body.replace(b'"health":"ok"', b'"health":"no"')
    assert tampered != body
    assert post(server.url, tampered, signature)[0] == 401
    assert post(server.url, body, None)[0] == 401  # unsigned


def test_refuses_a_replayed_message(server: ReceiverServer, tmp_path: Path) -> None:
    first, second = heartbeat(5), heartbeat(6)
    assert post(server.url, first, messages.sign(SECRET, first))[0] == 200
    assert post(server.url, second, messages.sign(SECRET, second))[0] == 200
    status, reply = post(server.url, first, messages.sign(SECRET, first))
    assert (status, reply["error"]) == (409, "replayed")
    # a fresh body with an old seq is a replay too
    old = heartbeat(6)
    assert post(server.url, old, messages.sign(SECRET, old))[1]["error"] == "replayed"
    assert [m["seq"] for m in logged(tmp_path / "log.jsonl")] == [5, 6]


def test_seq_is_tracked_per_appliance(server: ReceiverServer) -> None:
    a, b = heartbeat(7, appliance="app-a"), heartbeat(1, appliance="app-b")
    assert post(server.url, a, messages.sign(SECRET, a))[0] == 200
    assert post(server.url, b, messages.sign(SECRET, b))[0] == 200


def test_refuses_a_stale_or_future_message(server: ReceiverServer) -> None:
    stale = heartbeat(1, datetime.now(UTC) - timedelta(minutes=10))
    status, reply = post(server.url, stale, messages.sign(SECRET, stale))
    assert (status, reply["error"]) == (409, "stale")
    future = heartbeat(2, datetime.now(UTC) + timedelta(minutes=10))
    assert post(server.url, future, messages.sign(SECRET, future))[1]["error"] == "stale"
    # a refused stale message does not burn its seq
    fresh = heartbeat(1)
    assert post(server.url, fresh, messages.sign(SECRET, fresh))[0] == 200


def test_refuses_an_unknown_version() -> None:
    verifier = ReportVerifier(SECRET)
    body = json.dumps({"ver": 2, "appliance_id": "a", "seq": 1, "ts": utcnow(), "type": "heartbeat"})
    with pytest.raises(ReportRejected) as exc:
        verifier.verify(body.encode(), messages.sign(SECRET, body.encode()))
    assert (exc.value.status, exc.value.error) == (400, "version")


def test_a_shared_secret_accepts_a_message_whose_appliance_id_is_not_a_string() -> None:
    # a JSON list there was used as a dict key (TypeError, a 500); now it counts as "no id"
    verifier = ReportVerifier(SECRET)
    for seq, appliance_id in ((1, ["a"]), (2, None)):
        body = json.dumps(
            {
                "ver": messages.VERSION,
                "appliance_id": appliance_id,
                "seq": seq,
                "ts": utcnow(),
                "type": "heartbeat",
            }
        ).encode()
        assert verifier.verify(body, messages.sign(SECRET, body))["seq"] == seq
    replayed = json.dumps({"ver": messages.VERSION, "seq": 2, "ts": utcnow(), "type": "heartbeat"}).encode()
    with pytest.raises(ReportRejected) as exc:
        verifier.verify(replayed, messages.sign(SECRET, replayed))
    assert (exc.value.status, exc.value.error) == (409, "replayed")


def test_cancel_requests_are_repeated_until_the_task_is_over(server: ReceiverServer) -> None:
    server.controller.request_cancel(["import-vol-abcd1234"])
    first = heartbeat(1)
    assert post(server.url, first, messages.sign(SECRET, first))[1]["cancel"] == ["import-vol-abcd1234"]
    event = messages.encode(
        "app-1",
        2,
        {"type": "task", "event": "state", "task": {"id": "import-vol-abcd1234", "state": "cancelling"}},
    )
    assert post(server.url, event, messages.sign(SECRET, event))[1]["cancel"] == []


def test_remembers_the_last_seq_across_a_restart(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "appliance.report.receiver"),
            *("--bind", f"127.0.0.1:{port}", "--secret", SECRET, "--log", str(log)),
        ],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/health", proc=proc)
        body = heartbeat(3)
        assert post(url, body, messages.sign(SECRET, body))[0] == 200
    finally:
        stop_process(proc, grace=10)
    again = ReceiverServer(f"127.0.0.1:{free_port()}", Controller(SECRET, log)).start()
    try:
        assert post(again.url, body, messages.sign(SECRET, body))[1]["error"] == "replayed"
    finally:
        again.stop()


@pytest.mark.parametrize("version", ["2", "4"])
def test_the_imaging_service_takes_only_requests_signed_with_credentials_it_issued(
    tmp_path: Path, version: str
) -> None:
    key, _ = make_cloud_key(tmp_path)
    imaging = ImagingService(key.read_bytes(), instance_id="i-1")
    srv = ReceiverServer(
        f"127.0.0.1:{free_port()}", Controller(SECRET, tmp_path / "l.jsonl", imaging=imaging)
    )
    srv.start()
    try:
        url = srv.url + messages.IMAGING_PATH
        params = {"Action": "GetInstanceImportTask", "Version": "2014-02-14", "InstanceId": "i-1"}
        hmac_body = b"Action=GetInstanceImportTask&Version=2014-02-14&InstanceId=i-1"
        old_style = {messages.SIGNATURE_HEADER: messages.sign(SECRET, hmac_body)}  # the HMAC of push mode
        assert call(url, hmac_body, old_style)[0] == 403
        creds = InstanceCredentials(srv.url).get()
        body, headers = sign_request(url, params, creds, signature_version=version)
        status, reply = call(url, body, headers)
        assert status == 200 and b"GetInstanceImportTaskResponse" in reply
        tampered = body.replace(b"InstanceId=i-1", b"InstanceId=i-2")
        assert call(url, tampered, headers)[0] == 403
        imaging.revoke(creds.access_key)
        status, reply = call(url, *sign_request(url, params, creds, signature_version=version))
        assert status == 403 and b"<Code>ExpiredToken</Code>" in reply
    finally:
        srv.stop()


def call(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_flags_an_appliance_silent_for_too_long_as_stale(tmp_path: Path) -> None:
    arrived = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    now = [arrived]  # the controller's clock: a fixed moment, moved by the test
    controller = Controller(SECRET, tmp_path / "log.jsonl", stale_after=60, clock=lambda: now[0])
    body = heartbeat(1, arrived)  # fresh by that clock
    controller.accept(body, messages.sign(SECRET, body))
    assert controller.last_seen["app-1"] == arrived
    now[0] = arrived + timedelta(minutes=1)  # silent for stale_after: not yet stale
    assert controller.appliances()["app-1"] == {
        "last_seq": 1,
        "last_seen": format_time(arrived),
        "stale": False,
    }
    now[0] += timedelta(microseconds=1)  # any longer: stale
    assert controller.appliances()["app-1"]["stale"] is True
