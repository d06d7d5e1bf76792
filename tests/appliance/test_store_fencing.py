"""Work distribution in the store: claims with leases and fencing epochs, fenced writes, checkpoints,
and doorbells, on SQLite and on PostgreSQL (tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.database import StoreConfig
from appliance.errors import LeaseLost, UsageError
from appliance.store import CHANNEL_CANCEL, CHANNEL_TASKS, Lease, StepState, Store, TaskState

pytestmark = pytest.mark.usefixtures("store_backend")


@pytest.fixture
def store(store_target: StoreConfig) -> Iterator[Store]:
    s = Store(store_target)
    yield s
    s.close()


def _kinds(store: Store, task_id: str) -> list[str]:
    return [e.kind for e in store.events(task_id=task_id)]


def test_every_claim_moves_the_fencing_epoch_on(store: Store) -> None:
    task_id = store.create_task("workflow").id
    assert store.get_task(task_id).epoch == 0
    first = store.claim(task_id, "host-a:1", 30)
    assert first.lease == Lease("host-a:1", 1)
    second = store.claim(task_id, "host-b:2", 30, expected_owner="host-a:1")
    assert second.lease == Lease("host-b:2", 2) and second.attempts == 2
    takeover = [e for e in store.events(task_id=task_id) if e.kind == "task.takeover"]
    assert [e.data for e in takeover] == [
        {"owner": "host-b:2", "previous_owner": "host-a:1", "previous_epoch": 1, "epoch": 2}
    ]


def test_a_former_owners_writes_are_refused_and_change_nothing(store: Store) -> None:
    task_id = store.create_task("workflow").id
    old = store.claim(task_id, "host-a:1", 30).lease
    assert old is not None
    store.record_step(task_id, "0", name="fetch", action="util.echo", state=StepState.RUNNING)
    store.claim(task_id, "host-b:2", 30, expected_owner="host-a:1")  # the lease expired: failover
    before = (store.get_task(task_id), store.step_results(task_id), store.events(task_id=task_id))

    store.hold(task_id, old)  # this store now writes as the former owner
    refused = [
        lambda: store.set_state(task_id, TaskState.COMPLETED),
        lambda: store.update_progress(task_id, percent=50, status_message="stale"),
        lambda: store.add_findings(task_id, [{"code": "X", "severity": "error", "message": "m"}]),
        lambda: store.record_step(task_id, "0", name="fetch", action="util.echo", state=StepState.COMPLETED),
        lambda: store.set_step_state(task_id, "0", StepState.FAILED),
        lambda: store.add_event(task_id, "step.progress", {"done": 1}),
        lambda: store.add_ledger(task_id, "created", "/volumes/vol-1"),
        lambda: store.set_record(task_id, "hooks", {}),
        lambda: store.check_lease(task_id),
        lambda: store.save_checkpoint(task_id, "1", {"offset": 1}, owner=old.owner, epoch=old.epoch),
    ]
    for write in refused:
        with pytest.raises(LeaseLost) as info:
            write()
        assert info.value.code == "TaskLeaseLost"
    assert not store.renew_lease(task_id, "host-a:1", 30)
    assert not store.release(task_id, "host-a:1")
    assert (store.get_task(task_id), store.step_results(task_id), store.events(task_id=task_id)) == before
    assert store.ledger(task_id) == [] and store.load_checkpoint(task_id, "1") is None

    store.hold(task_id, Lease("host-b:2", 2))  # the current owner's writes go through
    store.record_step(task_id, "0", name="fetch", action="util.echo", state=StepState.COMPLETED)
    assert store.set_state(task_id, TaskState.COMPLETED).state is TaskState.COMPLETED


def test_writes_without_a_lease_are_not_fenced_but_a_cancel_always_goes_through(store: Store) -> None:
    task_id = store.create_task("workflow").id
    Store(store.settings).claim(task_id, "host-a:1", 30)  # another process owns it
    store.add_event(task_id, "note", {})  # the API, the CLI: nobody's run
    assert store.request_cancel(task_id, "stop").state is TaskState.CANCELLING


def test_claim_pending_takes_the_oldest_up_to_the_limit(store: Store) -> None:
    ids = [store.create_task("workflow").id for _ in range(3)]
    claimed = store.claim_pending("worker-a:1", 2, 30)
    assert [t.id for t in claimed] == ids[:2]
    assert all(t.state is TaskState.RUNNING and t.lease == Lease("worker-a:1", 1) for t in claimed)
    assert _kinds(store, ids[0])[-2:] == ["task.claimed", "task.state"]
    assert [t.id for t in store.claim_pending("worker-b:1", 5, 30)] == ids[2:]
    assert store.claim_pending("worker-b:1", 5, 30) == []


def test_a_task_process_takes_the_workers_lease_over_within_its_epoch(store: Store) -> None:
    task_id = store.create_task("workflow").id
    (claimed,) = store.claim_pending("worker-a:1", 1, 30)
    assert claimed.lease is not None
    child = Store(store.settings)
    try:
        task = child.adopt(task_id, claimed.lease, "worker-a-task:2", 30)
        assert task.lease == Lease("worker-a-task:2", 1) and child.held(task_id) == task.lease
        child.update_progress(task_id, percent=10)
        with pytest.raises(LeaseLost):  # the worker handed it over: its own lease is spent
            child.adopt(task_id, claimed.lease, "worker-a-task:3", 30)
        store.claim(task_id, "worker-b:1", 30, expected_owner="worker-a-task:2")
        with pytest.raises(LeaseLost):
            child.update_progress(task_id, percent=20)
    finally:
        child.close()


CLAIMER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from appliance.store import Store
    store = Store(sys.argv[1])
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.01)
    got = []
    while True:
        tasks = store.claim_pending(sys.argv[3], 2, 30)
        if not tasks:
            break
        got += [t.id for t in tasks]
    print(json.dumps(got))
    """
)


