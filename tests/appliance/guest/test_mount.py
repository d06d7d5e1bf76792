"""appliance.guest.mount on real images with real loop devices: mounts, cleanup on every path, sweep."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from appliance.errors import Cancelled
from appliance.guest.mount import MountFailed, NoRootFilesystem, NotRawImage, mount_guest
from appliance.guest.mountrecord import sweep_stale
from tests.guestfactory import (
    KERNEL,
    OS_RELEASE,
    ROOT_UUID,
    ext4,
    linux_disk,
    loops_of,
    mounts_below,
    partition_image,
    require_loop_root,
)

from ..workflow.support import REPO, wait_until


@pytest.fixture(autouse=True)
def _needs_loop_root() -> None:
    require_loop_root()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return linux_disk(tmp_path, separate_boot=True, programs=True)


def assert_clean(tmp_path: Path, image: Path) -> None:
    assert mounts_below(tmp_path) == []
    assert loops_of(image) == ""


def test_chroot_command_sees_the_guests_os_release_and_fstab_mounts(tmp_path: Path, disk: Path) -> None:
    state = tmp_path / "state"
    with mount_guest(disk, chroot=True, owner="t-1", state_dir=state) as gm:
        out = subprocess.run(
            ["chroot", str(gm.root), "/bin/cat", "/etc/os-release"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout == OS_RELEASE
        assert gm.root_device == f"{gm.loop}p2"
        # /boot comes from the guest's fstab (UUID= of partition 1), mounted under the guest root
        assert (gm.root / "boot" / KERNEL).is_file()
        assert str(gm.root / "boot") in gm.mounts
        # the chroot gets a minimal /dev, not the host's disks
        assert (gm.root / "dev" / "null").exists() and not list((gm.root / "dev").glob("loop*"))
        record = json.loads((state / "mounts" / "t-1.json").read_text())
        assert record["pid"] == os.getpid() and record["loop"] == gm.loop
        assert record["mounts"] == gm.mounts
    assert_clean(tmp_path, disk)
    assert list((state / "mounts").iterdir()) == []


def test_gpt_disk_mounts_its_root(tmp_path: Path) -> None:
    disk = linux_disk(tmp_path, table="gpt", separate_boot=True, programs=True)
    with mount_guest(disk, owner="gpt", state_dir=tmp_path / "state") as gm:
        assert gm.fs.read_text("/etc/os-release") == OS_RELEASE
        assert {p.number for p in gm.partitions} == {1, 2}
        assert all(p.partuuid for p in gm.partitions)  # GPT partition GUIDs were probed
    assert_clean(tmp_path, disk)


def test_bare_filesystem_image_is_mounted_from_the_loop_device_itself(tmp_path: Path) -> None:
    image = partition_image(tmp_path)
    with mount_guest(image, owner="bare", state_dir=tmp_path / "state") as gm:
        assert gm.root_device == gm.loop
        assert [(p.number, p.fstype, p.uuid) for p in gm.partitions] == [(None, "ext4", ROOT_UUID)]
        assert gm.fs.read_text("/etc/os-release") == OS_RELEASE
    assert_clean(tmp_path, image)


def test_read_only_mount_refuses_writes(tmp_path: Path, disk: Path) -> None:
    with mount_guest(disk, owner="ro", state_dir=tmp_path / "state") as gm:
        with pytest.raises(OSError) as exc:
            (gm.root / "etc" / "new-file").write_text("x")
        assert exc.value.errno == errno.EROFS
        ro = subprocess.run(["blockdev", "--getro", gm.loop], capture_output=True, text=True, check=True)
        assert ro.stdout.strip() == "1"  # the loop device itself is read-only too
    assert_clean(tmp_path, disk)


def test_an_exception_inside_unmounts_and_detaches(tmp_path: Path, disk: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        mount_guest(disk, chroot=True, owner="exc", state_dir=tmp_path / "state") as gm,
    ):
        assert mounts_below(gm.root)
        raise RuntimeError("boom")
    assert_clean(tmp_path, disk)


def test_cancel_during_setup_raises_cancelled_and_undoes_the_loop_device(tmp_path: Path, disk: Path) -> None:
    cancel = threading.Event()
    seen: list[tuple[str, str]] = []

    def on_change(action: str, resource: str) -> None:
        seen.append((action, resource))
        if resource.startswith("loop:"):
            cancel.set()  # as a cancel request arriving while the partitions are being mapped

    with (
        pytest.raises(Cancelled),
        mount_guest(disk, owner="cancel", state_dir=tmp_path / "state", cancel=cancel, on_change=on_change),
    ):
        pytest.fail("the body must not run after a cancel")
    assert_clean(tmp_path, disk)
    loop = seen[0][1]
    assert seen == [("created", loop), ("removed", loop)]


def test_container_formats_are_refused(tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
    with pytest.raises(NotRawImage) as exc, mount_guest(qcow2, owner="q", state_dir=tmp_path / "state"):
        pass
    assert exc.value.code == "Guest.NotRaw" and "convert it to raw" in exc.value.message
    raw = tmp_path / "claimed.raw"
    raw.write_bytes(b"\0" * 4096)
    with pytest.raises(NotRawImage), mount_guest(raw, fmt="vmdk", owner="q", state_dir=tmp_path / "state"):
        pass
    assert loops_of(qcow2) == "" and loops_of(raw) == ""


def test_a_disk_without_a_system_filesystem_has_no_root(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "files").mkdir(parents=True)
    (data / "files" / "a").write_text("payload")
    image = ext4(tmp_path / "data.ext4", 8, data, uuid="5a1e0b1c-0000-4000-8000-00000000d003")
    with pytest.raises(NoRootFilesystem) as exc, mount_guest(image, owner="d", state_dir=tmp_path / "state"):
        pass
    assert exc.value.code == "Guest.NoRootFilesystem" and "ext4" in exc.value.message
    assert_clean(tmp_path, image)


def test_an_unmountable_image_fails_with_a_code(tmp_path: Path) -> None:
    junk = tmp_path / "junk.raw"
    junk.write_bytes(os.urandom(1024 * 1024))
    with (
        pytest.raises((MountFailed, NoRootFilesystem)) as exc,
        mount_guest(junk, owner="j", state_dir=tmp_path / "state"),
    ):
        pass
    assert exc.value.code.startswith("Guest.")
    assert_clean(tmp_path, junk)


def test_fstab_mount_point_symlinked_to_the_host_is_not_followed(tmp_path: Path) -> None:
    host_dir = tmp_path / "host-boot"
    host_dir.mkdir()

    def boot_links_out(tree: Path) -> None:
        (tree / "boot").rmdir()
        (tree / "boot").symlink_to(host_dir)  # absolute: on the host it would be tmp_path/host-boot

    disk = linux_disk(tmp_path, separate_boot=True, programs=True, tree_hook=boot_links_out)
    with mount_guest(disk, owner="sym", state_dir=tmp_path / "state") as gm:
        assert mounts_below(host_dir) == []
        assert any(s["mount_point"] == "/boot" for s in gm.skipped)  # resolved in the guest: absent there
    assert_clean(tmp_path, disk)


def test_sweep_leaves_a_live_owner_alone(tmp_path: Path, disk: Path) -> None:
    state = tmp_path / "state"
    with mount_guest(disk, owner="live", state_dir=state) as gm:
        assert sweep_stale(state) == []
        assert mounts_below(gm.root) and loops_of(disk)
    assert_clean(tmp_path, disk)


_HOLDER = """
import subprocess, sys, time
sys.path.insert(0, {repo!r})
from appliance.guest.mount import mount_guest
with mount_guest({disk!r}, chroot=True, owner="victim", state_dir={state!r}) as gm:
    child = subprocess.Popen(["chroot", str(gm.root), "/bin/sleep", "300"])
    print(child.pid, flush=True)
    time.sleep(300)
