"""Push reports across a takeover: two appliances (real ``imaging worker`` processes, each with a state
directory and an ``appliance_id`` of its own) share one PostgreSQL database, so one outbox, and report
to the reference controller process. The appliance running a task dies (kill -9 of its worker and the
task's process); the other takes the task over. The task's reports then come from the new owner, in
order after the earlier ones, with a ``takeover`` message between, each state change once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.store import TaskState
from appliance.workflow.engine import Engine
from tests import processes
from tests.appliance.report.test_push import ReceiverProcess, start_worker, states_of, write_config
from tests.fangate import OpenGate
from tests.processes import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.backends("postgresql")]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ReceiverProcess]:
    rcv = ReceiverProcess(tmp_path / "controller.jsonl")
    rcv.start()
    yield rcv
    rcv.stop()


#: a copy whose source is held as it is opened (tests.fangate.OpenGate): the run stays where it is until
#: the test lets it go, on whichever appliance runs it
WORKFLOW = """
name: held-copy
params:
  src: {type: string, required: true}
  dst: {type: string, required: true}
steps:
  - name: copy
    action: file.copy
    with: {src: "{{ src }}", dst: "{{ dst }}"}
"""


def appliance(tmp_path: Path, name: str, url: str) -> Path:
    home = tmp_path / name
    home.mkdir()
    cfg = write_config(home, url, appliance_id=f"appliance-{name}")
    (home / "workflows" / "held-copy.yaml").write_text(WORKFLOW)
    return cfg


def test_a_task_taken_over_is_reported_by_its_new_owner_in_order_and_completed_once(
    tmp_path: Path, receiver: ReceiverProcess
) -> None:
    a_cfg, b_cfg = appliance(tmp_path, "a", receiver.url), appliance(tmp_path, "b", receiver.url)
    held = tmp_path / "held"
    held.mkdir()
    src = held / "data.bin"
    src.write_bytes(b"x" * 4096)
    engine = Engine(config_mod.load(a_cfg))
    workers: list[subprocess.Popen[bytes]] = []
    try:
        with OpenGate(held, lambda path, pid: path == src) as gate:
            task_id = engine.submit("held-copy", {"src": str(src), "dst": str(tmp_path / "dst.bin")})
            workers.append(start_worker(a_cfg))

            def reported(state: str, by: str) -> bool:
                return any(
                    m.get("event") == "state"
                    and m["task"]["id"] == task_id
                    and m["task"]["state"] == state
                    and m["appliance_id"] == by
                    for m in receiver.messages()
                )

            wait_until(lambda: gate.held is not None, what="appliance a's copy held as it opens its source")
            wait_until(
                lambda: reported("running", "appliance-a"), what="appliance a reporting the task running"
            )
            # b reports alongside a (its heartbeats) before a dies: two reporters on one outbox
            workers.append(start_worker(b_cfg))
            wait_until(
                lambda: any(
                    m["type"] == "heartbeat" and m["appliance_id"] == "appliance-b"
                    for m in receiver.messages()
                ),
                what="appliance b's first heartbeat",
            )
            owner = engine.store.get_task(task_id).owner
            processes.kill_tree(workers[0].pid)  # a's worker (its reporter) and the task's process at once
            workers[0].wait()
            wait_until(
                lambda: engine.store.get_task(task_id).epoch == 2, what="appliance b taking the task over"
            )
            gate.release()
            wait_until(
                lambda: reported("completed", "appliance-b"), timeout=90, what="b reporting it completed"
            )
        task = engine.store.get_task(task_id)
        takeovers = [e for e in engine.store.events(task_id=task_id) if e.kind == "task.takeover"]
    finally:
        for proc in workers:
            processes.stop_process(proc)
        engine.close()
    assert task.state is TaskState.COMPLETED and task.epoch == 2
    assert [e.data["previous_owner"] for e in takeovers] == [owner]
    msgs = receiver.messages()
    # each appliance's seqs increase (the receiver refuses anything else); every message once
    for name in ("appliance-a", "appliance-b"):
        seqs = [m["seq"] for m in msgs if m["appliance_id"] == name]
        assert seqs == sorted(set(seqs)), name
    about = [m for m in msgs if m["type"] == "task" and m["task"]["id"] == task_id]
    # the task's messages arrive in the order of its events, each once
    event_ids = [m["event_id"] for m in about]
    assert event_ids == sorted(set(event_ids))
    assert states_of(msgs, task_id) == ["pending", "running", "completed"]  # never two completed
    kinds = [m["event"] for m in about]
    assert kinds.count("takeover") == 1
    takeover = about[kinds.index("takeover")]
    assert takeover["task"]["epoch"] == 2 and takeover["task"]["previous_epoch"] == 1
    assert takeover["event_id"] == takeovers[0].id
    # from the takeover on, the new owner reports the task
    assert {m["appliance_id"] for m in about[kinds.index("takeover") :]} == {"appliance-b"}
    # each appliance sends its own heartbeat
    assert {m["appliance_id"] for m in msgs if m["type"] == "heartbeat"} == {"appliance-a", "appliance-b"}
