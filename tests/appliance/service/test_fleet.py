"""Workers of several appliances sharing one PostgreSQL task database, as real processes: doorbell
wake-ups, disjoint claims, failover of a stopped owner's task with fencing, cancels across
appliances.

Each "appliance" here is an `imaging worker` process with a state directory of its own; they share
the test's PostgreSQL schema (tests/conftest.py) and a workflow directory.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.pids import pid_alive
from appliance.store import Store, TaskState
from appliance.workflow.engine import Engine
from tests import processes, stores

wait_until = functools.partial(processes.wait_until, timeout=60.0)

pytestmark = [pytest.mark.slow, pytest.mark.backends("postgresql"), pytest.mark.usefixtures("store_backend")]

WORKFLOW = """
name: wait-and-copy
params:
  src: {type: string, required: true}
  dst: {type: string, required: true}
  seconds: {type: number, default: 0}
steps:
  - name: wait
    action: util.sleep
    with: {seconds: "{{ seconds }}"}
  - name: copy
    action: file.copy
    with: {src: "{{ src }}", dst: "{{ dst }}"}
"""


class Appliance:
    """One appliance's worker: its configuration, its process and its log."""

    def __init__(
        self,
        root: Path,
        name: str,
        workflows: Path,
        *,
        poll_interval: float,
        lease_seconds: int,
        task_poll_interval: float,
    ) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.config = self.dir / "imaging.yaml"
        settings = stores.with_store(
            {
                "state_dir": str(self.dir / "state"),
                "workflows": {"extra_dirs": [str(workflows)]},
                "worker": {
                    "concurrency": 2,
                    "poll_interval": poll_interval,
                    "lease_seconds": lease_seconds,
                    "task_poll_interval": task_poll_interval,
                },
            }
        )
        self.config.write_text(json.dumps(settings))
        self.log = self.dir / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "-v", "--config", str(self.config), "worker"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def heartbeat(self) -> dict[str, object]:
        path = self.dir / "state" / "worker.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop_process(self.proc)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Path, list[Appliance]]]:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "wait-and-copy.yaml").write_text(WORKFLOW)
    made: list[Appliance] = []
    yield workflows, made
    for appliance in made:
        appliance.stop()


@pytest.fixture
def submitter(tmp_path: Path) -> Iterator[Engine]:
    """Submits tasks and reads the shared store as a third party (the API of any appliance would)."""
    workflows = tmp_path / "workflows"
    cfg = stores.config(
        {"state_dir": str(tmp_path / "submitter"), "workflows": {"extra_dirs": [str(workflows)]}}
    )
    engine = Engine(cfg)
    yield engine
    engine.close()


def _appliance(fleet: tuple[Path, list[Appliance]], tmp_path: Path, name: str, **kw: float) -> Appliance:
    workflows, made = fleet
    appliance = Appliance(
        tmp_path,
        name,
        workflows,
        poll_interval=kw.get("poll", 0.2),
        lease_seconds=int(kw.get("lease", 10)),
        task_poll_interval=kw.get("task_poll", 0.3),
    )
    made.append(appliance)
    return appliance


def _completed_events(store: Store, task_id: str) -> int:
    return sum(
        1 for e in store.events(task_id=task_id) if e.kind == "task.state" and e.data["state"] == "completed"
    )


def test_a_new_task_is_claimed_on_its_doorbell_without_waiting_for_the_poll(
    fleet: tuple[Path, list[Appliance]], submitter: Engine, tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4096))
    a = _appliance(fleet, tmp_path, "a", poll=3600)  # the timer alone would wait an hour
    a.start()
    wait_until(lambda: a.heartbeat().get("status") == "ok", what="the worker's first poll")
    task_id = submitter.submit("wait-and-copy", {"src": str(src), "dst": str(tmp_path / "dst.bin")})
    wait_until(lambda: submitter.store.get_task(task_id).state is TaskState.COMPLETED, what="the task done")
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()


