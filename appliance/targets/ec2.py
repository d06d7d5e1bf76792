"""EC2 target: volumes created in the controlling cloud and attached to this appliance.

``create`` runs the sequence the Eucalyptus imaging worker used, through the
cloud's EC2 API with boto3:

1. ``CreateVolume`` (size rounded up to whole GiB, in this appliance's availability zone, tagged
   ``imaging:task-id``) and wait for ``available``;
2. ``AttachVolume`` to ``instance_id`` on the first free name of ``attach_device_names`` and wait
   for the attachment to be ``attached``;
3. find the disk by its serial: an entry of ``device_dir`` (``/dev/disk/by-id``) whose name holds
   the volume id without its dash (virtio ``virtio-vol0123…``, serial cut at 20 characters; Nitro
   ``nvme-Amazon_Elastic_Block_Store_vol0123…``), polled until it appears; the symlink is resolved
   and the device checked like the ``device`` target does.

A failure anywhere in ``create`` detaches and deletes the new volume before the error is raised.
``finalize`` fsyncs, detaches and waits for ``available``; ``delete`` detaches (forcing it if a
normal detach does not finish in time) and deletes, and can find a volume by its task tag when
its id was never stored (a crash inside ``create``). Waits poll ``DescribeVolumes`` with back-off.

Failover: a task taken over by another appliance (its owner died, its lease ran out) finds its volume
still attached to the dead appliance's instance, which the volume's info names (``instance_id``):
``reopen`` force-detaches it from there and attaches it to this instance, and ``delete`` (an undo)
force-detaches it from there before deleting it. A volume attached to any other instance is left alone.

Error codes: ``FailureToCreateVolume``, ``FailureToAttachVolume``, ``FailureToDetachVolume``
(timeouts and ``error`` states; the names are the Eucalyptus worker's), ``InvalidVolume.NotFound``,
``InvalidParameterValue`` (an availability zone other than this appliance's), ``CloudApiError``
(any other API failure; the message holds the cloud's code).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .. import schemas
from ..errors import UsageError
from .base import TargetError, Volume, validate_settings
from .ec2attach import Ec2Attachments
from .rawio import fsync_path

log = logging.getLogger(__name__)

GIB = 1024**3
TASK_TAG = "imaging:task-id"

#: the settings schema (``appliance/schemas/target-ec2.json``)
SCHEMA: dict[str, Any] = schemas.load("target-ec2")


class Ec2VolumeTarget(Ec2Attachments):
    """Volumes in the controlling cloud, attached to this appliance while they are written (the EC2
    calls, waits and device lookup are :class:`~.ec2attach.Ec2Attachments`')."""

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Ec2VolumeTarget:
        """Build from ``config.targets["volume"]``; :class:`ConfigError` names a bad key."""
        return cls(validate_settings(settings, SCHEMA, "targets.volume"))

    # -- the target ---------------------------------------------------------------------------

    def create(
        self,
        task_id: str,
        size_bytes: int,
        *,
        availability_zone: str | None = None,
        client_token: str | None = None,
    ) -> Volume:
        """Create, attach and locate a volume of ``ceil(size_bytes / GiB)`` GiB.

        ``client_token`` is not used yet: a create run again after its process was killed makes another
        volume, and one killed between CreateVolume and its caller's record leaves the first one (tagged
        with the task, ``imaging:task-id``) for the operator.
        """
        if size_bytes <= 0:
            raise UsageError(f"volume size must be positive, not {size_bytes}")
        zone = self.availability_zone()
        if availability_zone and availability_zone != zone:
            raise TargetError(
                f"this appliance can only write volumes in availability zone {zone}, not {availability_zone}",
                "InvalidParameterValue",
            )
        size_gib = max(1, -(-size_bytes // GIB))
        tags = [{"Key": TASK_TAG, "Value": task_id}, {"Key": "Name", "Value": f"imaging {task_id}"}]
        tags += [{"Key": k, "Value": v} for k, v in self.settings.get("tags", {}).items()]
        kwargs: dict[str, Any] = {
            "Size": size_gib,
            "AvailabilityZone": zone,
            "TagSpecifications": [{"ResourceType": "volume", "Tags": tags}],
        }
        if "volume_type" in self.settings:
            kwargs["VolumeType"] = self.settings["volume_type"]
        try:
            volume_id = self._call("CreateVolume", **kwargs)["VolumeId"]
        except TargetError as exc:
            raise TargetError(exc.message, "FailureToCreateVolume") from exc
        try:
            self._wait(
                volume_id,
                lambda v: v["State"] == "available",
                "available",
                "FailureToCreateVolume",
                missing_ok=True,
            )
            device_name = self._attach(volume_id)
            self._wait(volume_id, self._attached, "attached", "FailureToAttachVolume")
            dev = self.find_device(volume_id, size_bytes)
        except BaseException:
            self._discard_quietly(volume_id)
            raise
        info = {
            "type": "ec2",
            "volume_id": volume_id,
            "path": str(dev.path),
            "device_name": device_name,
            "size": dev.size,
            "size_gib": size_gib,
            "availability_zone": zone,
            "instance_id": self.instance_id,
            "task_id": task_id,
            "zeroed": True,  # a new EBS volume reads as zeros
        }
        return Volume(volume_id, dev.path, dev.size, info)

    def reopen(self, volume_info: Mapping[str, Any]) -> Volume:
        """Find the volume again, re-attaching it if it was detached meanwhile.

        A volume still attached to the instance that wrote it before (``volume_info["instance_id"]``,
        another appliance) is force-detached from it first and attached here: this appliance took
        the task over from that one, whose lease ran out (it died, or is cut off and must write no
        more). A volume attached to any other instance is refused (``FailureToAttachVolume``)."""
        volume_id = str(volume_info["volume_id"])
        volume = self._describe(volume_id)
        device_name = volume_info.get("device_name")
        if self._attachment(volume) is None:
            holders = {
                a.get("InstanceId") for a in volume.get("Attachments", []) if a.get("State") != "detached"
            }
            previous = volume_info.get("instance_id")
            if holders and (previous is None or previous == self.instance_id or holders != {previous}):
                raise TargetError(
                    f"volume {volume_id} is attached to another instance", "FailureToAttachVolume"
                )
            if holders:
                log.warning(
                    "volume %s is still attached to %s, which wrote it before this appliance took its task "
                    "over: force-detaching it from there",
                    volume_id,
                    previous,
                )
                self._detach(volume_id, force=True, instance_id=str(previous))
            device_name = self._attach(volume_id)
        self._wait(volume_id, self._attached, "attached", "FailureToAttachVolume")
        dev = self.find_device(volume_id, 0)
        info = dict(
            volume_info,
            path=str(dev.path),
            size=dev.size,
            device_name=device_name,
            instance_id=self.instance_id,
            zeroed=False,
        )
        return Volume(volume_id, dev.path, dev.size, info)

    def adopt(self, volume_id: str, task_id: str) -> Volume:
        """Attach a volume the cloud created for a task (Eucalyptus ``import_volume``) and find it."""
        return self.reopen({"type": "ec2", "volume_id": volume_id, "task_id": task_id, "adopted": True})

    def release(self, volume_info: Mapping[str, Any]) -> None:
        """Hand an adopted volume back: detach it (never delete it)."""
        self._detach(str(volume_info["volume_id"]))

    def finalize(self, volume: Volume) -> dict[str, Any]:
        """fsync the disk, detach it and wait for ``available``; returns the volume's description."""
        fsync_path(volume.path, f"volume {volume.id} ({volume.path})")
        described = self._detach(volume.id)
        return {
            "type": "ec2",
            "volume_id": volume.id,
            "size_gib": described.get("Size"),
            "availability_zone": described.get("AvailabilityZone"),
            "state": described.get("State"),
        }

    def delete(self, volume_info: Mapping[str, Any]) -> None:
        """Detach (forced if need be) and delete.

        By ``volume_id``; without one, every volume tagged with ``task_id`` (a crash inside ``create``).
        """
        if volume_info.get("volume_id"):
            ids = [str(volume_info["volume_id"])]
        elif volume_info.get("task_id"):
            found = self._call(
                "DescribeVolumes", Filters=[{"Name": f"tag:{TASK_TAG}", "Values": [volume_info["task_id"]]}]
            )
            ids = [v["VolumeId"] for v in found["Volumes"]]
        else:
            raise UsageError("delete needs a volume_id or a task_id")
        previous = volume_info.get("instance_id")
        for volume_id in ids:
            self._discard(volume_id, str(previous) if previous else None)

    def _discard(self, volume_id: str, previous: str | None = None) -> None:
        """Detach and delete; a volume still attached only to ``previous`` (the instance that wrote it
        before this appliance took its task over) is force-detached from there."""
        try:
            volume = self._describe(volume_id)
        except TargetError as exc:
            if exc.code == "InvalidVolume.NotFound":
                return
            raise
        holders = {a.get("InstanceId") for a in volume.get("Attachments", []) if a.get("State") != "detached"}
        if previous and previous != self.instance_id and holders == {previous}:
            log.warning(
                "volume %s is still attached to %s: force-detaching it from there", volume_id, previous
            )
            self._detach(volume_id, force=True, instance_id=previous)
        elif volume.get("Attachments"):
            try:
                self._detach(volume_id)
            except TargetError as exc:
                if exc.code != "FailureToDetachVolume":
                    raise
                log.warning("detaching %s failed (%s); forcing it", volume_id, exc.message)
                self._detach(volume_id, force=True)
        try:
            self._call("DeleteVolume", VolumeId=volume_id)
        except TargetError as exc:
            if exc.code != "InvalidVolume.NotFound":
                raise

    def _discard_quietly(self, volume_id: str) -> None:
        """Best-effort cleanup on a failed create: the original error is what the caller must see."""
        try:
            self._discard(volume_id)
        except Exception as exc:
            log.error("could not remove volume %s after a failed create: %s", volume_id, exc)

    def describe(self) -> dict[str, Any]:
        """Endpoint, region, instance and zone (when known); never the keys."""
        s = self.settings
        return {
            "type": "ec2",
            "endpoint_url": s.get("endpoint_url"),
            "region": s.get("region"),
            "instance_id": self.instance_id,
            "availability_zone": self._zone,
            "device_dir": str(self.device_dir),
            "attach_device_names": self.device_names,
        }
