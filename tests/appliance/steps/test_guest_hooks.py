"""The shipped guest hooks (``hook.inject-metadata``, ``hook.run-in-guest``) on real images.

What the hooks wrote is checked with ``debugfs`` on the image file, without mounting it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.store import Task, TaskState
from appliance.workflow import Engine
from tests.guestfactory import (
    debugfs_cat,
    debugfs_stat,
    linux_disk,
    loops_of,
    mounts_below,
    partition_offset,
    require_loop_root,
)

from ..workflow.support import make_config, make_registry, write_workflow

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMarkerKeyForTestsOnly000000000000000000 test@imaging"


@pytest.fixture(autouse=True)
def _needs_loop_root() -> None:
    require_loop_root()


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = Engine(make_config(tmp_path), registry=make_registry(), poll_interval=0.05)
    yield e
    e.store.close()


def hook(engine: Engine, tmp_path: Path, action: str, args: dict[str, Any]) -> Task:
    write_workflow(tmp_path, "w", {"steps": [{"name": "h", "action": action, "with": args, "register": "h"}]})
    return engine.run(engine.submit("w"))


def guest_file(disk: Path, path: str) -> str | None:
    """A file of the root filesystem (partition 2), read without mounting."""
    return debugfs_cat(disk, path, partition_offset(disk, 2))


def guest_stat(disk: Path, path: str) -> tuple[str, int, int]:
    out = debugfs_stat(disk, path, partition_offset(disk, 2))
    mode = re.search(r"Mode:\s+(\d+)", out).group(1)
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    return mode, int(owner.group(1)), int(owner.group(2))


def assert_clean(tmp_path: Path, disk: Path) -> None:
    assert mounts_below(tmp_path) == [] and loops_of(disk) == ""


def test_inject_metadata_writes_a_marker_file_with_mode_owner_and_manifest(
    engine: Engine, tmp_path: Path
) -> None:
    disk = linux_disk(tmp_path, separate_boot=True, programs=True)
    source = tmp_path / "motd"
    source.write_text("welcome\n")
    image = {"path": str(disk), "format": "raw", "virtual_size": disk.stat().st_size}
    files = [
        {
            "path": "/etc/imaging-marker",
            "content": "imported by the appliance\n",
            "mode": "0640",
            "owner": "alice",
        },
        {"path": "/opt/new/dir/motd", "source": str(source)},
    ]
    task = hook(engine, tmp_path, "hook.inject-metadata", {"image": image, "files": files})
    assert task.state is TaskState.COMPLETED, task.error_message
    assert task.result["h"]["image"] == image  # the hook interface: the image passes through
    assert guest_file(disk, "/etc/imaging-marker") == "imported by the appliance\n"
    assert guest_stat(disk, "/etc/imaging-marker") == ("0640", 1000, 1001)
    assert guest_file(disk, "/opt/new/dir/motd") == "welcome\n"
    changes = [e.data["changes"] for e in engine.store.events(task_id=task.id) if e.kind == "guest.changes"]
    assert changes == [task.result["h"]["changes"]]
    assert [(c["path"], c["sha256"]) for c in changes[0]] == [
        ("/etc/imaging-marker", hashlib.sha256(b"imported by the appliance\n").hexdigest()),
        ("/opt/new/dir/motd", hashlib.sha256(b"welcome\n").hexdigest()),
    ]
    assert_clean(tmp_path, disk)


def test_ssh_keys_go_to_the_guest_users_home_with_its_uid_and_strict_modes(
    engine: Engine, tmp_path: Path
) -> None:
    disk = linux_disk(tmp_path, separate_boot=True, programs=True)
    args = {
        "image": {"path": str(disk), "format": "raw"},
        "ssh_authorized_keys": {"user": "alice", "keys": [KEY]},
    }
    assert hook(engine, tmp_path, "hook.inject-metadata", args).state is TaskState.COMPLETED
    assert guest_file(disk, "/home/alice/.ssh/authorized_keys") == KEY + "\n"
    assert guest_stat(disk, "/home/alice/.ssh") == ("0700", 1000, 1001)
    assert guest_stat(disk, "/home/alice/.ssh/authorized_keys") == ("0600", 1000, 1001)
    # a second injection of the same key does not duplicate it
    assert hook(engine, tmp_path, "hook.inject-metadata", args).state is TaskState.COMPLETED
    assert guest_file(disk, "/home/alice/.ssh/authorized_keys") == KEY + "\n"


def test_cloud_init_seed_is_written_and_found_after_remounting(engine: Engine, tmp_path: Path) -> None:
    disk = linux_disk(tmp_path, separate_boot=True, programs=True)
    seed = {
        "meta_data": {"instance-id": "i-0123", "local-hostname": "imported"},
        "user_data": {"disable_root": False, "ssh_authorized_keys": [KEY]},
        "network_config": "version: 2\nethernets: {}\n",
    }
    args = {"image": {"path": str(disk), "format": "raw"}, "cloud_init_seed": seed}
    assert hook(engine, tmp_path, "hook.inject-metadata", args).state is TaskState.COMPLETED
    check = hook(
        engine,
        tmp_path,
        "hook.run-in-guest",
        {
            "image": {"path": str(disk), "format": "raw"},
            "command": "cat /var/lib/cloud/seed/nocloud/user-data",
        },
    )
    assert check.state is TaskState.COMPLETED, check.error_message
    user_data = check.result["h"]["run"]["stdout_tail"]
    assert user_data.startswith("#cloud-config\n")
    assert yaml.safe_load(user_data) == seed["user_data"]
    assert yaml.safe_load(guest_file(disk, "/var/lib/cloud/seed/nocloud/meta-data")) == seed["meta_data"]
    assert guest_file(disk, "/var/lib/cloud/seed/nocloud/network-config") == seed["network_config"]
    assert guest_stat(disk, "/var/lib/cloud/seed/nocloud/user-data")[0] == "0600"
    assert_clean(tmp_path, disk)


def test_dotdot_escape_is_refused_and_nothing_is_written(engine: Engine, tmp_path: Path) -> None:
    disk = linux_disk(tmp_path, separate_boot=True, programs=True)
    before = disk.read_bytes()
    target = tmp_path / "escaped"
    files = [{"path": f"/../../../../../..{target}", "content": "x"}]
    task = hook(engine, tmp_path, "hook.inject-metadata", {"image": {"path": str(disk)}, "files": files})
    assert (task.state, task.error_code) == (TaskState.FAILED, "Guest.UnsafePath")
    assert not target.exists()
    assert disk.read_bytes() == before  # refused before the guest was even mounted
    assert_clean(tmp_path, disk)


def test_guest_symlink_to_a_host_file_is_refused(engine: Engine, tmp_path: Path) -> None:
    host_target = tmp_path / "host-file"

    def motd_links_out(tree: Path) -> None:
        (tree / "etc" / "motd").symlink_to(host_target)

    disk = linux_disk(tmp_path, separate_boot=True, programs=True, tree_hook=motd_links_out)
    files = [{"path": "/etc/motd", "content": "owned\n"}]
    task = hook(engine, tmp_path, "hook.inject-metadata", {"image": {"path": str(disk)}, "files": files})
    assert (task.state, task.error_code) == (TaskState.FAILED, "Guest.UnsafePath")
    assert "symlink" in task.error_message
    assert not host_target.exists()
    assert_clean(tmp_path, disk)


def test_guest_directory_symlink_to_the_host_resolves_inside_the_guest(
    engine: Engine, tmp_path: Path
) -> None:
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()

    def ssh_links_out(tree: Path) -> None:
        (tree / "home" / "alice" / ".ssh").symlink_to(host_dir)  # absolute, as an attacker would

    disk = linux_disk(tmp_path, separate_boot=True, programs=True, tree_hook=ssh_links_out)
    args = {"image": {"path": str(disk)}, "ssh_authorized_keys": {"user": "alice", "keys": [KEY]}}
    task = hook(engine, tmp_path, "hook.inject-metadata", args)
    assert task.state is TaskState.COMPLETED, task.error_message
    assert list(host_dir.iterdir()) == []  # nothing on the host
    # the guest would follow the link inside itself: the key is at <guest>/<host_dir>/authorized_keys
    assert guest_file(disk, f"{host_dir}/authorized_keys") == KEY + "\n"
    assert_clean(tmp_path, disk)


def test_unknown_guest_user_fails_with_a_code(engine: Engine, tmp_path: Path) -> None:
    disk = linux_disk(tmp_path, separate_boot=True, programs=True)
    args = {"image": {"path": str(disk)}, "ssh_authorized_keys": {"user": "mallory", "keys": [KEY]}}
    task = hook(engine, tmp_path, "hook.inject-metadata", args)
    assert (task.state, task.error_code) == (TaskState.FAILED, "Guest.UnknownUser")
    assert_clean(tmp_path, disk)


def test_hooks_refuse_a_non_raw_image(engine: Engine, tmp_path: Path) -> None:
    disk = linux_disk(tmp_path, separate_boot=True, programs=True)
    image = {"path": str(disk), "format": "vhdx"}
    inject = hook(engine, tmp_path, "hook.inject-metadata", {"image": image, "files": []})
    run = hook(engine, tmp_path, "hook.run-in-guest", {"image": image, "command": "true"})
    assert inject.error_code == run.error_code == "Guest.NotRaw"


def test_run_in_guest_is_read_only_and_returns_the_image_unchanged(engine: Engine, tmp_path: Path) -> None:
    disk = linux_disk(tmp_path, separate_boot=True, programs=True)
    image = {"path": str(disk), "format": "raw"}
    scan = hook(engine, tmp_path, "hook.run-in-guest", {"image": image, "command": ["/bin/ls", "/etc"]})
    assert scan.state is TaskState.COMPLETED, scan.error_message
    assert scan.result["h"]["image"] == image
    assert "os-release" in scan.result["h"]["run"]["stdout_tail"].split("\n")
    write = hook(engine, tmp_path, "hook.run-in-guest", {"image": image, "command": "echo x > /etc/scanned"})
    assert (write.state, write.error_code) == (TaskState.FAILED, "Run.Failed")
    allowed = hook(
        engine,
        tmp_path,
        "hook.run-in-guest",
        {"image": image, "command": "echo x > /etc/scanned", "writable": True},
    )
    assert allowed.state is TaskState.COMPLETED
    assert guest_file(disk, "/etc/scanned") == "x\n"
    assert_clean(tmp_path, disk)


def test_writing_below_a_guest_file_fails_with_a_code_and_keeps_the_manifest(
    engine: Engine, tmp_path: Path
) -> None:
    disk = linux_disk(tmp_path, separate_boot=True, programs=True)
    files = [{"path": "/etc/first", "content": "1\n"}, {"path": "/etc/os-release/child", "content": "x"}]
    task = hook(engine, tmp_path, "hook.inject-metadata", {"image": {"path": str(disk)}, "files": files})
    assert (task.state, task.error_code) == (TaskState.FAILED, "Guest.WriteFailed")
    changes = [e.data["changes"] for e in engine.store.events(task_id=task.id) if e.kind == "guest.changes"]
    assert [c["path"] for c in changes[0]] == ["/etc/first"]  # what was written before the failure
    assert guest_file(disk, "/etc/first") == "1\n"
    assert_clean(tmp_path, disk)


def test_run_in_guest_cannot_reach_the_host_through_proc(engine: Engine, tmp_path: Path) -> None:
    disk = linux_disk(tmp_path, separate_boot=True, programs=True)
    secret = tmp_path / "host-only-secret"
    secret.write_text("s3cr3t-of-the-host\n")
    command = f"cat /proc/1/root{secret} /proc/$PPID/root{secret}; ls -d /proc/[0-9]*"
    image = {"path": str(disk), "format": "raw"}
    run = hook(engine, tmp_path, "hook.run-in-guest", {"image": image, "command": command})
    assert run.state is TaskState.COMPLETED, run.error_message
    out = run.result["h"]["run"]
    assert "s3cr3t" not in out["stdout_tail"] + out["stderr_tail"]
    assert out["stderr_tail"].count("No such file") == 2
    # only the sandbox's own processes: its init, the shell, ls
    assert set(out["stdout_tail"].split("\n")) <= {"/proc/1", "/proc/2", "/proc/3"}
    assert_clean(tmp_path, disk)
