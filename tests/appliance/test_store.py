"""Task state store: migrations, state machine, progress, leases, events, ledger, concurrency."""

from __future__ import annotations

import functools
import json
import multiprocessing
import queue
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.database import StoreConfig
from appliance.errors import (
    Finding,
    IdempotentParameterMismatch,
    IncorrectState,
    TaskNotFound,
    UsageError,
)
from appliance.progress import UNFLUSHED_PERCENT
from appliance.store import (
    ACTIVE_STATES,
    MIGRATIONS,
    TRANSITIONS,
    ActiveTaskLimit,
    StepState,
    Store,
    StoreError,
    TaskState,
    migration_sql,
    open_database,
)
from appliance.store.schema import TOKEN_LOOKUP
from appliance.timestamps import parse_time
from tests.stores import sql

from .workflow.support import wait_until

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

#: every test of this module runs on SQLite and on PostgreSQL (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("store_backend")


@pytest.fixture
def store(store_target: StoreConfig) -> Store:
    s = Store(store_target)
    yield s
    s.close()


def test_new_database_gets_every_migration(store_target: StoreConfig) -> None:
    with Store(store_target) as s:
        assert s.schema_version == len(MIGRATIONS)
        exists = s._sql("table_exists")
        for table in (
            "tasks",
            "steps",
            "events",
            "ledger",
            "task_records",
            "report_outbox",
            "schema_version",
        ):
            assert sql(store_target, exists, (table,)), table
    assert sql(store_target, "SELECT COUNT(*) FROM schema_version")[0][0] == 1


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("target", [None, ""])
def test_no_database_given_is_refused_without_creating_a_file_named_after_it(
    target: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the SQLite path of a PostgreSQL store is None: opening it once made ./None, a SQLite file
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match="no task database given"):
        Store(target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.backends("sqlite")
def test_sqlite_database_is_in_wal_mode(store_target: StoreConfig) -> None:
    Store(store_target).close()
    with sqlite3.connect(store_target.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_keeps_data_and_does_not_migrate_again(store_target: StoreConfig) -> None:
    with Store(store_target) as s:
        task = s.create_task("workflow", "demo", {"a": 1})
    with Store(store_target) as s:
        assert s.schema_version == len(MIGRATIONS)
        assert s.get_task(task.id).params == {"a": 1}
    assert sql(store_target, "SELECT COUNT(*) FROM schema_version")[0][0] == 1


def test_database_from_newer_code_is_refused_clearly(store_target: StoreConfig) -> None:
    Store(store_target).close()
    sql(store_target, "UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError) as exc:
        Store(store_target)
    assert exc.value.code == "StateStoreError"
    assert "schema version 99" in exc.value.message
    assert "newer" in exc.value.message


def test_task_ids_are_generated_or_validated(store: Store) -> None:
    assert re.match(r"^t-[0-9a-f]{12}$", store.create_task("workflow").id)
    assert store.create_task("workflow", task_id="import-42").id == "import-42"
    with pytest.raises(UsageError):
        store.create_task("workflow", task_id="../escape")
    with pytest.raises(UsageError, match="already exists"):
        store.create_task("workflow", task_id="import-42")
    with pytest.raises(TaskNotFound):
        store.get_task("t-missing")


def _drive_to(store: Store, state: TaskState) -> str:
    """A task in ``state``, reached through legal transitions only."""
    task_id = store.create_task("workflow").id
    path = {
        TaskState.PENDING: [],
        TaskState.RUNNING: [TaskState.RUNNING],
        TaskState.CANCELLING: [TaskState.RUNNING, TaskState.CANCELLING],
        TaskState.COMPLETED: [TaskState.RUNNING, TaskState.COMPLETED],
        TaskState.FAILED: [TaskState.RUNNING, TaskState.FAILED],
        TaskState.CANCELLED: [TaskState.CANCELLED],
    }[state]
    for s in path:
        store.set_state(task_id, s)
    return task_id


@pytest.mark.parametrize("current", list(TaskState))
@pytest.mark.parametrize("new", list(TaskState))
def test_set_state_allows_exactly_the_declared_transitions(
    store: Store, current: TaskState, new: TaskState
) -> None:
    task_id = _drive_to(store, current)
    if new in TRANSITIONS[current]:
        assert store.set_state(task_id, new).state is new
    else:
        with pytest.raises(IncorrectState):
            store.set_state(task_id, new)
        assert store.get_task(task_id).state is current


def test_state_machine_shape() -> None:
    # The life cycle the engine and the API rely on, independent of how the table is written.
    assert TRANSITIONS[TaskState.PENDING] == {TaskState.RUNNING, TaskState.CANCELLED, TaskState.FAILED}
    assert TRANSITIONS[TaskState.RUNNING] == {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLING}
    assert TRANSITIONS[TaskState.CANCELLING] == {TaskState.CANCELLED, TaskState.FAILED}
    assert all(not TRANSITIONS[s] for s in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED))


def test_request_cancel_cancels_pending_at_once_and_running_via_cancelling(store: Store) -> None:
    pending = store.create_task("workflow").id
    task = store.request_cancel(pending)
    assert task.state is TaskState.CANCELLED and task.finished_at is not None

    running = _drive_to(store, TaskState.RUNNING)
    assert store.request_cancel(running).state is TaskState.CANCELLING
    assert store.request_cancel(running).state is TaskState.CANCELLING  # repeat is harmless

    done = _drive_to(store, TaskState.COMPLETED)
    with pytest.raises(IncorrectState, match="already completed"):
        store.request_cancel(done)


def test_compare_and_swap_on_expected_state(store: Store) -> None:
    task_id = _drive_to(store, TaskState.CANCELLING)
    with pytest.raises(IncorrectState, match="expected running"):
        store.set_state(task_id, TaskState.FAILED, expected=TaskState.RUNNING)
    assert (
        store.set_state(task_id, TaskState.FAILED, expected=["running", "cancelling"]).state
        is TaskState.FAILED
    )


def test_progress_never_goes_backwards(store: Store) -> None:
    task_id = _drive_to(store, TaskState.RUNNING)
    store.update_progress(task_id, phase="download", bytes_done=500, bytes_total=1000, percent=40)
    task = store.update_progress(task_id, phase="download", bytes_done=300, bytes_total=900, percent=20)
    assert (task.bytes_done, task.bytes_total, task.percent) == (500, 1000, 40)
    task = store.update_progress(task_id, bytes_done=800, percent=150)
    assert (task.bytes_done, task.percent) == (800, 100)
    # A new phase counts its own bytes, but the overall percentage still only grows.
    task = store.update_progress(task_id, phase="convert", bytes_done=10, bytes_total=2000, percent=5)
    assert (task.phase, task.bytes_done, task.bytes_total, task.percent) == ("convert", 10, 2000, 100)


def test_each_step_keeps_its_own_progress_whose_percent_never_goes_back(store: Store) -> None:
    task_id = _drive_to(store, TaskState.RUNNING)
    store.record_step(task_id, "1/include/2", name="fetch", action="source.fetch", state="running")
    store.record_step(task_id, "2.loop1/include/2", name="fetch", action="source.fetch", state="running")
    store.update_progress(
        task_id, phase="downloading", bytes_done=50, bytes_total=100, percent=25, step="1/include/2"
    )
    # the task's percent is the highest so far; the second disk's step has its own
    task = store.update_progress(
        task_id, phase="downloading", bytes_done=10, bytes_total=400, percent=1.25, step="2.loop1/include/2"
    )
    assert task.percent == 25
    steps = {s.idx: s.progress for s in store.step_results(task_id)}
    assert steps["1/include/2"] == {"phase": "downloading", "done": 50, "total": 100, "percent": 25.0}
    assert steps["2.loop1/include/2"] == {"phase": "downloading", "done": 10, "total": 400, "percent": 1.25}
    # a retried download starts again from 0: the step's percent stays where it got to
    store.update_progress(task_id, phase="downloading", bytes_done=0, percent=0.0, step="2.loop1/include/2")
    again = {s.idx: s.progress for s in store.step_results(task_id)}["2.loop1/include/2"]
    assert again == {"phase": "downloading", "done": 0, "total": 400, "percent": 1.25}
    # kept when the step is recorded again (its end), and shown with it
    done = store.record_step(task_id, "1/include/2", name="fetch", action="source.fetch", state="completed")
    assert done.progress == steps["1/include/2"] and done.to_dict()["progress"] == done.progress
    # a step not recorded (yet) keeps nothing, and the task's progress is written all the same
    task = store.update_progress(task_id, percent=30, step="9")
    assert task.percent == 30 and "9" not in {s.idx for s in store.step_results(task_id)}


def test_completed_task_shows_full_progress_and_result(store: Store) -> None:
    task_id = _drive_to(store, TaskState.RUNNING)
    task = store.set_state(task_id, TaskState.COMPLETED, result={"image": "x.qcow2"})
    assert task.percent == 100 and task.result == {"image": "x.qcow2"} and task.lease_expires_at is None


@pytest.mark.parametrize(
    "path",
    [
        [TaskState.RUNNING, TaskState.FAILED],
        [TaskState.RUNNING, TaskState.CANCELLING, TaskState.CANCELLED],
        [TaskState.RUNNING, TaskState.CANCELLING, TaskState.FAILED],
    ],
    ids=["failed", "cancelled", "cancel-failed"],
)
def test_task_that_did_not_complete_keeps_its_percent_below_100_and_says_how_it_ended(
    store: Store, path: list[TaskState]
) -> None:
    task_id = store.create_task("workflow").id
    store.set_state(task_id, path[0])
    # a first step counted all its bytes, a second one was under way: the task's percent is 100
    store.update_progress(task_id, phase="writing", bytes_done=8, bytes_total=8, percent=100, step="1")
    store.update_progress(task_id, phase="sleep", percent=3, step="2")
    assert store.get_task(task_id).percent == 100
    for state in path[1:]:
        store.set_state(task_id, state)
    ended = store.get_task(task_id)
    assert (ended.state, ended.phase, ended.percent) == (path[-1], str(path[-1]), UNFLUSHED_PERCENT)
    # progress the supervisor flushes after the end changes neither
    late = store.update_progress(task_id, phase="writing", percent=100, step="1")
    assert (late.phase, late.percent) == (str(path[-1]), UNFLUSHED_PERCENT)


def test_failed_task_keeps_the_percent_it_reached_below_100(store: Store) -> None:
    task_id = _drive_to(store, TaskState.RUNNING)
    store.update_progress(task_id, phase="downloading", percent=42.5)
    assert store.set_state(task_id, TaskState.FAILED).percent == 42.5
    never = store.set_state(_drive_to(store, TaskState.PENDING), TaskState.CANCELLED)
    assert (never.phase, never.percent) == ("cancelled", None)


def test_completed_task_phase_says_completed_not_its_last_steps(store: Store) -> None:
    task_id = _drive_to(store, TaskState.RUNNING)
    store.update_progress(task_id, phase="writing", bytes_done=5, bytes_total=10, percent=50)
    task = store.set_state(task_id, TaskState.COMPLETED)
    assert (task.phase, task.percent) == ("completed", 100)


def test_timestamps_are_utc_iso8601_with_z(store: Store) -> None:
    task_id = _drive_to(store, TaskState.COMPLETED)
    task = store.get_task(task_id)
    for value in (task.created_at, task.updated_at, task.started_at, task.finished_at):
        assert ISO_Z.match(value), value
    # UTC, not local time mislabelled with a Z: it is close to the real UTC now.
    assert abs(parse_time(task.created_at) - datetime.now(UTC)) < timedelta(minutes=5)
    assert task.created_at <= task.started_at <= task.finished_at  # text order is time order


def test_claim_lease_and_takeover(store: Store) -> None:
    task_id = store.create_task("workflow").id
    task = store.claim(task_id, "host-a:1", 30)
    assert task.state is TaskState.RUNNING and task.owner == "host-a:1" and task.attempts == 1
    at_least = datetime.now(UTC) + timedelta(seconds=20)
    assert parse_time(task.lease_expires_at) > at_least
    with pytest.raises(IncorrectState, match="owned by host-a:1"):
        store.claim(task_id, "host-b:2", 30)
    assert store.renew_lease(task_id, "host-a:1", 30)
    assert not store.renew_lease(task_id, "host-b:2", 30)
    task = store.claim(task_id, "host-b:2", 30, expected_owner="host-a:1")
    assert task.owner == "host-b:2" and task.attempts == 2
    assert not store.renew_lease(task_id, "host-a:1", 30)  # the old owner learns it lost the task
    store.set_state(task_id, TaskState.COMPLETED)
    with pytest.raises(IncorrectState):
        store.claim(task_id, "host-c:3", 30)


def test_findings_results_and_to_dict_are_json(store: Store) -> None:
    task_id = store.create_task("import", "demo", {"size": 3}).id
    store.add_findings(task_id, [Finding.error("UnsafeImage.BackingFile", "has a backing file")])
    task = store.get_task(task_id)
    assert task.findings == [
        {"code": "UnsafeImage.BackingFile", "severity": "error", "message": "has a backing file"}
    ]
    d = json.loads(json.dumps(task.to_dict()))
    assert d["state"] == "pending" and d["params"] == {"size": 3} and d["kind"] == "import"
    with pytest.raises(UsageError):
        store.set_state(task_id, TaskState.RUNNING, result={"bad": object()})
    assert store.get_task(task_id).state is TaskState.PENDING  # the failed write changed nothing


def test_step_records_upsert_in_place(store: Store) -> None:
    task_id = _drive_to(store, TaskState.RUNNING)
    store.record_step(task_id, "1", name="a", action="util.echo", state="completed", result={"x": 1})
    first = store.record_step(task_id, "2", name="b", action="util.sleep", state="running", args={"s": 1})
    store.record_step(task_id, "2.loop1", name="b", action="util.sleep", state="running")
    again = store.record_step(task_id, "2", name="b", action="util.sleep", state="completed", attempts=2)
    assert again.seq == first.seq and again.started_at == first.started_at and again.finished_at
    assert [r.idx for r in store.step_results(task_id)] == ["1", "2", "2.loop1"]
    undone = store.set_step_state(task_id, "1", StepState.UNDONE)
    assert undone.state is StepState.UNDONE and undone.result == {"x": 1}


def test_events_are_a_queue_read_by_id(store: Store) -> None:
    a = store.create_task("workflow").id
    b = store.create_task("workflow").id
    mark = store.events()[-1].id
    store.add_event(a, "note", {"n": 1})
    store.set_state(b, TaskState.RUNNING)
    newer = store.events(since_id=mark)
    assert [(e.task_id, e.kind) for e in newer] == [(a, "note"), (b, "task.state")]
    assert newer[1].data == {"state": "running", "previous": "pending"}
    assert [e.kind for e in store.events(task_id=a)] == ["task.state", "note"]


def test_what_people_read_is_stored_redacted_and_what_a_task_runs_with_is_kept(store: Store) -> None:
    url = "https://ops:pw0123456789@s3.example/b/k?X-Amz-Signature=0123456789abcdef&x=1"
    task_id = store.create_task("workflow", params={"url": url}).id
    store.add_event(task_id, "note", {"password": "hunter2hunter2", "said": f"fetching {url}"})
    store.set_record(task_id, "hooks", {"with": {"password": "hunter2hunter2", "url": url}})
    store.set_state(task_id, TaskState.RUNNING)
    store.set_state(task_id, TaskState.FAILED, error_code="Site.Refused", error_message=f"{url} refused")
    shown = json.dumps([e.data for e in store.events(task_id=task_id)]) + json.dumps(
        store.get_task(task_id).to_dict()["error_message"]
    )
    assert "hunter2hunter2" not in shown and "pw0123456789" not in shown and "0123456789abcdef" not in shown
    assert "https://REDACTED@s3.example/b/k?X-Amz-Signature=REDACTED&x=1 refused" in shown
    # kept as given: the task needs them to run or resume
    assert store.get_task(task_id).params == {"url": url}
    assert store.record(task_id, "hooks") == {"with": {"password": "hunter2hunter2", "url": url}}
    assert store.record(task_id, "other") is None
    with pytest.raises(TaskNotFound):
        store.set_record("t-000000000000", "hooks", {})


def test_ledger_records_actions_in_order(store: Store) -> None:
    task_id = store.create_task("workflow").id
    store.add_ledger(task_id, "created", "/tmp/x", "1")
    store.add_ledger(task_id, "removed", "/tmp/x", "1")
    with pytest.raises(UsageError):
        store.add_ledger(task_id, "misplaced", "/tmp/x")
    assert [(e.action, e.resource, e.step) for e in store.ledger(task_id)] == [
        ("created", "/tmp/x", "1"),
        ("removed", "/tmp/x", "1"),
    ]
    assert store.events(task_id=task_id)[-1].kind == "ledger"


def test_list_tasks_filters_by_state_newest_first(store: Store) -> None:
    a = store.create_task("workflow").id
    b = store.create_task("workflow").id
    c = _drive_to(store, TaskState.RUNNING)
    assert [t.id for t in store.list_tasks()] == [c, b, a]
    assert [t.id for t in store.list_tasks("pending")] == [b, a]
    assert [t.id for t in store.list_tasks(["running", "pending"], limit=2)] == [c, b]


READER = textwrap.dedent(
    """
    import json, os, sys
    from appliance.store import Store
    store = Store(sys.argv[1], busy_timeout=5)
    task_id, ready, stop = sys.argv[2], sys.argv[3], sys.argv[4]
    reads, mid_write, errors, last_done, went_back = 0, 0, [], 0, False
    while not os.path.exists(stop):
        try:
            task = store.get_task(task_id)
            store.events(since_id=0, task_id=task_id, limit=50)
            store.step_results(task_id)
            done = task.bytes_done or 0
            went_back = went_back or done < last_done
            mid_write += 0 < done < 1_000_000
            last_done = done
            reads += 1
            if reads == 1:
                open(ready, "w").close()
        except Exception as exc:
            errors.append(repr(exc))
    print(json.dumps({"reads": reads, "mid_write": mid_write, "errors": errors[:5], "went_back": went_back}))
    """
)


def test_reader_process_never_sees_locked_database_while_writer_writes(
    tmp_path: Path, store_target: StoreConfig
) -> None:
    store = Store(store_target)
    task_id = store.create_task("workflow").id
    store.set_state(task_id, TaskState.RUNNING)
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, store_target.url, task_id, str(ready), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(ready.exists, 30, "the reader process to start reading")
        for i in range(1, 1001):
            store.update_progress(task_id, phase="copy", bytes_done=i * 1000, bytes_total=1_000_000)
            store.add_event(task_id, "tick", {"i": i})
            store.record_step(task_id, str(i % 7), name="s", action="util.echo", state="running")
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    report = json.loads(out)
    assert report["errors"] == []
    assert report["mid_write"] > 0  # it really read while the writes were going on
    assert not report["went_back"]
    assert store.get_task(task_id).bytes_done == 1_000_000
    store.close()


def test_add_findings_keeps_earlier_ones_and_adds_each_once(store: Store) -> None:
    task_id = store.create_task("workflow", "w", {}).id
    guest = Finding.warning("Guest.FstabDeviceName", "fstab names /dev/sda1")
    store.add_findings(task_id, [guest])
    unsafe = Finding.error("UnsafeImage.BackingFile", "has a backing file")
    store.add_findings(task_id, [unsafe, guest, unsafe])  # a retried step reports again
    assert [f["code"] for f in store.get_task(task_id).findings] == [
        "Guest.FstabDeviceName",
        "UnsafeImage.BackingFile",
    ]


# -- admission: the active-task limit and client tokens ------------------------------------------


def test_limit_counts_pending_running_and_cancelling_tasks_of_every_kind(store: Store) -> None:
    for state in TaskState:
        _drive_to(store, state)  # one task in each state: three of them are active
    store.create_task("import-image", max_active=4)
    with pytest.raises(ActiveTaskLimit) as info:
        store.create_task("import-snapshot", max_active=4)
    assert (info.value.active, info.value.limit, info.value.code) == (4, 4, "ResourceLimitExceeded")
    assert info.value.message.startswith("4 tasks are active")
    assert len(store.list_tasks(limit=None)) == 7


def test_client_token_returns_the_task_of_the_same_request(store: Store) -> None:
    first = store.create_task("import-snapshot", "w", {"key": "a"}, client_token="tok", client_account="acct")
    again = store.create_task("import-snapshot", "w", {"key": "a"}, client_token="tok", client_account="acct")
    assert again == first
    with pytest.raises(IdempotentParameterMismatch) as info:
        store.create_task("import-snapshot", "w", {"key": "b"}, client_token="tok", client_account="acct")
    assert first.id in info.value.message
    # the token is per account and per kind; an empty token is no token
    other_account = store.create_task(
        "import-snapshot", "w", {"key": "a"}, client_token="tok", client_account="other"
    )
    other_kind = store.create_task(
        "import-image", "w", {"key": "a"}, client_token="tok", client_account="acct"
    )
    untokened = [store.create_task("import-snapshot", "w", {"key": "a"}, client_token="") for _ in range(2)]
    ids = {first.id, other_account.id, other_kind.id, *(t.id for t in untokened)}
    assert len(ids) == 5 == len(store.list_tasks(limit=None))


def test_tasks_are_found_and_listed_within_the_accounts_asked_for(store: Store) -> None:
    a = store.create_task("import-snapshot", client_account="acct-a").id
    b = store.create_task("import-snapshot", client_account="acct-b").id
    none = store.create_task("import-snapshot").id  # no account
    assert [store.get_task(t).client_account for t in (a, b, none)] == ["acct-a", "acct-b", ""]
    assert store.get_task(a, account="acct-a").id == a
    assert store.get_task(none, account=["acct-a", ""]).id == none
    # another account's task is not found, in the words an unknown id gets
    for task_id, account in ((a, "acct-b"), (none, "acct-a"), (a, [])):
        with pytest.raises(TaskNotFound) as info:
            store.get_task(task_id, account=account)
        assert info.value.message == f"no task {task_id!r}"
    assert [t.id for t in store.list_tasks(limit=None, account="acct-b")] == [b]
    assert [t.id for t in store.list_tasks(limit=None, account=["acct-a", ""])] == [none, a]
    assert store.list_tasks(limit=None, account=[]) == []
    assert [t.id for t in store.list_tasks(limit=None)] == [none, b, a]
    # a page marker too: another account's task is no marker
    assert [t.id for t in store.list_tasks(limit=None, account=["acct-a", ""], marker=none)] == [a]
    with pytest.raises(TaskNotFound):
        store.list_tasks(account="acct-a", marker=b)


def test_client_token_repeat_is_answered_at_the_limit(store: Store) -> None:
    first = store.create_task("import-snapshot", params={"k": 1}, client_token="tok", max_active=1)
    with pytest.raises(ActiveTaskLimit):
        store.create_task("import-snapshot", params={"k": 2}, max_active=1)
    assert store.create_task("import-snapshot", params={"k": 1}, client_token="tok", max_active=1) == first


@pytest.mark.backends("sqlite")
def test_client_token_lookup_searches_the_unique_index(store: Store) -> None:
    store.create_task("import-snapshot", params={"k": 1}, client_token="tok")
    statements: list[str] = []
    store._db._conn.set_trace_callback(statements.append)
    try:
        store.create_task("import-snapshot", params={"k": 1}, client_token="tok")
    finally:
        store._db._conn.set_trace_callback(None)
    [lookup] = [sql for sql in statements if "client_token =" in sql and sql.startswith("SELECT")]
    with sqlite3.connect(store.path) as conn:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {lookup}")]
    assert plan == [
        "SEARCH tasks USING INDEX tasks_client_token (client_account=? AND kind=? AND client_token=?)"
    ]


@pytest.mark.backends("postgresql")
def test_client_token_lookup_can_use_the_unique_index_on_postgresql(store: Store) -> None:
    store.create_task("import-snapshot", params={"k": 1}, client_token="tok")
    with store._write() as conn:
        conn.execute("SET LOCAL enable_seqscan = off")  # an empty table would be scanned anyway
        plan = " ".join(r[0] for r in conn.execute("EXPLAIN " + TOKEN_LOOKUP, ("", "import-snapshot", "tok")))
    assert "Index Scan using tasks_client_token" in plan


def _create_all(db: str, calls: list[dict[str, Any]], start: Any) -> list[Any]:
    """In one writer with its own connection: wait for ``start``, then create a task per call; each
    result is the task id or ``("limit", active)``."""
    with Store(db) as store:
        start.wait()
        results: list[Any] = []
        for kwargs in calls:
            try:
                results.append(store.create_task(**kwargs).id)
            except ActiveTaskLimit as exc:
                results.append(("limit", exc.active))
        return results


def _in_process(db: str, calls: list[dict[str, Any]], start: Any, out: Any) -> None:
    out.put(_create_all(db, calls, start))


def run_writers(how: str, db: StoreConfig, calls: list[list[dict[str, Any]]]) -> list[Any]:
    """Each list of ``calls`` in its own writer (a thread or a process, each with its own
    connection), all released at once; every result."""
    if how == "threads":
        start: Any = threading.Barrier(len(calls))
        with ThreadPoolExecutor(len(calls)) as pool:
            done = list(pool.map(lambda c: _create_all(db.url, c, start), calls))
        return [r for results in done for r in results]
    ctx = multiprocessing.get_context("spawn")  # no database connection crosses a fork
    start, out = ctx.Barrier(len(calls)), ctx.Queue()
    procs = [ctx.Process(target=_in_process, args=(db.url, c, start, out)) for c in calls]
    for proc in procs:
        proc.start()
    try:
        collected = []
        for _ in procs:
            try:
                collected.extend(out.get(timeout=120))
            except queue.Empty:
                pytest.fail("a writer process reported nothing")
        return collected
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


WRITERS, CALLS_EACH = 6, 5


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_concurrent_writers_never_exceed_the_active_limit(store_target: StoreConfig, how: str) -> None:
    db = store_target
    with Store(db) as store:
        for state in TaskState:
            _drive_to(store, state)  # three active tasks, three finished ones
    limit = 8
    calls = [
        [
            {"kind": "import-snapshot", "params": {"w": w, "i": i}, "max_active": limit}
            for i in range(CALLS_EACH)
        ]
        for w in range(WRITERS)
    ]
    results = run_writers(how, db, calls)
    created = [r for r in results if isinstance(r, str)]
    assert len(created) == limit - 3
    assert [r for r in results if not isinstance(r, str)] == [("limit", limit)] * (
        WRITERS * CALLS_EACH - len(created)
    )
    with Store(db) as store:
        assert len(store.list_tasks(ACTIVE_STATES, limit=None)) == limit


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_concurrent_writers_with_one_client_token_create_one_task(
    store_target: StoreConfig, how: str
) -> None:
    db = store_target
    Store(db).close()
    call = {
        "kind": "import-snapshot",
        "params": {"key": "a"},
        "client_token": "tok",
        "client_account": "acct",
    }
    results = run_writers(how, db, [[call] * CALLS_EACH] * WRITERS)
    assert len(results) == WRITERS * CALLS_EACH
    assert len(set(results)) == 1
    with Store(db) as store:
        assert [t.id for t in store.list_tasks(limit=None)] == results[:1]


def _old_database(
    target: StoreConfig, version: int, rows: list[tuple[str, str, dict[str, Any], str]]
) -> None:
    """A database as the code of schema ``version`` left it, with tasks ``(id, kind, params, created_at)``."""
    db = open_database(target)
    try:
        with db.transaction() as conn:
            for statements in MIGRATIONS[:version]:
                for statement in statements:
                    text = migration_sql(statement, conn.dialect)
                    if text is not None:
                        conn.execute(text)
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            for task_id, kind, params, created in rows:
                conn.execute(
                    "INSERT INTO tasks (id, kind, params, state, created_at, updated_at)"
                    " VALUES (?, ?, ?, 'pending', ?, ?)",
                    (task_id, kind, json.dumps(params, sort_keys=True), created, created),
                )
    finally:
        db.close()


def test_old_database_upgrades_and_keeps_its_client_tokens(store_target: StoreConfig) -> None:
    t = "2025-01-01T00:00:0{}.000000Z".format
    _old_database(
        store_target,
        3,  # the schema before client tokens had a column
        [
            # two tasks for one token: what check-then-insert let through
            ("import-snap-old", "import-snapshot", {"client_token": "tok", "key": "a"}, t(1)),
            ("import-snap-new", "import-snapshot", {"client_token": "tok", "key": "a"}, t(2)),
            ("import-ami-1", "import-image", {"client_token": "tok", "key": "a"}, t(3)),
            ("import-snap-untokened", "import-snapshot", {"client_token": "", "key": "a"}, t(4)),
            ("t-workflow", "workflow", {"client_token": "tok"}, t(5)),
        ],
    )
    with Store(store_target) as store:
        assert store.schema_version == len(MIGRATIONS)
        tokens = dict(
            (r[0], r[1])
            for r in sql(store_target, "SELECT id, client_token FROM tasks WHERE client_token IS NOT NULL")
        )
        # the newest of the two, the one the old code answered repeats with, keeps the token
        assert tokens == {"import-snap-new": "tok", "import-ami-1": "tok"}
        repeat = store.create_task(
            "import-snapshot", params={"client_token": "tok", "key": "a"}, client_token="tok"
        )
        assert repeat.id == "import-snap-new"
        with pytest.raises(IdempotentParameterMismatch):
            store.create_task(
                "import-snapshot", params={"client_token": "tok", "key": "b"}, client_token="tok"
            )
        assert store.get_task("import-snap-old").params["client_token"] == "tok"
    with Store(store_target) as store:  # migrated once
        assert store.schema_version == len(MIGRATIONS)


# -- what must not interleave, with several writers ------------------------------------------------


def _open_and_report(url: str, start: Any, out: Any) -> None:
    start.wait()
    try:
        with Store(url) as store:
            out.put(("ok", store.schema_version))
    except Exception as exc:  # reported to the test, which names it
        out.put(("error", repr(exc)))


def test_stores_opening_a_new_database_together_migrate_it_once(store_target: StoreConfig) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open_and_report, args=(store_target.url, start, out)) for _ in range(3)]
    for proc in procs:
        proc.start()
    try:
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
    assert results == [("ok", len(MIGRATIONS))] * 3
    assert sql(store_target, "SELECT COUNT(*) FROM schema_version")[0][0] == 1


