"""The ``run`` action through the real engine: local and chroot commands, output, failures, timeouts."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.store import StepState, Store, Task, TaskState
from appliance.workflow import Engine
from tests.guestfactory import (
    OS_RELEASE,
    debugfs_cat,
    linux_disk,
    loops_of,
    mounts_below,
    partition_offset,
    require_loop_root,
)

from ..workflow.support import make_config, make_registry, step_state, wait_until, write_workflow


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = Engine(make_config(tmp_path), registry=make_registry(), poll_interval=0.05)
    yield e
    e.store.close()


def run_step(engine: Engine, tmp_path: Path, args: dict[str, Any]) -> Task:
    write_workflow(tmp_path, "w", {"steps": [{"name": "r", "action": "run", "with": args, "register": "r"}]})
    return engine.run(engine.submit("w"))


def output_lines(engine: Engine, task: Task, stream: str | None = None) -> list[str]:
    return [
        line
        for e in engine.store.events(task_id=task.id)
        if e.kind == "run.output" and (stream is None or e.data["stream"] == stream)
        for line in e.data["lines"]
    ]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_local_command_output_becomes_events_and_runs_in_the_task_workdir(
    engine: Engine, tmp_path: Path
) -> None:
    task = run_step(engine, tmp_path, {"command": "echo one; echo two >&2; pwd; echo three"})
    assert task.state is TaskState.COMPLETED, task.error_message
    workdir = str(Path(engine.config.scratch.root) / task.id)
    assert output_lines(engine, task, "stdout") == ["one", workdir, "three"]
    assert output_lines(engine, task, "stderr") == ["two"]
    result = task.result["r"]
    assert result["exit_code"] == 0 and result["where"] == "local"
    assert result["stdout_tail"] == f"one\n{workdir}\nthree"
    assert result["duration"] >= 0 and result["truncated"] is False


def test_argv_list_is_not_run_through_a_shell(engine: Engine, tmp_path: Path) -> None:
    task = run_step(engine, tmp_path, {"command": ["echo", "$HOME; rm -rf /nonexistent"]})
    assert task.state is TaskState.COMPLETED
    assert output_lines(engine, task) == ["$HOME; rm -rf /nonexistent"]


def test_failing_command_gives_run_failed_with_exit_code_and_last_lines(
    engine: Engine, tmp_path: Path
) -> None:
    task = run_step(engine, tmp_path, {"command": "echo checking; echo 'virus found' >&2; exit 3"})
    assert (task.state, task.error_code) == (TaskState.FAILED, "Run.Failed")
    assert "status 3" in task.error_message and "virus found" in task.error_message


def test_ok_codes_accept_a_nonzero_exit(engine: Engine, tmp_path: Path) -> None:
    task = run_step(engine, tmp_path, {"command": "exit 1", "ok_codes": [0, 1]})
    assert task.state is TaskState.COMPLETED and task.result["r"]["exit_code"] == 1


def test_missing_program_fails_with_run_failed(engine: Engine, tmp_path: Path) -> None:
    task = run_step(engine, tmp_path, {"command": ["/nonexistent/scanner"]})
    assert (task.state, task.error_code) == (TaskState.FAILED, "Run.Failed")
    assert "/nonexistent/scanner" in task.error_message


def test_environment_is_minimal_plus_what_the_step_gives(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    task = run_step(engine, tmp_path, {"command": "env", "env": {"SCAN_MODE": "fast"}})
    lines = output_lines(engine, task)
    assert "SCAN_MODE=fast" in lines and "LANG=C" in lines
    assert not any("worker-secret" in line for line in lines)


def test_output_beyond_max_output_is_truncated_with_a_note(engine: Engine, tmp_path: Path) -> None:
    task = run_step(engine, tmp_path, {"command": "seq 1 5000", "max_output": 1000})
    assert task.state is TaskState.COMPLETED
    lines = output_lines(engine, task)
    assert sum(len(line) + 1 for line in lines) <= 1000 and lines[0] == "1"
    notes = [e.data for e in engine.store.events(task_id=task.id) if e.data.get("truncated")]
    assert len(notes) == 1 and "max_output" in notes[0]["note"]
    assert task.result["r"]["truncated"] is True
    assert task.result["r"]["stdout_tail"].endswith("4999\n5000")  # the tail is still the real end


def test_timeout_kills_the_whole_process_group(engine: Engine, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    task = run_step(
        engine, tmp_path, {"command": f"sleep 300 & echo $! > {pidfile}; echo started; wait", "timeout": 1}
    )
    assert (task.state, task.error_code) == (TaskState.FAILED, "Run.Timeout")
    assert "started" in task.error_message
    child = int(pidfile.read_text())
    wait_until(lambda: gone(child), 5, "the background sleep to be killed")


def test_cancel_kills_the_command_promptly(engine: Engine, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    write_workflow(
        tmp_path,
        "w",
        {
            "steps": [
                {"name": "r", "action": "run", "with": {"command": f"echo $$ > {pidfile}; exec sleep 300"}}
            ]
        },
    )
    task_id = engine.submit("w")

    def cancel_when_running() -> None:
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 30, "the command to start")
        with Store(engine.config.store) as other:
            other.request_cancel(task_id)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    task = engine.run(task_id)
    canceller.join(timeout=30)
    assert task.state is TaskState.CANCELLED
    assert gone(int(pidfile.read_text()))
    assert step_state(engine.store, task_id, "1") is not StepState.COMPLETED


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    require_loop_root()
    return linux_disk(tmp_path, separate_boot=True, programs=True)


def test_chroot_command_sees_the_guests_os_release(engine: Engine, tmp_path: Path, disk: Path) -> None:
    image = {"path": str(disk), "format": "raw"}
    task = run_step(
        engine, tmp_path, {"command": ["/bin/cat", "/etc/os-release"], "where": "chroot", "image": image}
    )
    assert task.state is TaskState.COMPLETED, task.error_message
    assert "\n".join(output_lines(engine, task)) + "\n" == OS_RELEASE
    assert task.result["r"]["where"] == "chroot"
    ledger = [(e.action, e.resource) for e in engine.store.ledger(task.id)]
    created = [r for a, r in ledger if a == "created"]
    assert any(r.startswith("loop:/dev/loop") for r in created) and any(
        r.startswith("mount:") for r in created
    )
    assert sorted(r for a, r in ledger if a == "removed") == sorted(created)
    assert mounts_below(tmp_path) == [] and loops_of(disk) == ""


def test_chroot_is_read_only_unless_writable(engine: Engine, tmp_path: Path, disk: Path) -> None:
    args = {"command": "touch /etc/scanned && echo ok", "where": "chroot", "image": str(disk)}
    task = run_step(engine, tmp_path, args)
    assert (task.state, task.error_code) == (TaskState.FAILED, "Run.Failed")
    assert "Read-only file system" in task.error_message
    assert mounts_below(tmp_path) == [] and loops_of(disk) == ""


def test_chroot_cwd_and_timeout_leave_no_mounts(engine: Engine, tmp_path: Path, disk: Path) -> None:
    args = {"command": "pwd; sleep 300", "where": "chroot", "image": str(disk), "cwd": "/boot", "timeout": 1}
    task = run_step(engine, tmp_path, args)
    assert (task.state, task.error_code) == (TaskState.FAILED, "Run.Timeout")
    assert output_lines(engine, task) == ["/boot"]
    assert mounts_below(tmp_path) == [] and loops_of(disk) == ""


def test_chroot_refuses_a_non_raw_image(engine: Engine, tmp_path: Path, disk: Path) -> None:
    image = {"path": str(disk), "format": "qcow2"}
    task = run_step(engine, tmp_path, {"command": "true", "where": "chroot", "image": image})
    assert (task.state, task.error_code) == (TaskState.FAILED, "Guest.NotRaw")


def test_chroot_without_image_is_a_usage_error(engine: Engine, tmp_path: Path) -> None:
    task = run_step(engine, tmp_path, {"command": "true", "where": "chroot"})
    assert (task.state, task.error_code) == (TaskState.FAILED, "InvalidParameterValue")


def test_cancel_during_a_chroot_command_unmounts_everything(
    engine: Engine, tmp_path: Path, disk: Path
) -> None:
    write_workflow(
        tmp_path,
        "w",
        {
            "steps": [
                {
                    "name": "r",
                    "action": "run",
                    "with": {"command": "sleep 300", "where": "chroot", "image": str(disk)},
                }
            ]
        },
    )
    task_id = engine.submit("w")

    def cancel_when_running() -> None:
        wait_until(
            lambda: any(e.kind == "run.start" for e in engine.store.events(task_id=task_id)), 30, "run.start"
        )
        time.sleep(0.2)
        with Store(engine.config.store) as other:
            other.request_cancel(task_id)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    task = engine.run(task_id)
    canceller.join(timeout=30)
    assert task.state is TaskState.CANCELLED
    assert mounts_below(tmp_path) == [] and loops_of(disk) == ""
    assert not list((Path(engine.config.state_dir) / "mounts").glob("*.json"))
    assert os.path.exists(disk)


# --- the chroot sandbox: the guest's own binaries run as root, confined -----------------------------


def chroot_run(
    engine: Engine, tmp_path: Path, disk: Path, command: str, **extra: Any
) -> tuple[Task, list[str]]:
    """Run ``command`` in the guest (any exit status accepted); the task and all its output lines."""
    args = {"command": command, "where": "chroot", "image": str(disk), "ok_codes": list(range(256)), **extra}
    task = run_step(engine, tmp_path, args)
    assert task.state is TaskState.COMPLETED, task.error_message
    return task, output_lines(engine, task)


def status_fields(lines: list[str]) -> dict[str, str]:
    return {k: v.strip() for k, sep, v in (line.partition(":") for line in lines) if sep}


def test_chroot_command_cannot_read_a_host_file_through_proc_root(
    engine: Engine, tmp_path: Path, disk: Path
) -> None:
    secret = tmp_path / "host-only-secret"
    secret.write_text("s3cr3t-of-the-host\n")
    command = (
        f"cat /proc/1/root{secret}; cat /proc/$PPID/root{secret}; "
        f"for p in /proc/[0-9]*; do cat $p/root{secret} $p/cwd{secret}; done; cat {secret}; echo done"
    )
    _, lines = chroot_run(engine, tmp_path, disk, command)
    assert "done" in lines  # the command ran to its end (stdout and stderr interleave freely)
    assert any("No such file" in line for line in lines)
    assert not any("s3cr3t" in line for line in lines), lines
    assert mounts_below(tmp_path) == [] and loops_of(disk) == ""


def test_chroot_command_sees_only_the_sandboxes_processes(engine: Engine, tmp_path: Path, disk: Path) -> None:
    _, lines = chroot_run(engine, tmp_path, disk, "ls /proc")
    pids = {int(name) for name in lines if name.isdigit()}
    # pid 1 (the sandbox's init), the shell, ls: none of the host's processes
    assert 1 in pids and pids <= {1, 2, 3}, pids
    assert "self" in lines


def test_chroot_command_runs_without_any_capability_and_cannot_gain_one(
    engine: Engine, tmp_path: Path, disk: Path
) -> None:
    _, lines = chroot_run(engine, tmp_path, disk, "id -u; cat /proc/self/status")
    assert lines[0] == "0"  # root in name only
    fields = status_fields(lines)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[cap] == "0000000000000000", (cap, fields[cap])
    assert fields["NoNewPrivs"] == "1"


def test_chroot_command_has_no_network_but_loopback(engine: Engine, tmp_path: Path, disk: Path) -> None:
    _, lines = chroot_run(engine, tmp_path, disk, "cat /proc/net/dev")
    interfaces = [line.split(":")[0].strip() for line in lines[2:]]  # after the two header lines
    assert interfaces == ["lo"]


def test_chroot_proc_is_read_only(engine: Engine, tmp_path: Path, disk: Path) -> None:
    # the hostname is the sandbox's own (a new UTS namespace): a harmless knob to try writing
    _, lines = chroot_run(engine, tmp_path, disk, "echo guest > /proc/sys/kernel/hostname")
    assert any("Read-only file system" in line for line in lines), lines


def test_writable_chroot_command_writes_a_guest_file(engine: Engine, tmp_path: Path, disk: Path) -> None:
    command = "echo scanned > /etc/scan-result && cat /etc/scan-result"
    task, lines = chroot_run(engine, tmp_path, disk, command, writable=True)
    assert task.result["r"]["exit_code"] == 0 and lines == ["scanned"]
    assert debugfs_cat(disk, "/etc/scan-result", partition_offset(disk, 2)) == "scanned\n"
    assert mounts_below(tmp_path) == [] and loops_of(disk) == ""


def test_chroot_command_killed_by_a_signal_reports_the_signal(
    engine: Engine, tmp_path: Path, disk: Path
) -> None:
    # the command is not the namespace's init (which would ignore the signal): it dies as it would outside
    task = run_step(engine, tmp_path, {"command": "echo before; kill -TERM $$; echo after", "where": "chroot",
                                       "image": str(disk)})  # fmt: skip
    assert (task.state, task.error_code) == (TaskState.FAILED, "Run.Failed")
    assert "signal 15" in task.error_message
    assert output_lines(engine, task) == ["before"]
