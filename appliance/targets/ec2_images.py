"""CreateImage for an instance with EBS volumes, through the controlling cloud's EC2 API.

:func:`create_image_from_instance` does what CreateImage does inside a cloud, with the calls the cloud
offers (``ec2-bundles.md`` §11): ``DescribeInstances`` for the instance's root device name and its EBS
block device mappings, ``CreateSnapshot`` of every mapped volume (tagged with the instance, device and
image name), waiting until each is ``completed`` (a snapshot ``error`` fails the call), then
``RegisterImage`` with one ``BlockDeviceMapping`` per snapshot (``DeleteOnTermination`` as the instance
had it) at the instance's root device name, architecture and virtualization type, kernel and ramdisk.
An instance without EBS volumes (instance-store) is refused: it needs a bundle. On any failure the
snapshots made so far are deleted again.

CreateImage's ``BlockDeviceMappings`` (:func:`apply_mappings`): a mapping of one of the instance's devices
with ``NoDevice`` leaves that volume out of the image (not the root device), one with only
``Ebs.DeleteOnTermination`` sets that; anything else for an existing volume (size, type, encryption) is
refused, as CreateImage cannot change existing volumes. A mapping of another device (an ephemeral
``VirtualName``, an EBS volume from a snapshot or of a size) is added to the image as given.

Without ``NoReboot`` a running instance is stopped first (``StopInstances``, waiting until it is
``stopped``) so its file systems are consistent, and started again afterwards, success or not (what
CreateImage's reboot achieves; ``NoReboot`` keeps it running and the snapshots crash-consistent).
``TagSpecifications`` of resource type ``image`` tag the registered image, of type ``snapshot`` the
snapshots; other resource types are refused.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import Cancelled, ImagingError, UsageError

#: how often the snapshots' state is polled, and for how long at most
POLL_SECONDS = 2.0
WAIT_SECONDS = 3600.0


class CreateImageFailed(ImagingError):
    code = "CreateImageFailed"


@dataclass(frozen=True)
class CreatedImage:
    image_id: str
    #: device name → snapshot id
    snapshots: dict[str, str]
    request: dict[str, Any]


def _instance(ec2: Any, instance_id: str) -> dict[str, Any]:
    reservations = ec2.describe_instances(InstanceIds=[instance_id]).get("Reservations") or []
    instances = [i for r in reservations for i in r.get("Instances") or []]
    if len(instances) != 1:
        raise CreateImageFailed(f"the cloud knows no instance {instance_id}")
    return dict(instances[0])


def _wait(
    ec2: Any,
    snapshot_ids: list[str],
    cancel: threading.Event | None,
    sleep: Callable[[float], None],
) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        states = {
            s["SnapshotId"]: s["State"] for s in ec2.describe_snapshots(SnapshotIds=snapshot_ids)["Snapshots"]
        }
        if any(state == "error" for state in states.values()):
            raise CreateImageFailed("a snapshot of the instance's volumes failed in the cloud")
        if len(states) == len(snapshot_ids) and all(state == "completed" for state in states.values()):
            return
        if cancel is not None and cancel.is_set():
            raise Cancelled("CreateImage cancelled while the snapshots were being taken")
        if time.monotonic() > deadline:
            raise CreateImageFailed(f"the snapshots did not complete within {WAIT_SECONDS:.0f} seconds")
        sleep(POLL_SECONDS)


def apply_mappings(
    root: str, mappings: list[dict[str, Any]], requested: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the instance's EBS mappings to snapshot, the further mappings to register) after CreateImage's
    ``BlockDeviceMappings`` (module docstring); ``UsageError`` for what cannot be done."""
    own = {m["DeviceName"]: dict(m, Ebs=dict(m["Ebs"])) for m in mappings}
    extra: list[dict[str, Any]] = []
    for item in requested:
        device = item.get("DeviceName")
        if not device:
            raise UsageError("every BlockDeviceMapping needs a DeviceName")
        if device not in own:
            if item.get("NoDevice") is None:
                extra.append(dict(item))
            continue
        if item.get("NoDevice") is not None:
            if device == root:
                raise UsageError(f"the root device {device} cannot be left out of the image (NoDevice)")
            del own[device]
            continue
        ebs = item.get("Ebs") or {}
        if item.get("VirtualName") or set(ebs) - {"DeleteOnTermination"}:
            raise UsageError(
                f"BlockDeviceMapping {device} is a volume of the instance: CreateImage cannot change its "
                "size, type or encryption (only DeleteOnTermination, or NoDevice to leave it out)"
            )
        if "DeleteOnTermination" in ebs:
            own[device]["Ebs"]["DeleteOnTermination"] = bool(ebs["DeleteOnTermination"])
    return list(own.values()), extra


def tags_by_resource(specifications: list[dict[str, Any]]) -> dict[str, list[dict[str, str]]]:
    """CreateImage's ``TagSpecifications`` as resource type (``image``, ``snapshot``) → tags."""
    out: dict[str, list[dict[str, str]]] = {}
    for spec in specifications:
        kind = spec.get("ResourceType")
        if kind not in ("image", "snapshot"):
            raise UsageError(f"TagSpecifications: CreateImage tags an image or snapshots, not {kind!r}")
        out.setdefault(kind, []).extend(
            {"Key": str(tag.get("Key")), "Value": str(tag.get("Value", ""))} for tag in spec.get("Tags") or []
        )
    return out


