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
import os
import re
import string
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import schemas
from ..errors import UsageError
from .base import TargetError, Volume, boto_client, validate_settings
from .device import BlockDevice, inspect_block_device
from .rawio import fsync_path

log = logging.getLogger(__name__)

GIB = 1024**3
TASK_TAG = "imaging:task-id"
DEFAULT_DEVICE_NAMES = [f"/dev/sd{c}" for c in "fghijklmnop"]

#: the settings schema (``appliance/schemas/target-ec2.json``)
SCHEMA: dict[str, Any] = schemas.load("target-ec2")

_PARTITION = re.compile(r"-part\d+$")
#: one AttachVolume at a time per process, so two tasks never pick the same free name
_ATTACH_LOCK = threading.Lock()


def device_entry_matches(name: str, volume_id: str) -> bool:
    """Whether a ``/dev/disk/by-id`` entry name is the disk of ``volume_id`` (not a partition of it)."""
    if _PARTITION.search(name):
        return False
    for token in ("vol" + volume_id[4:], volume_id):
        for m in re.finditer(re.escape(token), name):
            before = name[m.start() - 1] if m.start() else ""
            after = name[m.end() : m.end() + 1]
            # whole token only: vol-1234abcd must not match inside vol-1234abcdef…
            if not before.isalnum() and not (after and after in string.hexdigits):
                return True
    # virtio serials are cut at 20 characters, so a dashed id loses its last hex digit
    cut = volume_id[:20]
    return len(volume_id) > 20 and name.endswith(cut) and not name[: -len(cut)][-1:].isalnum()


