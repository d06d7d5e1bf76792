"""Operator hooks from cloud-init user data change a real import in the booted appliance.

The appliance boots with an ``after_convert`` ``inject-metadata`` hook in its user data, so
``imaging configure`` adds the worker's drop-in (root, CAP_SYS_ADMIN/CAP_SYS_CHROOT, loop devices)
inside the unit's sandbox. A real bootable Linux disk goes through boto3 ``ImportVolume``; the
volume read back to the host holds the marker file in its ext4 root, and the worker left no loop
device or mount behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.guestfactory import debugfs_cat, linux_disk, partition_offset
from tests.image.conftest import MARKER_CONTENT, MARKER_PATH
from tests.image.ec2 import admin_json, import_volume, read_back, volume_path
from tests.image.vm import Vm
from tests.servers import MotoServer

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1800)]

DROPIN = "/run/systemd/system/imaging-worker.service.d/guest-hooks.conf"


def _worker_pid(vm: Vm) -> str:
    pid = vm.ssh("systemctl show -p MainPID --value imaging-worker.service").stdout.strip()
    assert pid not in ("", "0"), "imaging-worker is not running"
    return pid


def _why_failed(vm: Vm, task: dict[str, Any]) -> str:
    """The task as EC2 shows it plus the worker's journal: what a failed hook left to read."""
    journal = vm.ssh("journalctl -u imaging-worker.service -q --no-pager -n 60", check=False).stdout
    return f"{task}\n--- journalctl -u imaging-worker ---\n{journal}"


def _changes(doc: Any) -> list[dict[str, Any]]:
    """Every guest-change manifest entry (``{path, sha256, ...}``) anywhere in a task detail."""
    if isinstance(doc, list):
        return [c for item in doc for c in _changes(item)]
    if not isinstance(doc, dict):
        return []
    if "path" in doc and "sha256" in doc:
        return [doc]
    return [c for value in doc.values() for c in _changes(value)]


def test_after_convert_hook_from_user_data_stamps_the_imported_volume(
    hooks_vm: Vm, moto: MotoServer, tmp_path: Path
) -> None:
    disk = linux_disk(tmp_path, programs=False)
    offset = partition_offset(disk, 1)
    assert debugfs_cat(disk, MARKER_PATH, offset) is None, "the source must not hold the marker already"

    task = import_volume(hooks_vm, moto, "appliance-hooks-import", disk)
    assert task["State"] == "completed", _why_failed(hooks_vm, task)

    back = read_back(hooks_vm, volume_path(task), disk.stat().st_size, tmp_path / "volume.raw")
    assert debugfs_cat(back, MARKER_PATH, offset) == MARKER_CONTENT
    # only the guest's filesystem changed: the partition table in front of it is the source's
    with disk.open("rb") as src, back.open("rb") as dst:
        assert dst.read(offset) == src.read(offset)

    # the task's guest-change manifest names the file the hook wrote; its ledger, the loop device
    # and the mount it made and removed
    detail = admin_json(hooks_vm, f"/v1/tasks/{task['ConversionTaskId']}")
    assert {c["path"] for c in _changes(detail)} == {MARKER_PATH}, detail["steps"]
    ledger = [(e["action"], e["resource"].split(":", 1)[0]) for e in detail["ledger"]]
    for kind in ("loop", "mount"):
        assert ("created", kind) in ledger and ("removed", kind) in ledger, detail["ledger"]

    # the worker undid its loop device and mounts (its mounts live in its own mount namespace)
    assert hooks_vm.ssh("losetup -a").stdout.strip() == ""
    pid = _worker_pid(hooks_vm)
    for ns in ("", f"nsenter -t {pid} -m "):
        mounts = hooks_vm.ssh(f"{ns}findmnt -rn -o TARGET").stdout.split()
        assert [m for m in mounts if m.startswith("/var/lib/imaging/mounts")] == [], (ns, mounts)
    left = hooks_vm.ssh("ls -A /var/lib/imaging/mounts 2>/dev/null || true").stdout.split()
    assert [n for n in left if n.endswith(".json")] == [], left


def test_worker_runs_as_root_in_its_sandbox_because_a_hook_mounts_the_guest(hooks_vm: Vm) -> None:
    # the drop-in names the hook it is for (without hooks there is none: test_appliance_services)
    assert "after_convert[0] inject-metadata" in hooks_vm.ssh(f"cat {DROPIN}").stdout
    out = hooks_vm.ssh(
        "systemctl show -p User -p CapabilityBoundingSet -p ProtectSystem -p NoNewPrivileges "
        "-p DevicePolicy -p DropInPaths imaging-worker.service"
    ).stdout
    props = dict(line.split("=", 1) for line in out.splitlines())
    assert props["User"] == "root"
    assert DROPIN in props["DropInPaths"].split()
    assert set(props["CapabilityBoundingSet"].split()) == {
        "cap_sys_admin",
        "cap_sys_chroot",
        "cap_dac_override",
        "cap_chown",
        "cap_fowner",
    }
    # the rest of the sandbox stays
    assert props["ProtectSystem"] == "strict"
    assert props["NoNewPrivileges"] == "yes"
    assert props["DevicePolicy"] == "closed"
    assert hooks_vm.ssh(f"ps -o user= -p {_worker_pid(hooks_vm)}").stdout.strip() == "root"
    configured = hooks_vm.ssh("journalctl -u imaging-configure.service -q --no-pager").stdout
    assert "the worker runs as root to mount guests for: after_convert[0] inject-metadata" in configured
