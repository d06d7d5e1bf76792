"""Reading a disk of the controlling cloud for an export, through its EC2 API.

An instance's boot volume cannot be read where it is attached. The export takes a point-in-time
copy and reads that, with the calls and the attach-by-serial of the ``ec2`` volume target
(:class:`~appliance.targets.ec2.Ec2VolumeTarget`):

1. ``DescribeInstances`` → the root device's block device mapping → its volume, and the instance's
   other EBS volumes (:func:`describe_boot_volume`, also what the API checks when the request arrives;
   an OVA export copies each of them, in boot-device order);
2. ``CreateSnapshot`` of that volume, waited for until ``completed``;
3. ``CreateVolume`` from the snapshot in this appliance's availability zone, attached here and found
   by its serial (:meth:`Ec2VolumeTarget.adopt`);
4. the export reads the attached disk;
5. :meth:`CloudDiskCopy.remove`: detach, ``DeleteVolume``, ``DeleteSnapshot`` — everything the export
   created, and nothing else (the instance and its volume are never touched).

Everything created is tagged ``imaging:task-id`` so an operator can find what a killed worker left.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from ..errors import Cancelled
from .base import TargetError, Volume
from .ec2 import GIB, TASK_TAG, Ec2VolumeTarget


def describe_boot_volume(settings: Mapping[str, Any], instance_id: str) -> dict[str, Any] | None:
    """``{instance_id, owner_id, platform, volume_id, device_name, size, disks}`` of the instance's boot
    (root) EBS volume (``owner_id``: the account of its reservation; ``platform``: ``windows`` when EC2
    says so, else ``linux``; ``disks``: every EBS volume of the instance,
    each ``{volume_id, device_name, size}``, in boot-device order: the root device first, then the others
    by device name), or None when the cloud does not know the instance. Raises ``CloudApiError`` for
    other failures and ``NotExportable`` for an instance without an EBS root volume (instance store)."""
    target = Ec2VolumeTarget.from_settings(settings)
    try:
        reply = target._call("DescribeInstances", InstanceIds=[instance_id])
    except TargetError as exc:
        if "InvalidInstanceID" in exc.message:
            return None
        raise
    found = [(r.get("OwnerId"), i) for r in reply.get("Reservations", []) for i in r.get("Instances", [])]
    if not found:
        return None
    owner, instance = found[0]
    root = instance.get("RootDeviceName")
    mappings = [m for m in instance.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("VolumeId")]
    chosen = [m for m in mappings if m.get("DeviceName") == root] or mappings[:1]
    if not chosen:
        raise TargetError(f"instance {instance_id} has no EBS root volume to export", "NotExportable")
    others = sorted((m for m in mappings if m is not chosen[0]), key=lambda m: str(m.get("DeviceName")))
    disks = []
    for m in [chosen[0], *others]:
        volume_id = m["Ebs"]["VolumeId"]
        volume = target._describe(volume_id)
        disks.append(
            {
                "volume_id": volume_id,
                "device_name": m.get("DeviceName"),
                "size": int(volume.get("Size", 0)) * GIB,
            }
        )
    # EC2 reports Platform only for Windows instances
    platform = "windows" if str(instance.get("Platform") or "").lower() == "windows" else "linux"
    return {"instance_id": instance_id, "owner_id": owner, "platform": platform, **disks[0], "disks": disks}


class CloudDiskCopy:
    """The point-in-time copy of a cloud volume an export reads (see the module docstring)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.target = Ec2VolumeTarget.from_settings(settings)

    def _wait_snapshot(self, snapshot_id: str, cancel: threading.Event | None) -> None:
        deadline = time.monotonic() + self.target.wait_timeout
        interval = self.target.poll_interval
        while True:
            snap = self.target._call("DescribeSnapshots", SnapshotIds=[snapshot_id])["Snapshots"][0]
            state = snap.get("State")
            if state == "completed":
                return
            if state == "error":
                raise TargetError(f"snapshot {snapshot_id} went to state 'error'", "FailureToCreateSnapshot")
            if time.monotonic() > deadline:
                raise TargetError(
                    f"snapshot {snapshot_id} was not completed after {self.target.wait_timeout:g} s",
                    "FailureToCreateSnapshot",
                )
            if cancel is not None and cancel.wait(interval):
                raise Cancelled("export cancelled while the snapshot was taken")
            interval = min(interval * 1.5, self.target.max_poll_interval)

    def create(
        self, task_id: str, volume_id: str, record: dict[str, Any], cancel: threading.Event | None = None
    ) -> Volume:
        """Snapshot ``volume_id``, make a volume of it here and attach it; ``record`` (the caller keeps
        it, e.g. in a step checkpoint) is filled in as each resource is created, for :meth:`remove`."""
        tags = [{"Key": TASK_TAG, "Value": task_id}, {"Key": "Name", "Value": f"imaging export {task_id}"}]
        snapshot_id = self.target._call(
            "CreateSnapshot",
            VolumeId=volume_id,
            Description=f"imaging export {task_id}",
            TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}],
        )["SnapshotId"]
        record["snapshot_id"] = snapshot_id
        self._wait_snapshot(snapshot_id, cancel)
        copy_id = self.target._call(
            "CreateVolume",
            SnapshotId=snapshot_id,
            AvailabilityZone=self.target.availability_zone(),
            TagSpecifications=[{"ResourceType": "volume", "Tags": tags}],
        )["VolumeId"]
        record["volume_id"] = copy_id
        self.target._wait(
            copy_id,
            lambda v: v["State"] == "available",
            "available",
            "FailureToCreateVolume",
            missing_ok=True,
        )
        return self.target.adopt(copy_id, task_id)

    def remove(self, record: Mapping[str, Any]) -> None:
        """Detach and delete the volume copy and delete the snapshot (each already gone is fine)."""
        if record.get("volume_id"):
            self.target.delete({"volume_id": record["volume_id"]})
        if record.get("snapshot_id"):
            try:
                self.target._call("DeleteSnapshot", SnapshotId=record["snapshot_id"])
            except TargetError as exc:
                if "InvalidSnapshot.NotFound" not in exc.message:
                    raise