"""


@pytest.mark.slow
def test_kill_9_mid_chroot_leaves_entries_that_sweep_stale_removes(tmp_path: Path, disk: Path) -> None:
    state = tmp_path / "state"
    code = _HOLDER.format(repo=str(REPO), disk=str(disk), state=str(state))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        chroot_pid = int(holder.stdout.readline())
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert mounts_below(tmp_path) and loops_of(disk)  # the crash left everything behind
    assert (state / "mounts" / "victim.json").exists()

    cleaned = sweep_stale(state)
    assert any("detached /dev/loop" in line for line in cleaned)
    assert any(line.endswith("/root") and "unmounted" in line for line in cleaned)
    assert_clean(tmp_path, disk)
    assert list((state / "mounts").iterdir()) == []
    wait_until(lambda: not os.path.exists(f"/proc/{chroot_pid}"), 5, "the orphaned chroot process to die")
    assert sweep_stale(state) == []  # idempotent


@pytest.mark.slow
def test_concurrent_sweeps_clean_a_stale_entry_once(tmp_path: Path, disk: Path) -> None:
    state = tmp_path / "state"
    code = _HOLDER.format(repo=str(REPO), disk=str(disk), state=str(state))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    results: list[list[str]] = []
    sweepers = [threading.Thread(target=lambda: results.append(sweep_stale(state))) for _ in range(3)]
    for t in sweepers:
        t.start()
    for t in sweepers:
        t.join(timeout=60)
    detaches = [line for r in results for line in r if "detached" in line]
    assert len(detaches) == 1
    assert_clean(tmp_path, disk)


def test_a_dirty_journal_is_not_replayed_on_a_read_only_mount(tmp_path: Path) -> None:
    image = partition_image(tmp_path)
    # as after a crash of the guest: the kernel would want to replay the journal (a write)
    subprocess.run(
        ["debugfs", "-w", "-R", "feature needs_recovery", str(image)], check=True, capture_output=True
    )
    before = image.read_bytes()
    with mount_guest(image, owner="dirty", state_dir=tmp_path / "state") as gm:
        assert gm.fs.read_text("/etc/os-release") == OS_RELEASE
    assert image.read_bytes() == before
    assert_clean(tmp_path, image)


@pytest.mark.slow
def test_worker_sweep_after_a_killed_task_records_cleanup_in_its_ledger(tmp_path: Path, disk: Path) -> None:
    from appliance import config as config_mod
    from appliance.service.worker import sweep_mounts
    from appliance.store import Store

    config = config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)
    store = Store(config.db_path)
    task = store.create_task("workflow", "convert-image", {})
    code = _HOLDER.format(repo=str(REPO), disk=str(disk), state=str(config.state_dir)).replace(
        'owner="victim"', f'owner="{task.id}"'
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    cleaned = sweep_mounts(config, store)
    assert cleaned
    assert_clean(tmp_path, disk)
    removed = [e.resource for e in store.ledger(task.id) if e.action == "removed"]
    assert any(r.startswith("loop:/dev/loop") for r in removed)
    assert any(r.startswith("mount:") and r.endswith("/root") for r in removed)


# --- undo and sweep robustness ---------------------------------------------------------------------


def attach(image: Path) -> str:
    """Attach ``image`` read-only to a loop device ourselves, as a killed owner's losetup would have."""
    return subprocess.run(
        ["losetup", "--show", "-f", "-r", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()


def dead_record(mounts: Path, name: str, image: Path, *, loop: str | None = None) -> Path:
    """A mount record as a killed owner leaves it (its pid exited; the start time cannot match)."""
    mounts.mkdir(parents=True, exist_ok=True)
    st = image.stat()
    record = {
        "owner": name,
        "pid": 0,  # no process has pid 0 (and no start time "0")
        "pid_start": "0",
        "image": str(image),
        "workdir": str(mounts / f"{name}.d"),
        "loop": loop,
        "backing": [st.st_dev, st.st_ino],
        "backing_path": str(image),
        "mounts": [],
    }
    path = mounts / f"{name}.json"
    path.write_text(json.dumps(record))
    return path


def test_an_undo_failure_does_not_mask_the_error_that_ended_the_mount(
    tmp_path: Path, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    empty = tmp_path / "no-tools"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="hook failed"), mount_guest(disk, owner="mask", state_dir=state):
        monkeypatch.setenv("PATH", str(empty))  # umount cannot be found: undoing raises MissingTool
        raise RuntimeError("hook failed")
    monkeypatch.undo()
    # the record stayed for the sweep, which undoes it once the tools are back
    assert (state / "mounts" / "mask.json").exists() and mounts_below(tmp_path)
    assert sweep_stale(state)
    assert_clean(tmp_path, disk)


def test_a_loop_attached_but_never_recorded_is_found_by_its_backing_file_and_detached(
    tmp_path: Path, disk: Path
) -> None:
    state = tmp_path / "state"
    seen: list[tuple[str, str, str]] = []
    with mount_guest(disk, owner="live", state_dir=state) as gm:
        orphan = attach(disk)  # the killed owner's losetup attached it; its record never got the name
        dead_record(state / "mounts", "killed", disk)
        cleaned = sweep_stale(state, lambda owner, action, res: seen.append((owner, action, res)))
        assert cleaned == [f"killed: detached {orphan}"]
        assert seen == [("killed", "removed", f"loop:{orphan}")]
        # the live owner's loop device of the same file is untouched
        assert loops_of(disk).splitlines() == [
            line for line in loops_of(disk).splitlines() if gm.loop in line
        ]
        assert gm.fs.read_text("/etc/os-release") == OS_RELEASE
        assert not (state / "mounts" / "killed.json").exists()
    assert_clean(tmp_path, disk)


def test_sweep_skips_a_record_whose_lock_it_may_not_open_and_sweeps_the_rest(
    tmp_path: Path, disk: Path
) -> None:
    state = tmp_path / "state"
    mounts = state / "mounts"
    locked_out = dead_record(mounts, "a-locked-out", disk)
    lock = locked_out.with_suffix(".lock")
    lock.touch(mode=0o600)
    os.chown(lock, 4242, 4242)  # e.g. left by a worker that ran as another user
    loop = attach(disk)
    dead_record(mounts, "b-killed", disk, loop=loop)
    # the sweeper is root without the power to override file permissions (like an unprivileged worker)
    code = f"import json, sys; sys.path.insert(0, {str(REPO)!r}); "
    code += "from appliance.guest.mountrecord import sweep_stale; "
    code += f"print(json.dumps(sweep_stale({str(state)!r})))"
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [f"b-killed: detached {loop}"]
    assert "permission denied" in proc.stderr
    assert locked_out.exists() and lock.exists()  # skipped, left for a sweeper that may
    assert not (mounts / "b-killed.json").exists()
    assert loops_of(disk) == ""


def test_a_record_gone_between_listing_and_locking_leaves_no_lock_file(tmp_path: Path, disk: Path) -> None:
    state = tmp_path / "state"
    mounts = state / "mounts"
    dead_record(mounts, "a-killed", disk, loop=attach(disk))
    finished = dead_record(mounts, "b-finishing", disk)

    def owner_b_finishes(owner: str, action: str, resource: str) -> None:
        finished.unlink()  # b's owner closes its record while the sweep is busy with a

    assert len(sweep_stale(state, owner_b_finishes)) == 1
    assert sorted(p.name for p in mounts.iterdir()) == []
    assert loops_of(disk) == ""
