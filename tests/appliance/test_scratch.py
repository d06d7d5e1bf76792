"""Scratch space: private per-task dirs, a quota shared across processes, orphan clean-up."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.allowance import Allowance
from appliance.errors import InsufficientScratch, UsageError
from appliance.scratch import ACCOUNTING_FILES, ScratchSpace
from tests.mounts import tmpfs

MiB = 1024 * 1024
GiB = 1024 * MiB


def test_task_dir_is_private(tmp_path: Path) -> None:
    space = ScratchSpace(tmp_path / "scratch", quota=10 * MiB)
    old = os.umask(0)
    try:
        scratch = space.for_task("t-1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(scratch.path.stat().st_mode) == 0o700
    assert scratch.path.parent == tmp_path / "scratch"


def test_reservation_over_quota_fails_clearly_and_reserves_nothing(tmp_path: Path) -> None:
    space = ScratchSpace(tmp_path, quota=10 * MiB)
    a = space.for_task("a")
    a.reserve(6 * MiB, "download")
    b = space.for_task("b")
    with pytest.raises(InsufficientScratch) as exc:
        b.reserve(5 * MiB, "conversion")
    assert exc.value.code == "InsufficientScratch"
    assert "conversion needs 5.0 MiB" in exc.value.message
    assert "4.0 MiB" in exc.value.message
    assert b.reserved == 0
    assert space.reserved() == 6 * MiB


def test_release_frees_quota_for_others(tmp_path: Path) -> None:
    space = ScratchSpace(tmp_path, quota=10 * MiB)
    a = space.for_task("a")
    rid = a.reserve(8 * MiB, "x")
    b = space.for_task("b")
    with pytest.raises(InsufficientScratch):
        b.reserve(4 * MiB, "y")
    a.release(rid)
    a.release(rid)  # idempotent
    b.reserve(4 * MiB, "y")
    assert space.reserved() == 4 * MiB


def test_cleanup_removes_dir_and_its_reservations(tmp_path: Path) -> None:
    space = ScratchSpace(tmp_path, quota=10 * MiB)
    a = space.for_task("a")
    a.reserve(9 * MiB, "x")
    (a.path / "data").write_bytes(b"x" * 100)
    a.cleanup()
    assert not a.path.exists()
    assert space.reserved() == 0
    space.for_task("b").reserve(9 * MiB, "y")


def test_reservation_beyond_filesystem_free_space_fails(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    fs_free = st.f_bavail * st.f_frsize
    space = ScratchSpace(tmp_path, quota=fs_free * 4, min_free=0)
    with pytest.raises(InsufficientScratch, match="filesystem"):
        space.for_task("a").reserve(fs_free * 2, "huge")


def test_rejects_task_ids_that_escape_the_root(tmp_path: Path) -> None:
    space = ScratchSpace(tmp_path / "s", quota=MiB)
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(UsageError):
            space.for_task(bad)


def test_orphans_of_dead_tasks_are_removed_live_ones_kept(tmp_path: Path) -> None:
    space = ScratchSpace(tmp_path, quota=10 * MiB)
    dead = space.for_task("dead")
    dead.reserve(MiB, "x")
    # Pretend a crashed process owned it: a pid that cannot exist.
    meta = json.loads((dead.path / ".scratch.json").read_text())
    meta["pid"] = 2**22 + 12345
    (dead.path / ".scratch.json").write_text(json.dumps(meta))
    kept = space.for_task("kept")
    removed = space.cleanup_orphans(keep=lambda tid: tid == "kept")
    assert removed == [dead.path]
    assert not dead.path.exists()
    assert kept.path.exists()
    assert space.reserved() == 0


def test_orphan_cleanup_spares_dirs_owned_by_a_live_process(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys, time
        from appliance.scratch import ScratchSpace
        ScratchSpace({str(tmp_path)!r}, quota=1 << 30).for_task("other")
        print("ready", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        space = ScratchSpace(tmp_path, quota=1 << 30)
        assert space.cleanup_orphans(keep=lambda tid: False) == []
        assert (tmp_path / "other").is_dir()
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    assert space.cleanup_orphans(keep=lambda tid: False) == [tmp_path / "other"]


def test_orphan_cleanup_removes_a_dir_whose_owner_exited_but_is_not_reaped(tmp_path: Path) -> None:
    # a zombie is a process that has ended: its directory is an orphan like any other
    code = f"from appliance.scratch import ScratchSpace; ScratchSpace({str(tmp_path)!r}, 1).for_task('z')"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # ended, left unreaped
        assert (tmp_path / "z").is_dir()
        space = ScratchSpace(tmp_path, quota=1 << 30)
        assert space.cleanup_orphans(keep=lambda tid: False) == [tmp_path / "z"]
    finally:
        proc.wait(timeout=10)


def test_quota_is_never_exceeded_by_concurrent_processes(tmp_path: Path) -> None:
    # Eight processes race to reserve 3 MiB each against a 10 MiB quota: exactly three may win.
    code = textwrap.dedent(f"""
        import sys
        from appliance.errors import InsufficientScratch
        from appliance.scratch import ScratchSpace
        s = ScratchSpace({str(tmp_path)!r}, quota={10 * MiB}).for_task(sys.argv[1])
        try:
            s.reserve({3 * MiB}, "race")
            print("won")
        except InsufficientScratch:
            print("lost")
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, f"t{i}"], stdout=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    outcomes = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outcomes.count("won") == 3
    assert ScratchSpace(tmp_path, quota=10 * MiB).reserved() == 9 * MiB


