"""Partial outputs (appliance.partials): private, announced before they exist, swept from the ledger."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.partials import is_partial, partial_file, publish, sweep
from appliance.store import Store, TaskState


class RecordingLedger:
    """Stands where a workflow step's context would."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, bool]] = []  # (action, path, whether it existed then)

    def ledger_created(self, resource: str | Path) -> None:
        self.entries.append(("created", str(resource), os.path.lexists(resource)))

    def ledger_removed(self, resource: str | Path) -> None:
        self.entries.append(("removed", str(resource), os.path.lexists(resource)))


def mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def test_a_partial_is_private_whatever_the_umask_and_in_the_ledger_before_it_exists(tmp_path: Path) -> None:
    ledger = RecordingLedger()
    final = tmp_path / "disk.raw"
    old = os.umask(0o000)
    try:
        with partial_file(final, ledger) as tmp:
            assert mode(tmp) == 0o600 and tmp.read_bytes() == b""
            assert is_partial(tmp) and tmp.parent == tmp_path and tmp.name.startswith(".disk.raw.partial-")
            tmp.write_bytes(b"data")
            publish(tmp, final)
    finally:
        os.umask(old)
    assert ledger.entries == [("created", str(tmp), False), ("removed", str(tmp), False)]
    assert final.read_bytes() == b"data" and mode(final) == 0o666  # the mode a new file gets (umask 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw"]


def test_a_failed_write_removes_the_partial_and_closes_its_ledger_entry(tmp_path: Path) -> None:
    ledger = RecordingLedger()
    with pytest.raises(OSError), partial_file(tmp_path / "out.img", ledger) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("the writer failed")
    assert list(tmp_path.iterdir()) == []
    assert [(a, r) for a, r, _ in ledger.entries] == [("created", str(tmp)), ("removed", str(tmp))]


def test_publish_keeps_the_mode_of_the_file_it_replaces_or_takes_the_one_given(tmp_path: Path) -> None:
    volume = tmp_path / "vol.raw"
    volume.write_bytes(b"old")
    volume.chmod(0o600)
    with partial_file(volume) as tmp:
        tmp.write_bytes(b"new")
        publish(tmp, volume)
    assert volume.read_bytes() == b"new" and mode(volume) == 0o600
    with partial_file(tmp_path / "image.raw") as tmp:
        publish(tmp, tmp_path / "image.raw", 0o640)
    assert mode(tmp_path / "image.raw") == 0o640


def test_sweep_removes_only_open_partials_on_disk_of_tasks_it_may_touch(tmp_path: Path) -> None:
    store = Store(tmp_path / "imaging.db")
    try:
        a = store.create_task("workflow", "w", {}).id
        b = store.create_task("workflow", "w", {}).id
        out = tmp_path / "out"
        out.mkdir()
        left = out / ".disk.raw.partial-0000000a"  # created, never settled, still there: swept
        settled = out / ".disk.raw.partial-0000000b"  # settled: the file there is not the task's
        kept = out / ".disk.raw.partial-0000000c"  # of a task the caller keeps
        not_partial = out / "disk.raw"  # created by a task, but no partial's name
        link = out / ".link.raw.partial-0000000d"  # a symlink is never followed nor removed
        for path in (left, settled, kept, not_partial):
            path.write_bytes(b"x")
        link.symlink_to(not_partial)
        for task, path in ((a, left), (a, settled), (b, kept), (a, not_partial), (a, link)):
            store.add_ledger(task, "created", str(path), "2")
        store.add_ledger(a, "removed", str(settled), "2")
        store.add_ledger(a, "created", ".relative.partial-0000000e", "2")  # not an absolute path

        assert sweep(store, keep=lambda task_id: task_id == b) == [left]
        assert not left.exists() and settled.exists() and kept.exists() and not_partial.exists()
        assert link.is_symlink()
        assert ("removed", str(left), "recovery") in [(e.action, e.resource, e.step) for e in store.ledger(a)]
        assert sweep(store) == [kept]  # nobody keeps b now; a has nothing left
        assert sweep(store, task_id=a) == []
    finally:
        store.close()


class Stopped(Exception):
    """Stands for a stop that keeps the partial (a cancel, a suspend, a lost lease)."""


def test_a_partial_kept_on_a_stop_is_taken_again_by_the_next_run_then_removed_by_its_failure(
    tmp_path: Path,
) -> None:
    ledger = RecordingLedger()
    final = tmp_path / "image.raw"
    with pytest.raises(Stopped), partial_file(final, ledger, keep_on=(Stopped,)) as first:
        first.write_bytes(b"half")
        raise Stopped
    assert first.read_bytes() == b"half"
    assert [a for a, _p, _e in ledger.entries] == ["created"]  # still the task's, for its next run
    with pytest.raises(ValueError), partial_file(final, ledger, reuse=first, keep_on=(Stopped,)) as again:
        assert again == first and again.read_bytes() == b"half"
        raise ValueError("a failure: nothing is kept")
    assert not first.exists()
    assert [(a, p) for a, p, _e in ledger.entries] == [("created", str(first)), ("removed", str(first))]


def test_only_a_regular_partial_of_the_same_final_name_is_taken_again(tmp_path: Path) -> None:
    final = tmp_path / "image.raw"
    other = tmp_path / ".other.raw.partial-0123abcd"  # another image's partial
    link = tmp_path / ".image.raw.partial-4567cdef"  # a symlink in the partial's place
    plain = tmp_path / "image.raw.partial"  # not named as a partial
    other.write_bytes(b"x")
    plain.write_bytes(b"x")
    link.symlink_to(other)
    for candidate in (other, link, plain, tmp_path / ".image.raw.partial-89abcdef"):  # the last: gone
        with partial_file(final, reuse=candidate) as made:
            assert made != candidate and made.stat().st_size == 0
    assert other.read_bytes() == b"x" and link.is_symlink()


def test_a_resumable_sweep_keeps_the_partial_a_checkpoint_names_until_the_task_is_over(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "imaging.db")
    try:
        task = store.create_task("workflow", "w", {})
        claimed = store.claim(task.id, "host:1", 3600)
        out = tmp_path / "images"
        out.mkdir()
        named = out / f".{task.id}.raw.partial-0000000a"  # the stream step's checkpoint names it
        other = out / f".{task.id}.raw.partial-0000000b"  # a partial nothing resumes
        for path in (named, other):
            path.write_bytes(b"x")
            store.add_ledger(task.id, "created", str(path), "1/include/13")
        store.save_checkpoint(
            task.id, "1/include/13", {"partial": str(named), "offset": 1}, owner="host:1", epoch=claimed.epoch
        )
        assert sweep(store, task_id=task.id, resumable=True) == [other]  # the engine's resume
        assert sweep(store, resumable=True) == []  # the worker's start-up sweep
        assert named.exists()
        store.set_state(task.id, TaskState.FAILED, expected=TaskState.RUNNING)
        assert sweep(store, resumable=True) == [named]  # over: nothing resumes it any more
    finally:
        store.close()