def _together(n: int, work: Any) -> list[Any]:
    """``work(i)`` in ``n`` threads released at once; each result, or the exception it raised."""
    start = threading.Barrier(n)

    def run(i: int) -> Any:
        start.wait()
        try:
            return work(i)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_concurrent_writers_of_one_task_lose_no_finding_and_no_progress(
    store: Store, store_target: StoreConfig
) -> None:
    task_id = _drive_to(store, TaskState.RUNNING)
    writers = [Store(store_target) for _ in range(6)]
    try:

        def work(i: int) -> None:
            for j in range(5):
                writers[i].add_findings(task_id, [Finding.info(f"Test.W{i}", f"finding {j}")])
                writers[i].update_progress(task_id, phase="copy", bytes_done=i * 100 + j, percent=i * 10 + j)

        assert _together(6, work) == [None] * 6
    finally:
        for w in writers:
            w.close()
    task = store.get_task(task_id)
    assert len(task.findings) == 30  # each read-modify-write saw the ones before it
    assert (task.bytes_done, task.percent) == (504, 54)  # the largest, whatever the order


def test_of_concurrent_takeovers_of_an_orphan_exactly_one_wins(
    store: Store, store_target: StoreConfig
) -> None:
    recoverers = [Store(store_target) for _ in range(6)]
    try:
        for _ in range(5):
            task_id = store.create_task("workflow").id
            store.claim(task_id, "dead-host:1", 30)
            take_over = functools.partial(_take_over, recoverers, task_id)
            results = _together(6, take_over)
            won = [r for r in results if not isinstance(r, Exception)]
            assert len(won) == 1, results
            assert all(isinstance(r, IncorrectState) for r in results if isinstance(r, Exception))
            task = store.get_task(task_id)
            assert (task.owner, task.attempts) == (won[0].owner, 2)
    finally:
        for r in recoverers:
            r.close()