def test_two_appliances_claim_disjoint_tasks_and_run_each_once(
    fleet: tuple[Path, list[Appliance]], submitter: Engine, tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4096))
    ids = [
        submitter.submit("wait-and-copy", {"src": str(src), "dst": str(tmp_path / f"dst{i}"), "seconds": 0.5})
        for i in range(8)
    ]
    appliances = [_appliance(fleet, tmp_path, name) for name in ("a", "b")]
    for appliance in appliances:
        appliance.start()
    store = submitter.store
    wait_until(
        lambda: all(store.get_task(t).state is TaskState.COMPLETED for t in ids), what="all tasks done"
    )
    for task_id in ids:
        task = store.get_task(task_id)
        claims = [e for e in store.events(task_id=task_id) if e.kind == "task.claimed"]
        assert (task.attempts, task.epoch, len(claims), _completed_events(store, task_id)) == (1, 1, 1, 1)
    owners = {e.data["owner"] for t in ids for e in store.events(task_id=t) if e.kind == "task.claimed"}
    assert owners <= {f"{os.uname().nodename}:{a.proc.pid}" for a in appliances if a.proc is not None}


def test_a_stopped_owner_loses_its_task_to_another_appliance_and_can_change_nothing_after(
    fleet: tuple[Path, list[Appliance]], submitter: Engine, tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1 << 20))
    dst = tmp_path / "dst.bin"
    store = submitter.store
    a = _appliance(fleet, tmp_path, "a", lease=3)
    a.start()
    task_id = submitter.submit("wait-and-copy", {"src": str(src), "dst": str(dst), "seconds": 6})
    wait_until(
        lambda: any(s.name == "wait" and str(s.state) == "running" for s in store.step_results(task_id)),
        what="the wait step running on appliance a",
    )
    owner = store.get_task(task_id).owner
    assert a.proc is not None and owner is not None
    child = int(owner.rpartition(":")[2])
    assert child != a.proc.pid  # the task's own process holds the lease
    # appliance a freezes (its worker and the task's process group) past its lease
    os.kill(a.proc.pid, signal.SIGSTOP)
    os.killpg(child, signal.SIGSTOP)
    try:
        b = _appliance(fleet, tmp_path, "b", lease=3)
        b.start()
        wait_until(lambda: store.get_task(task_id).epoch == 2, what="appliance b taking the task over")
        wait_until(lambda: store.get_task(task_id).state is TaskState.COMPLETED, what="the task done on b")
    finally:
        os.killpg(child, signal.SIGCONT)
        os.kill(a.proc.pid, signal.SIGCONT)
    # the woken owner finds the task gone, stops at once and writes nothing
    wait_until(lambda: not pid_alive(child), what="the former owner's task process to stop")
    task = store.get_task(task_id)
    assert task.state is TaskState.COMPLETED and task.epoch == 2 and task.owner != owner
    assert _completed_events(store, task_id) == 1
    takeovers = [e.data for e in store.events(task_id=task_id) if e.kind == "task.takeover"]
    assert takeovers == [{"owner": task.owner, "previous_owner": owner, "previous_epoch": 1, "epoch": 2}]
    assert dst.read_bytes() == src.read_bytes()
    steps = {s.name: str(s.state) for s in store.step_results(task_id)}
    assert steps == {"wait": "completed", "copy": "completed"}
    wait_until(lambda: "another worker owns it now" in a.log.read_text(), what="the former owner's refusal")


def test_a_cancel_through_another_appliance_reaches_the_running_task(
    fleet: tuple[Path, list[Appliance]], submitter: Engine, tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    # a's task process looks at the store only when signalled (its own poll, and the lease renewal
    # that also reads the task, come after an hour): the cancel can reach it in time only through
    # the doorbell, a's worker passing it on
    a = _appliance(fleet, tmp_path, "a", task_poll=3600, lease=3600)
    a.start()
    b = _appliance(fleet, tmp_path, "b", poll=3600)  # b's worker claims nothing meanwhile
    task_id = submitter.submit(
        "wait-and-copy", {"src": str(src), "dst": str(tmp_path / "d"), "seconds": 3600}
    )
    store = submitter.store
    # the step runs once the task process handles SIGUSR2 (a signal before then would be lost)
    wait_until(
        lambda: any(s.name == "wait" and str(s.state) == "running" for s in store.step_results(task_id)),
        what="the wait step running on a",
    )
    with Store(config_mod.load(b.config).store) as through_b:
        through_b.request_cancel(task_id, "from appliance b")
    wait_until(lambda: store.get_task(task_id).state is TaskState.CANCELLED, timeout=10, what="cancelled")
    assert store.get_task(task_id).cancel_reason == "from appliance b"
    log = a.log.read_text()
    assert "cancel requested; telling its process" in log  # the doorbell reached a's worker
    assert "resuming because" not in log  # and its task process took it, not an orphan recovery