def test_workers_claiming_together_get_disjoint_tasks(store: Store, tmp_path: Path) -> None:
    ids = {store.create_task("workflow").id for _ in range(24)}
    go = tmp_path / "go"
    claimers = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, store.settings.url, str(go), f"worker-{i}:1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    time.sleep(1.0)  # let them open the store and wait at the start line (not an assertion)
    go.touch()
    got = [json.loads(p.communicate(timeout=120)[0]) for p in claimers]
    assert all(p.returncode == 0 for p in claimers)
    everything = [task_id for ids_of_one in got for task_id in ids_of_one]
    assert sorted(everything) == sorted(ids)  # every task once: none claimed twice, none left
    assert all(store.get_task(t).attempts == 1 and store.get_task(t).epoch == 1 for t in ids)


def test_checkpoints_are_kept_per_step_and_written_only_by_the_lease_holder(store: Store) -> None:
    task_id = store.create_task("workflow").id
    lease = store.claim(task_id, "host-a:1", 30).lease
    assert lease is not None
    assert store.load_checkpoint(task_id, "2") is None
    store.save_checkpoint(task_id, "2", {"part": 3, "offset": 3 << 20}, owner=lease.owner, epoch=lease.epoch)
    store.save_checkpoint(task_id, "2", {"part": 4, "offset": 4 << 20}, owner=lease.owner, epoch=lease.epoch)
    assert store.load_checkpoint(task_id, "2") == {"part": 4, "offset": 4 << 20}
    with pytest.raises(LeaseLost):
        store.save_checkpoint(task_id, "2", {"part": 9}, owner="host-b:2", epoch=lease.epoch)
    with pytest.raises(UsageError):
        store.save_checkpoint(task_id, "2", [1, 2], owner=lease.owner, epoch=lease.epoch)  # type: ignore[arg-type]
    new = store.claim(task_id, "host-b:2", 30, expected_owner="host-a:1").lease
    assert new is not None
    assert store.load_checkpoint(task_id, "2") == {"part": 4, "offset": 4 << 20}  # the new owner reads it
    with pytest.raises(LeaseLost):
        store.save_checkpoint(task_id, "2", {"part": 5}, owner=lease.owner, epoch=lease.epoch)
    store.save_checkpoint(task_id, "2", {"part": 5}, owner=new.owner, epoch=new.epoch)
    assert store.load_checkpoint(task_id, "2") == {"part": 5}


@pytest.mark.backends("postgresql")
def test_new_tasks_and_cancels_ring_the_doorbell(store: Store) -> None:
    listener = store.listen()
    assert listener is not None
    try:
        assert listener.wait(0.1) == []
        task_id = store.create_task("workflow").id
        assert listener.wait(60) == [(CHANNEL_TASKS, task_id)]
        store.claim(task_id, "host-a:1", 30)
        store.request_cancel(task_id, "stop")
        assert listener.wait(60) == [(CHANNEL_CANCEL, task_id)]
    finally:
        listener.close()


@pytest.mark.backends("sqlite")
def test_sqlite_has_no_doorbell(store: Store) -> None:
    assert store.listen() is None
