"""The EC2 calls and lookups the ``ec2`` volume target (:mod:`.ec2`) is built on, for volumes of
this appliance's instance: an EC2 operation called with its failures mapped to target errors
(``CloudApiError``, or the cloud's NotFound code), ``DescribeVolumes`` polled with back-off until a
state is reached, the instance's availability zone, ``AttachVolume`` on the first free device name
(one at a time per process), ``DetachVolume`` and the wait for ``available``, and the attached disk
found in ``device_dir`` (``/dev/disk/by-id``) by the volume id in its serial.
"""

from __future__ import annotations

import os
import re
import string
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .base import TargetError, boto_client
from .device import BlockDevice, inspect_block_device

DEFAULT_DEVICE_NAMES = [f"/dev/sd{c}" for c in "fghijklmnop"]

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


class Ec2Attachments:
    """EC2 calls for the volumes of one instance (``instance_id``): attach, wait, detach, locate."""

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

    # -- detaching ----------------------------------------------------------------------------

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