def test_usage_counts_allocated_not_apparent_bytes(tmp_path: Path) -> None:
    space = ScratchSpace(tmp_path, quota=10 * MiB)
    t = space.for_task("t")
    with open(t.path / "sparse", "wb") as f:
        f.truncate(100 * MiB)
        f.write(b"x" * 4096)
    assert t.usage() < MiB


def test_a_reservation_of_nothing_succeeds_even_below_the_free_space_floor(tmp_path: Path) -> None:
    space = ScratchSpace(tmp_path, quota=10 * MiB, min_free=1 << 60)  # the filesystem is "full"
    t = space.for_task("t")
    t.reserve(0, "an empty download")
    with pytest.raises(InsufficientScratch) as exc:
        t.reserve(MiB, "a download")
    assert "a download needs 1.0 MiB of scratch" in exc.value.message
    assert "needs 0 B" not in exc.value.message


def test_a_file_already_written_is_not_counted_again_against_the_filesystem(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "scratch", "8m") as root:
        space = ScratchSpace(root, quota=GiB, min_free=0)
        t = space.for_task("t")
        rid = t.reserve(5 * MiB, "downloading the disk")
        (t.path / "source.img").write_bytes(os.urandom(5 * MiB))
        # what a finished download did: trade the reservation for what the file occupies
        t.release(rid)
        t.reserve(os.stat(t.path / "source.img").st_blocks * 512, "downloaded disk")
        with pytest.raises(InsufficientScratch, match="filesystem"):
            t.reserve(4 * MiB, "RAW form of the disk")  # 3 MiB are left, not 8
        t.reserve(2 * MiB, "RAW form of the disk")


def test_resize_checks_only_the_growth_and_leaves_a_refused_reservation_as_it_was(tmp_path: Path) -> None:
    space = ScratchSpace(tmp_path, quota=10 * MiB)
    a, b = space.for_task("a"), space.for_task("b")
    rid = a.reserve(4 * MiB, "download")
    b.reserve(4 * MiB, "other")
    a.resize(rid, 6 * MiB)
    with pytest.raises(InsufficientScratch) as exc:
        a.resize(rid, 7 * MiB)
    assert "download needs 7.0 MiB of scratch but only 6.0 MiB" in exc.value.message
    assert a.reserved == 6 * MiB
    a.resize(rid, MiB)
    assert space.reserved() == 5 * MiB
    with pytest.raises(UsageError):
        a.resize(rid + 100, MiB)


def test_release_step_gives_back_only_that_steps_reservations(tmp_path: Path) -> None:
    t = ScratchSpace(tmp_path, quota=10 * MiB).for_task("t")
    t.for_step("1").reserve(MiB, "downloaded disk")
    t.for_step("2").reserve(2 * MiB, "decompressing")
    t.for_step("2").reserve(3 * MiB, "decompressing more")
    t.reserve(MiB, "no step")
    assert t.release_step("2") == 5 * MiB
    assert sorted((r.step or "-", r.nbytes) for r in t.reservations) == [("-", MiB), ("1", MiB)]
    assert t.release_step("2") == 0


def test_usage_counts_a_file_with_two_links_once(tmp_path: Path) -> None:
    # qemu-img and the guest reader get the image through a hard link in a private directory
    t = ScratchSpace(tmp_path, quota=10 * MiB).for_task("t")
    (t.path / "source.img").write_bytes(os.urandom(4 * MiB))
    (t.path / "isolated").mkdir()
    os.link(t.path / "source.img", t.path / "isolated" / "image")
    assert 4 * MiB <= t.usage() < 5 * MiB


def test_the_peak_is_the_most_reserved_at_once_by_all_tasks_and_outlives_their_directories(
    tmp_path: Path,
) -> None:
    space = ScratchSpace(tmp_path / "scratch", quota=1 << 30)
    assert space.peak() == 0
    a, b = space.for_task("task-a"), space.for_task("task-b")
    ra = a.reserve(100, "download")
    rb = b.reserve(50, "convert")
    a.resize(ra, 300)  # 350 at once
    a.resize(ra, 10)  # shrinking leaves the mark
    b.release(rb)
    allowance = Allowance(b, "decompress", step=64)
    allowance.cover(200)  # 10 + 256: less than the mark
    allowance.release()
    a.cleanup()
    b.cleanup()
    assert space.peak() == 350
    space.reset_peak()
    assert space.peak() == 0
    space.for_task("task-c").reserve(7, "x")
    assert space.peak() == 7


def test_every_file_the_accounting_writes_is_named_as_its_own_and_holds_no_reserved_bytes(
    tmp_path: Path,
) -> None:
    # bench/import_e2e.py counts these files apart from the scratch data, by these names
    space = ScratchSpace(tmp_path / "scratch", quota=1 << 30)
    task = space.for_task("task-a")
    reservation = task.reserve(100, "download")
    space.reset_peak()
    task.release(reservation)
    found = {p.name for p in space.root.rglob("*") if p.is_file()}
    assert found == set(ACCOUNTING_FILES)
    assert space.reserved() == 0
