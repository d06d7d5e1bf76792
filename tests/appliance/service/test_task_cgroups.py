"""Per-task cgroups on this host (appliance.service.taskcgroup), with a real worker and real task children.

The caps themselves (cpu.max, io.max, io.weight, memory.max) need the cpu/io/memory controllers in
cgroup v2, which this test host may not have (a hybrid v1/v2 container): they are checked in the booted
appliance image (tests/image/test_appliance_limits.py). Here: what the worker says where it cannot
enforce them, and the part that needs no controller — each task child in a cgroup of its own, reaped
with everything in it — in a cgroup this test creates and delegates to the worker.
"""

from __future__ import annotations

import contextlib
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
from appliance.service import health, taskcgroup
from appliance.service.taskcgroup import TaskCaps
from appliance.store import TaskState
from appliance.workflow.engine import Engine
from tests import confinement, processes

wait_until = functools.partial(processes.wait_until, timeout=60.0)
stop = processes.stop_process

pytestmark = pytest.mark.slow

CAPS = {
    "task_cpu_quota": "50%",
    "task_io_weight": 200,
    "task_io_write_bandwidth": "20MiB",
    "task_memory_max": "1GiB",
}

LEAVES_A_PROCESS = """
name: leave-a-process
steps:
  - name: leave
    action: run
    with: {command: ["/bin/sleep", "1001"], timeout: 600}
"""


def write_config(tmp_path: Path, worker: dict[str, object] | None = None) -> Path:
    wf_dir = tmp_path / "workflows"
    wf_dir.mkdir(exist_ok=True)
    (wf_dir / "leave-a-process.yaml").write_text(LEAVES_A_PROCESS)
    cfg = {
        "state_dir": str(tmp_path / "state"),
        "workflows": {"extra_dirs": [str(wf_dir)]},
        "worker": {"concurrency": 1, "poll_interval": 0.2, **(worker or {})},
        "tasks": {"lease_seconds": 5},
    }
    path = tmp_path / "imaging.yaml"
    path.write_text(json.dumps(cfg))
    return path


def worker_argv(cfg_file: Path) -> list[str]:
    return [sys.executable, "-m", "appliance.cli", "--config", str(cfg_file), "worker"]


def heartbeat(cfg: config_mod.Config) -> dict | None:
    try:
        return json.loads((cfg.state_dir / "worker.json").read_text())
    except (OSError, ValueError):
        return None


def test_cpu_quota_and_io_weight_are_mapped_as_systemd_maps_them() -> None:
    assert taskcgroup.cpu_max("50%") == "50000 100000"
    assert taskcgroup.cpu_max("250%") == "250000 100000"
    # IOWeight 1..10000 (default 100) → BFQ 1..1000 (default 100)
    assert [taskcgroup.bfq_weight(w) for w in (1, 100, 10000)] == [1, 100, 1000]
    caps = TaskCaps.from_config(config_mod.from_dict({"worker": CAPS}).worker)
    assert caps.controllers() == {"cpu", "io", "memory"}
    assert caps.settings() == {
        "worker.task_cpu_quota": "50%",
        "worker.task_io_weight": 200,
        "worker.task_io_write_bandwidth": 20 << 20,
        "worker.task_memory_max": 1 << 30,
    }
    assert not TaskCaps.from_config(config_mod.from_dict({}).worker)


def test_caps_below_their_minimum_are_configuration_errors() -> None:
    with pytest.raises(config_mod.ConfigError, match=r"worker\.task_memory_max"):
        config_mod.from_dict({"worker": {"task_memory_max": "1MiB"}})
    with pytest.raises(config_mod.ConfigError, match=r"worker\.task_io_read_bandwidth"):
        config_mod.from_dict({"worker": {"task_io_read_bandwidth": 0}})


def test_a_worker_that_cannot_enforce_configured_caps_says_why_and_health_is_degraded(tmp_path: Path) -> None:
    # the test runs among other processes in its cgroup: the worker it starts has no cgroup of its own
    cfg_file = write_config(tmp_path, CAPS)
    cfg = config_mod.load(cfg_file)
    worker = subprocess.Popen(worker_argv(cfg_file), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (heartbeat(cfg) or {}).get("status") == "ok", what="the worker's heartbeat")
    finally:
        stop(worker)
    beat = heartbeat(cfg)
    assert beat is not None
    limits = beat["task_limits"]
    assert limits["caps"] == TaskCaps.from_config(cfg.worker).settings()
    assert limits["enforced"] is False and limits["cgroup"] is None
    assert limits["reason"], limits
    # health turns it into a warning naming the caps and the reason: degraded, not silently accepted
    check = health.check_task_limits(cfg)
    assert check["status"] == health.WARN
    assert "worker.task_cpu_quota" in check["reason"] and limits["reason"] in check["reason"]
    assert health.overall({"task_limits": check})[0] == health.DEGRADED
    worker_log = worker.stderr.read().decode() if worker.stderr else ""
    assert "are not enforced" in worker_log