def _take_over(recoverers: list[Store], task_id: str, i: int) -> Any:
    return recoverers[i].claim(task_id, f"host-{i}:1", 30, expected_owner="dead-host:1")


def _advisory_lock_waiters(target: StoreConfig) -> int:
    rows = sql(target, "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    return int(rows[0][0])


@pytest.mark.backends("postgresql")
def test_an_event_id_never_becomes_visible_before_a_smaller_one(
    store: Store, store_target: StoreConfig
) -> None:
    """A reader that remembers the last event id it saw (the controller reporting) must never see an
    id while a smaller one is still uncommitted: it would skip that one for good."""
    task_id = store.create_task("workflow").id
    mark = store.events()[-1].id
    holding, release = threading.Event(), threading.Event()

    def slow() -> None:  # an event inserted, its transaction not yet committed
        with store._write() as conn:
            store._event(conn, task_id, "slow", {}, "2025-01-01T00:00:00.000000Z")
            holding.set()
            release.wait(60)

    other = Store(store_target)
    first = threading.Thread(target=slow)
    first.start()
    try:
        assert holding.wait(30)
        second = threading.Thread(target=lambda: other.add_event(task_id, "fast"))
        second.start()
        # the second writer waits for the first to commit instead of taking the next id and committing
        wait_until(lambda: _advisory_lock_waiters(store_target) == 1, 30, "the second event to wait its turn")
        assert store.events(since_id=mark) == []
    finally:
        release.set()
        first.join(30)
    second.join(30)
    events = store.events(since_id=mark)
    assert [e.kind for e in events] == ["slow", "fast"] and events[0].id < events[1].id
    other.close()
