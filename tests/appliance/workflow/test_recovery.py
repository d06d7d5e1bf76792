"""Crash safety and cancellation across processes: the engine runs in a real subprocess.

The subprocess is SIGKILLed (resume / resumable: false / cancelling orphan), cancelled through
the store from this process, or sent SIGTERM. Every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import IncorrectState, StoreUnavailable
from appliance.partials import is_partial
from appliance.store import StepState, Store, TaskState
from appliance.workflow import Engine, find_orphans
from appliance.workflow.runner import TaskRun
from appliance.workflow.supervisor import orphan_reason, supervised

from .support import (
    make_config,
    make_registry,
    start_engine_process,
    step_state,
    wait_until,
    write_workflow,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = Engine(make_config(tmp_path), registry=make_registry(), poll_interval=0.05)
    yield e
    e.store.close()


def _append_then_wait(tmp_path: Path, name: str, *, resumable: bool = True) -> dict[str, Path]:
    files = {n: tmp_path / n for n in ("appended", "go", "wait.log", "src", "copy")}
    files["src"].write_text("data")
    write_workflow(
        tmp_path,
        name,
        {
            "resumable": resumable,
            "steps": [
                {
                    "name": "append",
                    "action": "test.append",
                    "with": {"path": str(files["appended"]), "text": "once"},
                    "register": "first",
                },
                {
                    "name": "copy",
                    "action": "file.copy",
                    "with": {"src": str(files["src"]), "dst": str(files["copy"])},
                },
                {
                    "name": "wait",
                    "action": "test.wait_for_file",
                    "with": {"path": str(files["go"]), "log": str(files["wait.log"])},
                },
                {
                    "name": "report",
                    "action": "util.echo",
                    "with": {"lines": "{{ first.lines }}"},
                    "register": "report",
                },
            ],
        },
    )
    return files


def _waiting(files: dict[str, Path]) -> bool:
    """The 'wait' step logged that it started: the line is in the file, not only the file created
    (the step opens the log, then writes; a kill between the two left an empty log)."""
    return files["wait.log"].exists() and files["wait.log"].read_text().endswith("started\n")


def _kill_during_wait(engine: Engine, tmp_path: Path, task_id: str, files: dict[str, Path]) -> None:
    proc = start_engine_process(tmp_path, task_id)
    try:
        wait_until(lambda: _waiting(files), 30, "the engine process to reach the 'wait' step")
        assert step_state(engine.store, task_id, "3") is StepState.RUNNING
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)


def test_killed_worker_is_resumed_after_its_last_completed_step(engine: Engine, tmp_path: Path) -> None:
    files = _append_then_wait(tmp_path, "resumable")
    task_id = engine.submit("resumable")
    _kill_during_wait(engine, tmp_path, task_id, files)

    task = engine.store.get_task(task_id)
    assert task.state is TaskState.RUNNING  # the dead worker could not say anything
    [(orphan, reason)] = find_orphans(engine.store)
    assert orphan.id == task_id and "is gone" in reason

    files["go"].touch()
    [ended] = engine.recover()
    assert ended.id == task_id and ended.state is TaskState.COMPLETED, ended.error_message
    assert files["appended"].read_text() == "once\n"  # step 1 was not run again
    assert files["wait.log"].read_text() == "started\nstarted\n"  # the interrupted step was
    assert ended.result["report"] == {"lines": 1}  # step 1's registered result was restored
    assert ended.attempts == 2 and ended.owner == engine.owner
    kinds = [e.kind for e in engine.store.events(task_id=task_id)]
    assert "task.resumed" in kinds
    assert find_orphans(engine.store) == []


def test_a_completed_task_removes_a_partial_output_it_left_unpublished(
    engine: Engine, tmp_path: Path
) -> None:
    final = tmp_path / "images" / "image.raw"
    final.parent.mkdir()
    write_workflow(
        tmp_path,
        "leaves-partial",
        {"steps": [{"name": "leave", "action": "test.leave_partial", "with": {"final": str(final)}}]},
    )
    task_id = engine.submit("leaves-partial")
    ended = engine.run(task_id)
    assert ended.state is TaskState.COMPLETED, ended.error_message
    assert list(final.parent.iterdir()) == []  # the task is over: nothing resumes that partial
    assert [(e.action, Path(e.resource).name) for e in engine.store.ledger(task_id)] == [
        ("created", ".image.raw.partial-0000000a"),
        ("removed", ".image.raw.partial-0000000a"),
    ]


def test_killed_worker_of_a_non_resumable_workflow_is_undone_and_failed(
    engine: Engine, tmp_path: Path
) -> None:
    files = _append_then_wait(tmp_path, "oneshot", resumable=False)
    task_id = engine.submit("oneshot")
    _kill_during_wait(engine, tmp_path, task_id, files)
    assert files["copy"].exists()

    [ended] = engine.recover()
    assert (ended.state, ended.error_code) == (TaskState.FAILED, "TaskInterrupted")
    assert ended.error_message.startswith("the worker running this task died during step 'wait'")
    assert "not resumable" in ended.error_message
    assert not files["copy"].exists()  # undo ran
    assert not files["wait.log"].read_text().count("started") > 1  # nothing re-run
    assert [(e.action, e.resource) for e in engine.store.ledger(task_id) if not is_partial(e.resource)] == [
        ("created", str(files["copy"])),
        ("removed", str(files["copy"])),
    ]
    states = {r.idx: r.state for r in engine.store.step_results(task_id)}
    assert states == {"1": StepState.COMPLETED, "2": StepState.UNDONE, "3": StepState.FAILED}


def test_orphan_that_was_being_cancelled_ends_cancelled(engine: Engine, tmp_path: Path) -> None:
    files = _append_then_wait(tmp_path, "cancel-orphan")
    task_id = engine.submit("cancel-orphan")
    _kill_during_wait(engine, tmp_path, task_id, files)
    assert engine.store.request_cancel(task_id).state is TaskState.CANCELLING

    [ended] = engine.recover()
    assert ended.state is TaskState.CANCELLED
    assert not files["copy"].exists()
    assert files["wait.log"].read_text() == "started\n"


def test_cancel_requested_from_another_process_stops_and_undoes(engine: Engine, tmp_path: Path) -> None:
    files = _append_then_wait(tmp_path, "cancel-me")
    task_id = engine.submit("cancel-me")
    proc = start_engine_process(tmp_path, task_id)
    try:
        wait_until(lambda: _waiting(files), 30, "the engine process to reach the 'wait' step")
        other = Store(engine.config.store)  # a separate connection, as the HTTP API would have
        assert other.request_cancel(task_id).state is TaskState.CANCELLING
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    final = json.loads(out)
    assert final["state"] == "cancelled" and final["error_code"] == "Cancelled"
    task = engine.store.get_task(task_id)
    assert task.state is TaskState.CANCELLED and task.finished_at
    assert not files["copy"].exists()
    assert [e.action for e in engine.store.ledger(task_id) if not is_partial(e.resource)] == [
        "created",
        "removed",
    ]
    states = {r.idx: r.state for r in engine.store.step_results(task_id)}
    assert states["2"] is StepState.UNDONE and states["3"] is StepState.FAILED and "4" not in states
    history = [e.data["state"] for e in engine.store.events(task_id=task_id) if e.kind == "task.state"]
    assert history == ["pending", "running", "cancelling", "cancelled"]


def test_a_task_polling_less_often_than_a_third_of_its_lease_still_renews_it(
    engine: Engine, tmp_path: Path
) -> None:
    # worker.task_poll_interval may be long where doorbells deliver the cancels: the lease (5 s
    # here) must not wait for the next poll (an hour) to be renewed
    files = _append_then_wait(tmp_path, "poll-seldom")
    task_id = engine.submit("poll-seldom")
    seldom = Engine(engine.config, registry=make_registry(), poll_interval=3600)
    runner = threading.Thread(target=seldom.run, args=(task_id,))
    runner.start()
    try:
        wait_until(lambda: _waiting(files), 30, "the run to reach the 'wait' step")
        first = engine.store.get_task(task_id).lease_expires_at
        wait_until(lambda: engine.store.get_task(task_id).lease_expires_at != first, 10, "a renewal")
        assert orphan_reason(engine.store.get_task(task_id)) is None
    finally:
        files["go"].touch()
        runner.join(30)
        seldom.store.close()
    assert engine.store.get_task(task_id).state is TaskState.COMPLETED


def test_a_step_stalled_after_a_burst_of_progress_shows_its_last_figures_without_waiting_for_the_poll(
    engine: Engine, tmp_path: Path
) -> None:
    # the throttle holds back the second of two quick progress reports; a step that then stalls must
    # not leave the task at the first figures until the next poll or lease renewal (an hour each here)
    files = {n: tmp_path / n for n in ("go", "wait.log")}
    write_workflow(
        tmp_path,
        "stall",
        {
            "steps": [
                {
                    "name": "report",
                    "action": "test.report_then_wait",
                    "with": {"path": str(files["go"]), "log": str(files["wait.log"])},
                }
            ]
        },
    )
    task_id = engine.submit("stall")
    long_lease = dataclasses.replace(engine.config, lease_seconds=3 * 3600)
    seldom = Engine(long_lease, registry=make_registry(), poll_interval=3600)
    runner = threading.Thread(target=seldom.run, args=(task_id,))
    runner.start()
    try:
        wait_until(lambda: _waiting(files), 30, "the step to stall")
        wait_until(lambda: engine.store.get_task(task_id).bytes_done == 2, 10, "the held-back progress")
        assert engine.store.get_task(task_id).state is TaskState.RUNNING
    finally:
        files["go"].touch()
        runner.join(30)
        seldom.store.close()
    assert engine.store.get_task(task_id).state is TaskState.COMPLETED


class _AwayForOneWrite:
    """The task database, but its next progress write finds it unreachable (as a dropped connection)."""

    def __init__(self, store: Store) -> None:
        self._store, self.away = store, True
        #: (step, bytes_done) of each progress write that reached the database
        self.written: list[tuple[str | None, int | None]] = []

    def update_progress(self, task_id: str, **kwargs: Any) -> None:
        if self.away:
            self.away = False
            raise StoreUnavailable("task database cannot be reached: connection lost")
        self._store.update_progress(task_id, **kwargs)
        self.written.append((kwargs.get("step"), kwargs.get("bytes_done")))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_progress_held_for_two_steps_outlives_a_flush_the_database_was_away_for(engine: Engine) -> None:
    # each step's last figures are kept when the first write of a flush fails, not only the first's
    task_id = engine.store.create_task("w").id
    task = engine.store.claim(task_id, engine.owner, 3600)
    run = TaskRun(engine, task)
    contexts = [run.context(idx, idx, run.cancel) for idx in ("1", "2")]
    for ctx in contexts:
        ctx.progress({"phase": "copying", "done": 1, "total": 10})
        ctx.progress({"phase": "copying", "done": 2, "total": 10})  # held back by the throttle
    away = _AwayForOneWrite(engine.store)
    run.store = away  # type: ignore[assignment]
    with pytest.raises(StoreUnavailable):
        run.flush_progress()
    assert run.progress_held_since() is not None and away.written == []
    run.flush_progress()
    assert run.progress_held_since() is None
    assert sorted(away.written) == [("1", 2), ("2", 2)]


def test_a_cancel_requested_before_the_task_handles_its_doorbell_is_seen_without_waiting_for_the_poll(
    engine: Engine, tmp_path: Path
) -> None:
    # a task process ignores SIGUSR2 until its supervisor handles it: a cancel whose doorbell rang in
    # between must not wait for the next poll (an hour here) or lease renewal (twenty minutes)
    _append_then_wait(tmp_path, "rang-early")
    task_id = engine.submit("rang-early")
    task = engine.store.claim(task_id, engine.owner, 3600)
    engine.store.request_cancel(task_id, "rang before the handler")
    run = TaskRun(engine, task)
    with supervised(run, engine.owner, 3600, 3600):
        wait_until(run.cancel.is_set, 10, "the cancel seen")


def test_sigterm_to_the_engine_process_cancels_the_task(engine: Engine, tmp_path: Path) -> None:
    files = _append_then_wait(tmp_path, "term")
    task_id = engine.submit("term")
    proc = start_engine_process(tmp_path, task_id)
    try:
        wait_until(lambda: _waiting(files), 30, "the engine process to reach the 'wait' step")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    task = engine.store.get_task(task_id)
    assert task.state is TaskState.CANCELLED and task.error_message == "cancelled by SIGTERM"
    assert not files["copy"].exists()


def test_orphan_detection_uses_dead_pids_and_expired_leases(engine: Engine, tmp_path: Path) -> None:
    store = engine.store
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    live = store.claim(store.create_task("w").id, engine.owner, 60)
    gone = store.claim(store.create_task("w").id, f"{socket.gethostname()}:{dead_pid}", 60)
    remote_live = store.claim(store.create_task("w").id, "elsewhere:1", 60)
    remote_expired = store.claim(store.create_task("w").id, "elsewhere:2", -1)
    assert orphan_reason(store.get_task(live.id)) is None
    assert orphan_reason(store.get_task(remote_live.id)) is None
    assert f"process {dead_pid}" in orphan_reason(store.get_task(gone.id))
    assert "stopped renewing its lease" in orphan_reason(store.get_task(remote_expired.id))
    assert {t.id for t, _ in find_orphans(store)} == {gone.id, remote_expired.id}
    with pytest.raises(IncorrectState, match="still owned"):
        engine.resume(remote_live.id)


def test_a_run_the_task_database_went_away_under_stops_and_resumes_instead_of_failing(
    engine: Engine, tmp_path: Path
) -> None:
    appended = tmp_path / "appended"
    write_workflow(
        tmp_path,
        "db-gone",
        {
            "steps": [
                {"name": "first", "action": "test.append", "with": {"path": str(appended), "text": "first"}},
                {"name": "gone", "action": "test.store_gone_once", "with": {"counter": str(tmp_path / "n")}},
                {"name": "last", "action": "test.append", "with": {"path": str(appended), "text": "last"}},
            ]
        },
    )
    task_id = engine.submit("db-gone")
    with pytest.raises(StoreUnavailable):
        engine.run(task_id)
    # not the task's failure: nothing recorded as failed, nothing undone, the owner kept
    task = engine.store.get_task(task_id)
    assert (task.state, task.error_code, task.owner) == (TaskState.RUNNING, None, engine.owner)
    assert step_state(engine.store, task_id, "1") is StepState.COMPLETED
    assert step_state(engine.store, task_id, "2") is StepState.RUNNING
    resumed = engine.resume(task_id, reason="the task database is back")
    assert resumed.state is TaskState.COMPLETED, resumed.error_message
    assert appended.read_text().splitlines() == ["first", "last"]  # the completed step did not run again
    assert (tmp_path / "n").read_text() == "2"
