"""The shipped utility, file and scratch steps, run through the engine."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.store import StepState, Store, Task, TaskState
from appliance.workflow import Engine
from tests.mounts import tmpfs

from ..workflow.support import make_config, make_registry, step_state, wait_until, write_workflow


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = Engine(make_config(tmp_path), registry=make_registry(), poll_interval=0.05)
    yield e
    e.store.close()


def run_steps(engine: Engine, tmp_path: Path, steps: list[dict[str, Any]]) -> Task:
    write_workflow(tmp_path, "w", {"steps": steps})
    return engine.run(engine.submit("w"))


def test_copy_refuses_to_replace_and_leaves_the_existing_file_alone(engine: Engine, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("new")
    dst.write_text("precious")
    task = run_steps(
        engine, tmp_path, [{"name": "c", "action": "file.copy", "with": {"src": str(src), "dst": str(dst)}}]
    )
    assert (task.state, task.error_code) == (TaskState.FAILED, "FileExists")
    assert dst.read_text() == "precious"  # a failed step is not undone: nothing of it to undo
    assert list(tmp_path.glob(".dst.partial-*")) == []


def test_copy_with_overwrite_replaces(engine: Engine, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("new")
    dst.write_text("old")
    with_ = {"src": str(src), "dst": str(dst), "overwrite": True}
    task = run_steps(engine, tmp_path, [{"name": "c", "action": "file.copy", "with": with_, "register": "c"}])
    assert task.state is TaskState.COMPLETED and dst.read_text() == "new"
    assert task.result["c"] == {"path": str(dst), "bytes": 3}


def test_copy_goes_through_a_partial_named_in_the_ledger_before_it_exists(
    engine: Engine, tmp_path: Path
) -> None:
    src, dst = tmp_path / "src", tmp_path / "out" / "dst"
    src.write_text("data")
    dst.parent.mkdir()
    task = run_steps(
        engine, tmp_path, [{"name": "c", "action": "file.copy", "with": {"src": str(src), "dst": str(dst)}}]
    )
    assert task.state is TaskState.COMPLETED
    [(a1, partial), (a2, gone), (a3, made)] = [(e.action, e.resource) for e in engine.store.ledger(task.id)]
    assert (a1, a2, gone, a3, made) == ("created", "removed", partial, "created", str(dst))
    assert Path(partial).parent == dst.parent and Path(partial).name.startswith(".dst.partial-")
    assert [p.name for p in dst.parent.iterdir()] == ["dst"]


def test_copy_onto_a_full_filesystem_is_insufficient_scratch_and_leaves_nothing(
    engine: Engine, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    with tmpfs(tmp_path / "small", "1m") as small:
        with_ = {"src": str(src), "dst": str(small / "dst")}
        task = run_steps(engine, tmp_path, [{"name": "c", "action": "file.copy", "with": with_}])
        assert (task.state, task.error_code) == (TaskState.FAILED, "InsufficientScratch"), task.error_message
        assert f"no space left on the filesystem of {small}" in task.error_message
        assert list(small.iterdir()) == []


def test_copy_of_a_missing_source_fails_with_a_code(engine: Engine, tmp_path: Path) -> None:
    with_ = {"src": str(tmp_path / "absent"), "dst": str(tmp_path / "dst")}
    task = run_steps(engine, tmp_path, [{"name": "c", "action": "file.copy", "with": with_}])
    assert (task.state, task.error_code) == (TaskState.FAILED, "FileNotFound")
    assert str(tmp_path / "absent") in task.error_message


def test_remove_deletes_files_only_and_ledgers_it(engine: Engine, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("x")
    task = run_steps(
        engine,
        tmp_path,
        [
            {"name": "rm", "action": "file.remove", "with": {"path": str(victim)}, "register": "a"},
            {
                "name": "again",
                "action": "file.remove",
                "with": {"path": str(victim), "missing_ok": True},
                "register": "b",
            },
        ],
    )
    assert task.state is TaskState.COMPLETED and not victim.exists()
    assert task.result == {
        "a": {"path": str(victim), "removed": True},
        "b": {"path": str(victim), "removed": False},
    }
    assert [(e.action, e.resource) for e in engine.store.ledger(task.id)] == [("removed", str(victim))]

    task = run_steps(
        engine, tmp_path, [{"name": "rm", "action": "file.remove", "with": {"path": str(victim)}}]
    )
    assert task.error_code == "FileNotFound"
    task = run_steps(
        engine, tmp_path, [{"name": "rm", "action": "file.remove", "with": {"path": str(tmp_path)}}]
    )
    assert task.error_code == "FileError" and "is a directory" in task.error_message and tmp_path.exists()


def test_fail_raises_its_code_and_message(engine: Engine, tmp_path: Path) -> None:
    task = run_steps(engine, tmp_path, [{"name": "stop", "action": "util.fail"}])
    assert (task.error_code, task.error_message) == (
        "StepFailed",
        "step 'stop' failed: failed on purpose (util.fail)",
    )
    task = run_steps(
        engine,
        tmp_path,
        [{"name": "stop", "action": "util.fail", "with": {"code": "Unsupported.Guest", "message": "no"}}],
    )
    assert (task.error_code, task.error_message) == ("Unsupported.Guest", "step 'stop' failed: no")


def test_sleep_stops_promptly_when_the_task_is_cancelled(engine: Engine, tmp_path: Path) -> None:
    write_workflow(
        tmp_path, "nap", {"steps": [{"name": "nap", "action": "util.sleep", "with": {"seconds": 60}}]}
    )
    task_id = engine.submit("nap")

    def cancel_when_sleeping() -> None:
        wait_until(
            lambda: step_state(engine.store, task_id, "1") is StepState.RUNNING, 30, "the sleep to start"
        )
        with Store(engine.config.store) as other:
            other.request_cancel(task_id)

    canceller = threading.Thread(target=cancel_when_sleeping)
    canceller.start()
    task = engine.run(task_id)
    canceller.join(timeout=30)
    assert task.state is TaskState.CANCELLED
    [record] = engine.store.step_results(task_id)
    assert record.state is StepState.FAILED and record.error["code"] == "Cancelled"


def test_reserve_accepts_sizes_and_releases_on_undo(engine: Engine, tmp_path: Path) -> None:
    task = run_steps(
        engine,
        tmp_path,
        [
            {
                "name": "r",
                "action": "scratch.reserve",
                "with": {"bytes": "2MiB", "purpose": "test"},
                "register": "r",
            },
            {"name": "boom", "action": "util.fail"},
        ],
    )
    assert task.state is TaskState.FAILED
    [reserve, _boom] = engine.store.step_results(task.id)
    assert reserve.result["bytes"] == 2 * 1024 * 1024 and reserve.state is StepState.UNDONE
    assert not (tmp_path / "scratch" / task.id).exists()
