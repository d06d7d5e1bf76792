"""Push reporting end to end: a real worker process reports to the reference controller process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.report.outbox import Outbox
from appliance.report.push import PushReporter
from appliance.report.receiver import Controller, ReceiverServer
from appliance.store import Store, TaskState
from appliance.workflow.engine import Engine
from tests import stores
from tests.processes import stop_process as stop
from tests.processes import wait_until
from tests.servers import free_port, wait_for_http

pytestmark = pytest.mark.slow

SECRET = "push-test-secret-0123456789abcdef"
WORKFLOW = """
name: nap
params:
  seconds: {type: number, default: 0.5}
steps:
  - name: nap
    action: util.sleep
    with: {seconds: "{{ seconds }}"}
"""


#: a task that records a provenance record (what an import's last step does, with the digests given)
SOURCE_SHA256 = "5" * 64
RECORDED = f"""
name: recorded
steps:
  - name: provenance
    action: provenance.record
    with:
      disks:
        - source: {{location: "s3://disks/d.raw", sha256: "{SOURCE_SHA256}", size: 3, checked: []}}
          output: {{type: file, path: /images/d.raw, sha256: "{"6" * 64}", size: 3}}
    register: provenance
"""


class ReceiverProcess:
    """``python -m appliance.report.receiver`` on a fixed loopback port, restartable."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "appliance.report.receiver"),
                *("--bind", f"127.0.0.1:{self.port}", "--secret", SECRET, "--log", str(self.log)),
            ],
            stderr=subprocess.DEVNULL,
        )
        wait_for_http(self.url + "/health", proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc, grace=10)

    def messages(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line)["message"] for line in self.log.read_text().splitlines()]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ReceiverProcess]:
    rcv = ReceiverProcess(tmp_path / "controller.jsonl")
    rcv.start()
    yield rcv
    rcv.stop()


def write_config(tmp_path: Path, url: str, **controller: object) -> Path:
    wf_dir = tmp_path / "workflows"
    wf_dir.mkdir(exist_ok=True)
    (wf_dir / "nap.yaml").write_text(WORKFLOW)
    (wf_dir / "recorded.yaml").write_text(RECORDED)
    ctl = {
        "mode": "push",
        "url": url,
        "secret": SECRET,
        "appliance_id": "appliance-test-1",
        "report_interval": 0.5,
        "progress_interval": 1,
        "timeout": 2,
        "max_backoff": 1,
    } | controller
    f = tmp_path / "imaging.yaml"
    f.write_text(
        json.dumps(
            stores.with_store(
                {
                    "state_dir": str(tmp_path / "state"),
                    "workflows": {"extra_dirs": [str(wf_dir)]},
                    "worker": {"concurrency": 2, "poll_interval": 0.2},
                    "tasks": {"lease_seconds": 5},
                    "controller": ctl,
                }
            )
        )
    )
    return f


@pytest.fixture
def cfg_file(tmp_path: Path, receiver: ReceiverProcess) -> Path:
    return write_config(tmp_path, receiver.url)


@pytest.fixture
def engine(cfg_file: Path) -> Iterator[Engine]:
    eng = Engine(config_mod.load(cfg_file))
    yield eng
    eng.store.close()


def start_worker(cfg_file: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "--config", str(cfg_file), "worker"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def states_of(msgs: list[dict], task_id: str) -> list[str]:
    return [m["task"]["state"] for m in msgs if m.get("event") == "state" and m["task"]["id"] == task_id]


def finished(rcv: ReceiverProcess, task_id: str) -> bool:
    return "completed" in states_of(rcv.messages(), task_id)


def assert_in_order_without_duplicates(msgs: list[dict]) -> None:
    seqs = [m["seq"] for m in msgs]
    assert seqs == sorted(set(seqs)), "seq must strictly increase"
    event_ids = [m["event_id"] for m in msgs if m["type"] == "task"]
    assert event_ids == sorted(set(event_ids)), "every event once, in event order"


def store_state_events(store: Store) -> list[tuple[str, str]]:
    return [(e.task_id, e.data["state"]) for e in store.events(0, limit=100000) if e.kind == "task.state"]


def test_heartbeats_arrive_signed_with_increasing_seq(cfg_file: Path, receiver: ReceiverProcess) -> None:
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: len([m for m in receiver.messages() if m["type"] == "heartbeat"]) >= 3)
    finally:
        stop(worker)
    beats = [m for m in receiver.messages() if m["type"] == "heartbeat"]
    # the receiver logs only messages whose signature, seq and ts it verified
    assert [b["seq"] for b in beats] == sorted({b["seq"] for b in beats})
    beat = beats[-1]
    assert beat["ver"] == 1 and beat["appliance_id"] == "appliance-test-1"
    assert beat["health"] == "ok" and beat["reason"] is None
    assert beat["capacity"]["task_slots"] == 2 and beat["capacity"]["free_task_slots"] == 2
    assert beat["capacity"]["scratch_free"] > 0
    assert beat["version"]