def create_image_from_instance(
    ec2: Any,
    instance_id: str,
    name: str,
    *,
    description: str | None = None,
    block_device_mappings: list[dict[str, Any]] | None = None,
    no_reboot: bool = False,
    tag_specifications: list[dict[str, Any]] | None = None,
    cancel: threading.Event | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> CreatedImage:
    """Snapshot the EBS volumes of ``instance_id`` and register them as image ``name`` (``ec2`` is a
    boto3 EC2 client of the controlling cloud); without ``no_reboot`` a running instance is stopped
    for the snapshots and started again."""
    tags = tags_by_resource(tag_specifications or [])
    stopped = False
    try:
        if not no_reboot and _instance(ec2, instance_id)["State"]["Name"] == "running":
            ec2.stop_instances(InstanceIds=[instance_id])
            stopped = True
            _wait_stopped(ec2, instance_id, cancel, sleep)
        return _create(ec2, instance_id, name, description, block_device_mappings or [], tags, cancel, sleep)
    except ImagingError:
        raise
    except Exception as exc:  # botocore's ClientError and connection errors: the cloud refused
        raise CreateImageFailed(f"the cloud refused a step of CreateImage: {exc}") from None
    finally:
        if stopped:
            # started again whatever happened: the caller's instance must not stay down
            try:
                ec2.start_instances(InstanceIds=[instance_id])
            except Exception as exc:
                raise CreateImageFailed(
                    f"instance {instance_id} was stopped for CreateImage and did not start again: {exc}"
                ) from None


def _wait_stopped(
    ec2: Any, instance_id: str, cancel: threading.Event | None, sleep: Callable[[float], None]
) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while _instance(ec2, instance_id)["State"]["Name"] != "stopped":
        if cancel is not None and cancel.is_set():
            raise Cancelled("CreateImage cancelled while the instance was stopping")
        if time.monotonic() > deadline:
            raise CreateImageFailed(f"instance {instance_id} did not stop within {WAIT_SECONDS:.0f} seconds")
        sleep(POLL_SECONDS)


def _create(
    ec2: Any,
    instance_id: str,
    name: str,
    description: str | None,
    requested: list[dict[str, Any]],
    tags: dict[str, list[dict[str, str]]],
    cancel: threading.Event | None,
    sleep: Callable[[float], None],
) -> CreatedImage:
    instance = _instance(ec2, instance_id)
    mappings = [m for m in instance.get("BlockDeviceMappings") or [] if m.get("Ebs", {}).get("VolumeId")]
    if not mappings:
        raise CreateImageFailed(
            f"instance {instance_id} has no EBS volumes: an instance-store instance is imaged by a bundle"
        )
    root = instance.get("RootDeviceName") or mappings[0]["DeviceName"]
    mappings, extra = apply_mappings(root, mappings, requested)
    snapshots: dict[str, str] = {}
    try:
        for mapping in mappings:
            device, volume = mapping["DeviceName"], mapping["Ebs"]["VolumeId"]
            snap = ec2.create_snapshot(
                VolumeId=volume,
                Description=f"CreateImage {name} of {instance_id} {device}",
                TagSpecifications=[
                    {
                        "ResourceType": "snapshot",
                        "Tags": [
                            {"Key": "imaging:instance", "Value": instance_id},
                            {"Key": "imaging:device", "Value": device},
                            *tags.get("snapshot", []),
                        ],
                    }
                ],
            )
            snapshots[device] = snap["SnapshotId"]
        _wait(ec2, list(snapshots.values()), cancel, sleep)
        request: dict[str, Any] = {
            "Name": name,
            "RootDeviceName": root,
            "VirtualizationType": instance.get("VirtualizationType") or "hvm",
            "BlockDeviceMappings": [
                {
                    "DeviceName": m["DeviceName"],
                    "Ebs": {
                        "SnapshotId": snapshots[m["DeviceName"]],
                        "DeleteOnTermination": bool(m["Ebs"].get("DeleteOnTermination", True)),
                    },
                }
                for m in mappings
            ]
            + extra,
        }
        for key, value in (
            ("Description", description),
            ("Architecture", instance.get("Architecture")),
            ("KernelId", instance.get("KernelId")),
            ("RamdiskId", instance.get("RamdiskId")),
        ):
            if value:
                request[key] = value
        image_id = ec2.register_image(**request)["ImageId"]
        if tags.get("image"):
            ec2.create_tags(Resources=[image_id], Tags=tags["image"])
    except BaseException:
        for snapshot_id in snapshots.values():
            # best effort: the original failure is what the caller must see
            with contextlib.suppress(Exception):
                ec2.delete_snapshot(SnapshotId=snapshot_id)
        raise
    return CreatedImage(image_id, snapshots, request)
