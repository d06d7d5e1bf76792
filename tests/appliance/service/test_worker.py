"""The task worker as a real process: claiming, concurrency, cancel, shutdown, crash recovery, health."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.pids import pid_alive
from appliance.store import Store, TaskState
from appliance.workflow.engine import Engine
from tests import confinement, processes, stores

# this module's waits are bounded at 30 s unless a call says otherwise
wait_until = functools.partial(processes.wait_until, timeout=30.0)
stop = processes.stop_process

pytestmark = pytest.mark.slow

WORKFLOW = """
name: count-and-wait
params:
  marker: {type: string, required: true}
  seconds: {type: number, default: 30}
steps:
  - name: count
    action: util.echo
    with: {message: "{{ marker }}"}
  - name: mark
    action: file.copy
    with: {src: "{{ marker }}.src", dst: "{{ marker }}.{{ task.id }}"}
  - name: wait
    action: util.sleep
    with: {seconds: "{{ seconds }}"}
"""


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    wf_dir = tmp_path / "workflows"
    wf_dir.mkdir()
    (wf_dir / "count-and-wait.yaml").write_text(WORKFLOW)
    f = tmp_path / "imaging.yaml"
    f.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"workflows: {{extra_dirs: [{wf_dir}]}}\n"
        "worker: {concurrency: 2, poll_interval: 0.2}\n"
        "tasks: {lease_seconds: 5}\n"
        + (f"store: {json.dumps(stores.settings())}\n" if stores.settings() else "")
        + ("targets: {volume: {type: file, shared: true}}\n" if stores.settings() else "")
    )
    (tmp_path / "m.src").write_text("x")
    return f


@pytest.fixture
def engine(cfg_file: Path) -> Iterator[Engine]:
    cfg = config_mod.load(cfg_file)
    eng = Engine(cfg)
    yield eng
    eng.store.close()


def start_worker(cfg_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "--config", str(cfg_file), "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def state(store: Store, task_id: str) -> TaskState:
    return store.get_task(task_id).state


def step_state(store: Store, task_id: str, name: str) -> str | None:
    for s in store.step_results(task_id):
        if s.name == name:
            return str(s.state)
    return None


def test_runs_pending_tasks_never_more_than_concurrency(
    engine: Engine, cfg_file: Path, tmp_path: Path
) -> None:
    ids = [engine.submit("count-and-wait", {"marker": str(tmp_path / "m"), "seconds": 1.5}) for _ in range(4)]
    worker = start_worker(cfg_file)
    try:
        peak = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [state(engine.store, i) for i in ids]
            peak = max(peak, sum(s is TaskState.RUNNING for s in states))
            if all(s is TaskState.COMPLETED for s in states):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"tasks did not complete: {states}")
    finally:
        stop(worker)
    assert peak == 2
    beat = json.loads((tmp_path / "state" / "worker.json").read_text())
    assert beat["status"] == "stopped" and beat["concurrency"] == 2


def test_cancel_interrupts_the_running_step_and_its_child_exits(
    engine: Engine, cfg_file: Path, tmp_path: Path
) -> None:
    # The wait step would sleep for an hour: the task can only end within the wait below if the
    # cancel interrupts it (speed is measured in bench/, not asserted here).
    task_id = engine.submit("count-and-wait", {"marker": str(tmp_path / "m"), "seconds": 3600})
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: step_state(engine.store, task_id, "wait") == "running", what="the wait step")
        owner = engine.store.get_task(task_id).owner
        assert owner is not None
        child = int(owner.rpartition(":")[2])
        assert pid_alive(child)
        engine.store.request_cancel(task_id, reason="operator said so")
        wait_until(lambda: state(engine.store, task_id) is TaskState.CANCELLED, timeout=10, what="cancelled")
        wait_until(lambda: not pid_alive(child), timeout=10, what="the task's child process to exit")
    finally:
        stop(worker)
    task = engine.store.get_task(task_id)
    assert task.cancel_reason == "operator said so"
    assert step_state(engine.store, task_id, "wait") != "completed"  # interrupted, not waited out
    assert not (tmp_path / f"m.{task_id}").exists()  # the copy step was undone


def test_sigterm_suspends_tasks_and_a_new_worker_resumes_them(
    engine: Engine, cfg_file: Path, tmp_path: Path
) -> None:
    task_id = engine.submit("count-and-wait", {"marker": str(tmp_path / "m"), "seconds": 3})
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: step_state(engine.store, task_id, "wait") == "running", what="the wait step")
    finally:
        stop(worker, signal.SIGTERM)
    task = engine.store.get_task(task_id)
    assert task.state is TaskState.RUNNING and task.owner is None  # suspended, not cancelled
    assert (tmp_path / f"m.{task_id}").exists()  # nothing was undone
    worker = start_worker(cfg_file)
    try:
        wait_until(
            lambda: state(engine.store, task_id) is TaskState.COMPLETED, timeout=60, what="resumed task"
        )
    finally:
        stop(worker)
    steps = {s.name: s for s in engine.store.step_results(task_id)}
    assert steps["mark"].attempts == 1  # the completed copy was not re-run


def test_killed_worker_and_task_are_recovered_after_restart(
    engine: Engine, cfg_file: Path, tmp_path: Path
) -> None:
    task_id = engine.submit("count-and-wait", {"marker": str(tmp_path / "m"), "seconds": 2})
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: step_state(engine.store, task_id, "wait") == "running", what="the wait step")
        owner_pid = int(engine.store.get_task(task_id).owner.rpartition(":")[2])
        os.kill(owner_pid, signal.SIGKILL)  # the task's process dies mid-step
    finally:
        stop(worker, signal.SIGKILL)
    assert engine.store.get_task(task_id).state is TaskState.RUNNING
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: state(engine.store, task_id) is TaskState.COMPLETED, timeout=60, what="recovery")
    finally:
        stop(worker)
    assert engine.store.get_task(task_id).attempts == 2


def test_without_qemu_img_the_worker_is_disabled_and_claims_nothing(
    engine: Engine, cfg_file: Path, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = dict(os.environ, PATH=str(bin_dir))  # python is started by absolute path; no qemu-img on PATH
    task_id = engine.submit("count-and-wait", {"marker": str(tmp_path / "m"), "seconds": 0})
    worker = start_worker(cfg_file, env=env)
    beat_file = tmp_path / "state" / "worker.json"
    try:
        wait_until(beat_file.exists, what="a heartbeat")
        time.sleep(1.0)  # several polls
        beat = json.loads(beat_file.read_text())
    finally:
        stop(worker)
    assert beat["status"] == "disabled"
    assert "qemu-img is not installed" in beat["reason"]
    assert state(engine.store, task_id) is TaskState.PENDING


def test_a_mount_record_the_sweep_cannot_process_does_not_stop_tasks_being_claimed(
    engine: Engine, cfg_file: Path, tmp_path: Path
) -> None:
    # a crash leftover whose lock cannot be opened (here a directory; in production e.g. a root-owned
    # lock after the worker dropped privileges) makes every sweep raise
    mounts = tmp_path / "state" / "mounts"
    mounts.mkdir(parents=True)
    (mounts / "x.json").write_text(json.dumps({"owner": "x", "pid": 1, "mounts": []}))
    (mounts / "x.lock").mkdir()
    task_id = engine.submit("count-and-wait", {"marker": str(tmp_path / "m"), "seconds": 0})
    worker = start_worker(cfg_file)
    try:
        wait_until(lambda: state(engine.store, task_id) is TaskState.COMPLETED, what="the task to complete")
        beat = json.loads((tmp_path / "state" / "worker.json").read_text())
    finally:
        stop(worker)
    assert beat["status"] == "ok"
    assert (mounts / "x.json").exists()  # left for an operator (or a later sweep) to deal with


def random_qcow2(directory: Path, mib: int) -> Path:
    """A qcow2 full of incompressible data: ~6 s of CPU to convert 256 MiB to a stream-optimized VMDK."""
    raw = directory / "random.raw"
    with open(raw, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    path = directory / "random.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    raw.unlink()
    return path


def test_a_task_child_killed_alone_leaves_no_guest_probe_or_qemu_img_behind(
    engine: Engine, cfg_file: Path, tmp_path: Path
) -> None:
    src = random_qcow2(tmp_path, 256)
    params = {
        "source": str(src),
        "target": str(tmp_path / "out.vmdk"),
        "format": "vmdk",
        "validate_guest": "data",
    }
    engine.submit("convert-image", params)
    worker = start_worker(cfg_file)
    killed: list[str] = []
    try:
        # first the guest probe of the validation step; then, once the worker resumed the task, qemu-img
        for what, match in (
            ("the guest probe", confinement.is_python_module("appliance.guest.probe")),
            ("qemu-img convert", confinement.is_tool("qemu-img", "convert")),
        ):
            pid = confinement.find_descendant(match, root=worker.pid, timeout=120)
            task_child = confinement.parent(pid)
            assert task_child is not None and "appliance.service.worker" in confinement.cmdline(task_child)
            with confinement.stop(pid):  # hold it mid-work, then kill its task child alone
                os.kill(task_child, signal.SIGKILL)
                wait_until(lambda p=pid: confinement.gone(p), what=f"{what} to die with its task child")
            killed.append(what)
    finally:
        stop(worker)
    assert killed == ["the guest probe", "qemu-img convert"]