def test_every_state_change_of_a_task_arrives_in_order(
    engine: Engine, cfg_file: Path, receiver: ReceiverProcess
) -> None:
    task_id = engine.submit("nap", {"seconds": 2.5})
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: finished(receiver, task_id), what="the completed event")
        # while it ran, a heartbeat carried its progress
        running = [t for m in receiver.messages() if m["type"] == "heartbeat" for t in m["tasks"]]
    finally:
        stop(worker)
    msgs = receiver.messages()
    assert states_of(msgs, task_id) == ["pending", "running", "completed"]
    assert_in_order_without_duplicates(msgs)
    assert any(t["id"] == task_id and t["phase"] == "sleep" for t in running)
    done = next(m for m in msgs if m.get("event") == "state" and m["task"]["state"] == "completed")
    assert done["task"]["percent"] == 100.0 and done["task"]["error"] is None
    ticks = [m for m in msgs if m.get("event") == "progress"]
    assert ticks and all(t["task"]["id"] == task_id for t in ticks)


def test_the_completed_state_message_carries_the_tasks_provenance_record(
    engine: Engine, cfg_file: Path, receiver: ReceiverProcess
) -> None:
    task_id = engine.submit("recorded", {})
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: finished(receiver, task_id), what="the completed event")
    finally:
        stop(worker)
    msgs = receiver.messages()  # each verified by the receiver: signature, ver 1, seq, ts
    states = {m["task"]["state"]: m for m in msgs if m.get("event") == "state" and m["task"]["id"] == task_id}
    record = states["completed"]["task"]["provenance"]
    assert record == engine.store.get_task(task_id).result["provenance"]
    assert record["source"]["sha256"] == SOURCE_SHA256 and record["output"]["sha256"] == "6" * 64
    assert record["tools"]["appliance"] and record["workflow"]["workflow"] == "recorded"
    assert states["completed"]["ver"] == 1


def test_nothing_is_lost_while_the_controller_is_down(
    engine: Engine, cfg_file: Path, receiver: ReceiverProcess
) -> None:
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: any(m["type"] == "heartbeat" for m in receiver.messages()), what="a heartbeat")
        receiver.stop()
        ids = [engine.submit("nap", {"seconds": 0.3}) for _ in range(3)]
        wait_until(lambda: all(engine.store.get_task(i).state is TaskState.COMPLETED for i in ids))
        outbox = Outbox(engine.store.settings)
        wait_until(lambda: outbox.backlog() >= 9, what="the outbox to hold the state changes")
        outbox.close()
        receiver.start()
        wait_until(lambda: all(finished(receiver, i) for i in ids), what="delivery after the outage")
    finally:
        stop(worker)
    msgs = receiver.messages()
    assert_in_order_without_duplicates(msgs)
    for i in ids:
        assert states_of(msgs, i) == ["pending", "running", "completed"]


def test_seq_continues_across_an_appliance_restart(
    engine: Engine, cfg_file: Path, receiver: ReceiverProcess
) -> None:
    first = engine.submit("nap", {"seconds": 0.2})
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: finished(receiver, first))
    finally:
        stop(worker)
    before = max(m["seq"] for m in receiver.messages())
    second = engine.submit("nap", {"seconds": 0.2})
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: finished(receiver, second))
    finally:
        stop(worker)
    msgs = receiver.messages()
    assert_in_order_without_duplicates(msgs)
    assert min(m["seq"] for m in msgs if m.get("task", {}).get("id") == second) > before
    # exactly once: every state change the store recorded was delivered, none twice
    delivered = [(m["task"]["id"], m["task"]["state"]) for m in msgs if m.get("event") == "state"]
    assert delivered == store_state_events(engine.store)


def test_the_controller_can_cancel_a_running_task(
    engine: Engine, cfg_file: Path, receiver: ReceiverProcess
) -> None:
    task_id = engine.submit("nap", {"seconds": 60})
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: "running" in states_of(receiver.messages(), task_id))
        req = json.dumps({"task_ids": [task_id]}).encode()
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(receiver.url + "/admin/cancel", data=req), timeout=60)
        wait_until(lambda: engine.store.get_task(task_id).state is TaskState.CANCELLED, what="the cancel")
        wait_until(lambda: "cancelled" in states_of(receiver.messages(), task_id))
    finally:
        stop(worker)
    assert engine.store.get_task(task_id).cancel_reason == "cancelled by the controller"
    assert states_of(receiver.messages(), task_id) == ["pending", "running", "cancelling", "cancelled"]


def test_progress_ticks_are_throttled_but_state_changes_never(tmp_path: Path) -> None:
    controller = Controller(SECRET, tmp_path / "log.jsonl")
    server = ReceiverServer(f"127.0.0.1:{free_port()}", controller).start()
    cfg = config_mod.load(write_config(tmp_path, server.url, progress_interval=3600, report_interval=3600))
    store = Store(cfg.store)
    reporter = PushReporter(cfg, store)
    try:
        task = store.create_task("workflow", "nap")
        store.claim(task.id, "me", 30)
        for i in range(50):  # a burst far faster than progress_interval
            store.add_event(task.id, "step.progress", {"step": "1", "phase": "copy", "done": i, "total": 50})
        store.set_state(task.id, "completed")
        reporter.step()
        msgs = [json.loads(line)["message"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    finally:
        reporter.stop()
        store.close()
        server.stop()
    tasks = [m for m in msgs if m["type"] == "task"]
    assert [m["event"] for m in tasks] == ["state", "state", "progress", "state"]
    assert [m["task"]["state"] for m in tasks if m["event"] == "state"] == ["pending", "running", "completed"]
    assert tasks[2]["task"]["progress"]["done"] == 0  # the first tick of the burst; the rest were dropped