def test_without_caps_the_task_limits_check_passes(tmp_path: Path) -> None:
    cfg = config_mod.load(write_config(tmp_path))
    worker = subprocess.Popen(worker_argv(write_config(tmp_path)), stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: (heartbeat(cfg) or {}).get("status") == "ok", what="the worker's heartbeat")
    finally:
        stop(worker)
    assert health.check_task_limits(cfg)["status"] == health.PASS


def test_config_validate_warns_about_caps_this_host_cannot_enforce(tmp_path: Path) -> None:
    cfg_file = write_config(tmp_path, CAPS)
    problems = taskcgroup.host_problems(TaskCaps.from_config(config_mod.load(cfg_file).worker))
    if not problems:
        pytest.skip("this host has cgroup v2 with the cpu, io and memory controllers and BFQ disks")
    out = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "--config", str(cfg_file), "config", "validate"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, (
        out.stderr
    )  # valid: the caps are checked, the warning says what is not enforced
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("imaging: warning: ")]
    assert warnings == [f"imaging: warning: {p}" for p in problems]
    assert any("task_cpu_quota" in w for w in warnings)


# ------------------------------------------------------------------------ a cgroup delegated to the worker


@pytest.fixture
def delegated(tmp_path: Path) -> Iterator[Path]:
    """A new cgroup v2 for the worker alone (as systemd's Delegate= gives it), removed afterwards."""
    mount = taskcgroup.unified_mount()
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy here (tests run as root in a container or VM)")
    path = mount / f"imaging-test-{os.getpid()}-{tmp_path.name}"
    path.mkdir()
    try:
        yield path
    finally:
        for leaf in sorted(path.glob("*/"), reverse=True):
            for pid in taskcgroup.processes(leaf):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_until(lambda leaf=leaf: not taskcgroup.processes(leaf), what=f"{leaf} to empty")
            leaf.rmdir()
        path.rmdir()


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"no cgroup v2 line for {pid}")


def test_each_task_child_runs_in_a_cgroup_of_its_own_which_is_reaped_with_everything_in_it(
    tmp_path: Path, delegated: Path
) -> None:
    cfg_file = write_config(tmp_path)
    cfg = config_mod.load(cfg_file)
    engine = Engine(cfg)
    task_id = engine.submit("leave-a-process", {})
    mount = taskcgroup.unified_mount()
    assert mount is not None
    rel = "/" + str(delegated.relative_to(mount))
    # the worker starts in the delegated cgroup, as systemd starts a unit with Delegate=
    worker = subprocess.Popen(
        ["/bin/sh", "-c", f'echo $$ > "{delegated}/cgroup.procs" && exec "$@"', "sh", *worker_argv(cfg_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        sleeper = confinement.find_descendant(lambda argv: argv == ["/bin/sleep", "1001"], root=worker.pid)
        task_child = confinement.parent(sleeper)
        assert task_child is not None and "appliance.service.worker" in confinement.cmdline(task_child)
        task_cgroup = f"{rel}/task-{task_id}"
        # the worker moved itself into a leaf; the task child and what it started are in the task's cgroup
        assert cgroup_of(worker.pid) == f"{rel}/worker"
        assert cgroup_of(task_child) == task_cgroup and cgroup_of(sleeper) == task_cgroup
        beat = heartbeat(cfg)
        assert beat is not None and beat["task_limits"]["cgroup"] == str(delegated)
        assert beat["task_limits"]["reason"] is None
        # the run step's command has a process group of its own and no parent-death signal: only the
        # cgroup takes it down when its task child is killed alone
        assert os.getpgid(sleeper) != os.getpgid(task_child)
        os.kill(task_child, signal.SIGKILL)
        wait_until(lambda: confinement.gone(sleeper), what="the task's leftover process to be killed")
        # the worker resumes the orphaned task at once, in a fresh cgroup of the same name
        resumed = confinement.find_descendant(
            lambda argv: argv == ["/bin/sleep", "1001"], root=worker.pid, timeout=60
        )
        assert resumed != sleeper and cgroup_of(resumed) == task_cgroup
        assert sorted(taskcgroup.processes(delegated / f"task-{task_id}")) == sorted(
            [confinement.parent(resumed), resumed]
        )
        engine.store.request_cancel(task_id, reason="test over")
        wait_until(lambda: engine.store.get_task(task_id).state is TaskState.CANCELLED, what="the cancel")
        wait_until(lambda: not (delegated / f"task-{task_id}").exists(), what="the task's cgroup to go")
    finally:
        stop(worker)
        engine.store.close()
    assert [p.name for p in delegated.iterdir() if p.is_dir()] == ["worker"]
