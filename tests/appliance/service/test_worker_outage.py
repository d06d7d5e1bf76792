"""`imaging worker` with its tasks in PostgreSQL while the server goes away (a real ``pg_ctl stop``)
and comes back: the worker keeps running and claims nothing, says so, and no task is lost — one
whose step outlasts the outage carries on, one whose step ended during it resumes.

The server here is the module's own (the tests stop it), with synchronous commits.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance.service.heartbeat import read_heartbeat
from appliance.store import Store, TaskState
from appliance.workflow.engine import Engine
from tests import processes
from tests.postgres import Cluster, postgres_cluster

wait_until = functools.partial(processes.wait_until, timeout=60.0)

pytestmark = [pytest.mark.slow, pytest.mark.backends("postgresql")]

#: a step that waits for a file, reporting progress all the while (progress must not stop it)
WAIT_PLUGIN = """
import os

from appliance.workflow.step import Step


class WaitForFile(Step):
    schema = {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}}

    def run(self, ctx, path):
        open(path + ".waiting", "w").close()
        n = 0
        while not os.path.exists(path):
            n += 1
            ctx.progress({"phase": "wait", "percent": min(99.0, n / 10)})
            with open(path + ".ticks", "w") as ticks:  # progress reported, and the step went on
                ticks.write(str(n))
            ctx.sleep(0.1)
        return {"waited_for": path}


STEPS = {"site.wait_for_file": WaitForFile}
"""

WORKFLOW = {
    "name": "wait-in-the-middle",
    "params": {"gate": {"type": "string", "required": True}},
    "steps": [
        {"name": "before", "action": "util.echo", "with": {"message": "before"}},
        {"name": "wait", "action": "site.wait_for_file", "with": {"path": "{{ gate }}"}},
        {"name": "after", "action": "util.echo", "with": {"message": "after"}},
    ],
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with postgres_cluster(synchronous_commit=True) as c:
        yield c


@pytest.fixture
def config_file(tmp_path: Path, cluster: Cluster) -> Iterator[Path]:
    schema = cluster.create_schema()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "wait.py").write_text(WAIT_PLUGIN)
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "wait-in-the-middle.yaml").write_text(yaml.safe_dump(WORKFLOW))
    path = tmp_path / "imaging.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "state"),
                "workflows": {"extra_dirs": [str(tmp_path / "workflows")]},
                "hooks": {"plugins_dir": str(tmp_path / "plugins")},
                "worker": {"concurrency": 2, "poll_interval": 0.2},
                "tasks": {"lease_seconds": 5},
                "store": {"url": cluster.schema_url(schema), "connect_timeout": 2},
                "targets": {
                    "volume": {"type": "file", "shared": True}
                },  # a fleet's volumes: on one machine here
            }
        )
    )
    try:
        yield path
    finally:
        if not cluster.running():
            cluster.start()
        cluster.drop_schema(schema)


@pytest.fixture
def worker(config_file: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "--config", str(config_file), "worker"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        processes.stop_process(proc)


def heartbeat(config: config_mod.Config) -> dict[str, Any]:
    return read_heartbeat(config) or {}


def submit(config: config_mod.Config, gate: Path) -> str:
    engine = Engine(config)
    try:
        return engine.submit("wait-in-the-middle", {"gate": str(gate)})
    finally:
        engine.close()


def starts(store: Store, task_id: str) -> dict[str, int]:
    """How many times each step of the task started (its ``step.start`` events)."""
    counted: dict[str, int] = {}
    for event in store.events(task_id=task_id):
        if event.kind == "step.start":
            counted[event.data["name"]] = counted.get(event.data["name"], 0) + 1
    return counted


def test_a_task_whose_step_outlasts_the_outage_carries_on(
    cluster: Cluster, config_file: Path, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    config = config_mod.load(config_file)
    gate = tmp_path / "gate"
    task_id = submit(config, gate)
    wait_until(lambda: Path(f"{gate}.waiting").exists(), what="the task to reach its waiting step")

    cluster.stop()
    wait_until(
        lambda: heartbeat(config).get("status") == "degraded",
        what="the worker to say the task database is unreachable",
    )
    assert "task database unreachable" in heartbeat(config)["reason"]
    # the step reports progress ten times a second (written at most every 0.5 s): 20 more reports
    # span several writes that fail, and the step goes on regardless
    ticks = Path(f"{gate}.ticks")
    seen = int(ticks.read_text())
    wait_until(lambda: int(ticks.read_text() or 0) >= seen + 20, what="the step to go on reporting progress")
    assert heartbeat(config)["running"] == [task_id]  # its task's process goes on
    assert worker.poll() is None

    cluster.start()
    wait_until(lambda: heartbeat(config).get("status") == "ok", what="the worker to reach the database again")
    gate.touch()
    with Store(config.store) as store:
        wait_until(lambda: store.get_task(task_id).state.terminal, what="the task to end")
        task = store.get_task(task_id)
        assert task.state is TaskState.COMPLETED, task.error_message
        kinds = [e.kind for e in store.events(task_id=task_id)]
        assert "task.resumed" not in kinds  # it never stopped
        assert starts(store, task_id) == {"before": 1, "wait": 1, "after": 1}
    assert worker.poll() is None


def test_a_task_whose_step_ends_during_the_outage_resumes_from_that_step(
    cluster: Cluster, config_file: Path, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    config = config_mod.load(config_file)
    gate = tmp_path / "gate"
    task_id = submit(config, gate)
    wait_until(lambda: Path(f"{gate}.waiting").exists(), what="the task to reach its waiting step")
    # a second task arrives just before the outage: it must not be lost either
    later = submit(config, tmp_path / "later-gate")
    (tmp_path / "later-gate").touch()

    cluster.stop()
    wait_until(lambda: heartbeat(config).get("status") == "degraded", what="the worker to notice")
    gate.touch()  # the step ends; its end cannot be recorded
    wait_until(
        lambda: task_id not in heartbeat(config).get("running", [task_id]),
        what="the task's process to stop, its task left as it was",
    )
    assert worker.poll() is None

    cluster.start()
    with Store(config.store) as store:
        wait_until(
            lambda: store.get_task(task_id).state.terminal and store.get_task(later).state.terminal,
            what="both tasks to end",
        )
        for tid in (task_id, later):
            task = store.get_task(tid)
            assert task.state is TaskState.COMPLETED, task.error_message
        resumed = [e for e in store.events(task_id=task_id) if e.kind == "task.resumed"]
        assert len(resumed) == 1
        # the completed step was not run again; the interrupted one was
        assert starts(store, task_id) == {"before": 1, "wait": 2, "after": 1}
        assert store.get_task(task_id).attempts == 2