def _short_name(device_name: str) -> str:
    """``/dev/xvdf`` and ``/dev/sdf`` are the same attachment point to EC2."""
    name = device_name.removeprefix("/dev/")
    for prefix in ("xvd", "sd", "vd"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


class Ec2VolumeTarget:
    """Volumes in the controlling cloud, attached to this appliance while they are written."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        self.instance_id: str = settings["instance_id"]
        self.device_dir = Path(settings.get("device_dir", "/dev/disk/by-id"))
        self.device_names: list[str] = list(settings.get("attach_device_names", DEFAULT_DEVICE_NAMES))
        self.wait_timeout = float(settings.get("wait_timeout", 300))
        self.device_timeout = float(settings.get("device_timeout", 120))
        self.poll_interval = float(settings.get("poll_interval", 2))
        self.max_poll_interval = float(settings.get("max_poll_interval", 15))
        self._zone: str | None = settings.get("availability_zone")
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Ec2VolumeTarget:
        """Build from ``config.targets["volume"]``; :class:`ConfigError` names a bad key."""
        return cls(validate_settings(settings, SCHEMA, "targets.volume"))

    # -- API plumbing -------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 EC2 client (created on first use; boto3 clients are thread-safe)."""
        with self._lock:
            if self._client is None:
                self._client = boto_client("ec2", self.settings, connect_timeout=10, read_timeout=60)
            return self._client

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """Call an EC2 operation; API failures become ``CloudApiError`` (or the cloud's NotFound code)."""
        from botocore.exceptions import BotoCoreError, ClientError  # heavy; see targets.base.boto_client

        method = getattr(self.client, re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower())
        try:
            return method(**kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code, message = err.get("Code", "Unknown"), err.get("Message", str(exc))
            if code in ("InvalidVolume.NotFound", "InvalidAttachment.NotFound"):
                raise TargetError(f"{operation}: {message}", code) from exc
            raise TargetError(f"{operation} failed: {code}: {message}", "CloudApiError") from exc
        except BotoCoreError as exc:
            raise TargetError(f"{operation} failed: {exc}", "CloudApiError") from exc

    def _describe(self, volume_id: str) -> dict[str, Any]:
        return self._call("DescribeVolumes", VolumeIds=[volume_id])["Volumes"][0]

    def _wait(
        self,
        volume_id: str,
        done: Callable[[dict[str, Any]], bool],
        what: str,
        code: str,
        *,
        missing_ok: bool = False,
    ) -> dict[str, Any]:
        """Poll DescribeVolumes with back-off until ``done(volume)``; ``code`` on timeout or ``error``."""
        deadline = time.monotonic() + self.wait_timeout
        interval = self.poll_interval
        state = "unknown"
        while True:
            try:
                volume = self._describe(volume_id)
            except TargetError as exc:
                # A new volume may not be visible yet (the EC2 API is eventually consistent).
                if not (missing_ok and exc.code == "InvalidVolume.NotFound"):
                    raise
            else:
                if done(volume):
                    return volume
                state = volume.get("State", "unknown")
                if state == "error":
                    raise TargetError(
                        f"volume {volume_id} went to state 'error' while waiting for {what}", code
                    )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TargetError(
                    f"volume {volume_id} was not {what} after {self.wait_timeout:g} s (state {state}); "
                    "raise targets.volume.wait_timeout if the cloud is slow",
                    code,
                )
            time.sleep(min(interval, remaining))
            interval = min(interval * 1.5, self.max_poll_interval)

    def _attachment(self, volume: dict[str, Any]) -> dict[str, Any] | None:
        for att in volume.get("Attachments", []):
            if att.get("InstanceId") == self.instance_id and att.get("State") != "detached":
                return att
        return None

    def _attached(self, volume: dict[str, Any]) -> bool:
        att = self._attachment(volume)
        return att is not None and att.get("State") == "attached"

    # -- zone, names, device lookup -----------------------------------------------------------

    def _instance(self) -> dict[str, Any]:
        reservations = self._call("DescribeInstances", InstanceIds=[self.instance_id])["Reservations"]
        if not reservations or not reservations[0]["Instances"]:
            raise TargetError(
                f"instance {self.instance_id} (targets.volume.instance_id) not found", "CloudApiError"
            )
        return reservations[0]["Instances"][0]

    def availability_zone(self) -> str:
        """The zone volumes are created in: ``availability_zone`` or this instance's zone."""
        if self._zone is None:
            self._zone = self._instance()["Placement"]["AvailabilityZone"]
        return self._zone

    def _used_names(self) -> set[str]:
        used = {_short_name(m["DeviceName"]) for m in self._instance().get("BlockDeviceMappings", [])}
        attached = self._call(
            "DescribeVolumes", Filters=[{"Name": "attachment.instance-id", "Values": [self.instance_id]}]
        )["Volumes"]
        for v in attached:
            att = self._attachment(v)
            if att is not None and att.get("Device"):
                used.add(_short_name(att["Device"]))
        return used

    def _attach(self, volume_id: str) -> str:
        """Attach on the first free device name; returns it."""
        with _ATTACH_LOCK:
            used = self._used_names()
            for name in self.device_names:
                if _short_name(name) in used:
                    continue
                try:
                    self._call("AttachVolume", VolumeId=volume_id, InstanceId=self.instance_id, Device=name)
                except TargetError as exc:
                    # Another process took the name between our look and our attach: try the next.
                    if "InvalidParameterValue" in exc.message and "in use" in exc.message:
                        continue
                    raise TargetError(
                        f"cannot attach {volume_id}: {exc.message}", "FailureToAttachVolume"
                    ) from exc
                return name
        raise TargetError(
            f"no free device name to attach {volume_id} to {self.instance_id} "
            f"(all of targets.volume.attach_device_names are in use)",
            "FailureToAttachVolume",
        )

    def find_device(self, volume_id: str, size_bytes: int, timeout: float | None = None) -> BlockDevice:
        """Poll ``device_dir`` until the disk of ``volume_id`` appears, then check it.

        Raises ``FailureToAttachVolume`` when nothing appears within ``timeout`` (default ``device_timeout``).
        """
        timeout = self.device_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                names = sorted(os.listdir(self.device_dir))
            except FileNotFoundError:
                names = []
            for name in names:
                if device_entry_matches(name, volume_id):
                    return inspect_block_device(os.path.realpath(self.device_dir / name), size_bytes)
            if time.monotonic() >= deadline:
                raise TargetError(
                    f"volume {volume_id} is attached but no entry for it appeared in {self.device_dir} "
                    f"within {timeout:g} s (targets.volume.device_timeout)",
                    "FailureToAttachVolume",
                )
            time.sleep(0.2)

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

    def _detach(
        self, volume_id: str, *, force: bool = False, instance_id: str | None = None
    ) -> dict[str, Any]:
        """Detach from this instance (or ``instance_id``) and wait until the volume is ``available``."""
        try:
            self._call(
                "DetachVolume", VolumeId=volume_id, InstanceId=instance_id or self.instance_id, Force=force
            )
        except TargetError as exc:
            if exc.code != "InvalidAttachment.NotFound":  # already detached
                raise TargetError(
                    f"cannot detach {volume_id}: {exc.message}", "FailureToDetachVolume"
                ) from exc
        return self._wait(volume_id, lambda v: v["State"] == "available", "detached", "FailureToDetachVolume")

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
