"""``image.register``: register a workflow's result with the controlling cloud (EC2 ``RegisterImage``).

An optional last step of an import, unbundle or bundle workflow. What it registers:

- an **instance-store** image: ``image_location`` = ``bucket/prefix.manifest.xml`` of a bundle (one
  this appliance wrote, or the one it unbundled);
- an **EBS-backed** image: ``snapshot_id`` of the root volume's snapshot, mapped at ``root_device_name``
  (default ``/dev/sda1``), plus ``block_device_mappings`` for the other devices.

Kernel, ramdisk and virtualization type come from the task's ``boot`` result (the ``boot`` argument: what
the import recorded as ``kernel_id``, ``ramdisk_id``, ``virtualization_type``; explicit arguments win), as
the cloud needs them for a paravirtual image; an image without a virtualization type is ``hvm`` when it
has no kernel. The cloud's EC2 API is the one of the ``ec2`` volume target (``targets.volume``:
``endpoint_url``, ``region``, credentials), the only EC2 endpoint the appliance is configured with. The
result — ``image_id`` and what was asked — is the step's registered result, so it is in the task result;
undoing the step deregisters the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, ImagingError
from ..targets.base import boto_client
from ..workflow.step import Step, StepContext

_NAME = r"^[A-Za-z0-9()\[\] ./'@_-]{3,128}$"
_DEVICE = {"type": "string", "pattern": r"^/dev/[a-z0-9]{2,16}$"}


class RegisterFailed(ImagingError):
    code = "RegisterImageFailed"


def cloud_ec2_settings(config: Any) -> Mapping[str, Any]:
    """The controlling cloud's EC2 API settings: those of the ``ec2`` volume target."""
    volume = config.targets.get("volume") or {}
    if volume.get("type") != "ec2":
        raise ConfigError(
            "image.register needs the controlling cloud's EC2 API: configure targets.volume with type ec2 "
            "(endpoint_url, region, credentials)"
        )
    return volume


def register_request(
    *,
    name: str,
    description: str | None = None,
    image_location: str | None = None,
    snapshot_id: str | None = None,
    architecture: str | None = None,
    root_device_name: str | None = None,
    boot: Mapping[str, Any] | None = None,
    kernel_id: str | None = None,
    ramdisk_id: str | None = None,
    virtualization_type: str | None = None,
    block_device_mappings: list[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``RegisterImage`` parameters (boto3 names) for these arguments (module docstring)."""
    if bool(image_location) == bool(snapshot_id):
        raise ConfigError(
            "image.register needs exactly one of image_location (a bundle) and snapshot_id (EBS)"
        )
    boot = boot or {}
    kernel = kernel_id or boot.get("kernel_id") or None
    ramdisk = ramdisk_id or boot.get("ramdisk_id") or None
    virt = virtualization_type or boot.get("virtualization_type") or ("paravirtual" if kernel else "hvm")
    request: dict[str, Any] = {"Name": name, "VirtualizationType": virt}
    for key, value in (
        ("Description", description),
        ("Architecture", architecture),
        ("KernelId", kernel),
        ("RamdiskId", ramdisk),
    ):
        if value:
            request[key] = value
    mappings = [dict(m) for m in block_device_mappings or []]
    if image_location:
        request["ImageLocation"] = image_location
        if root_device_name:
            request["RootDeviceName"] = root_device_name
    else:
        root = root_device_name or "/dev/sda1"
        request["RootDeviceName"] = root
        mappings.insert(
            0, {"DeviceName": root, "Ebs": {"SnapshotId": snapshot_id, "DeleteOnTermination": True}}
        )
    if mappings:
        request["BlockDeviceMappings"] = mappings
    return request


class RegisterImageStep(Step):
    """Register the result with the controlling cloud; ``{image_id, request}``."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": _NAME},
            "description": {"type": ["string", "null"], "maxLength": 255},
            "image_location": {
                "type": ["string", "null"],
                "pattern": r"^[a-z0-9][a-z0-9.-]{1,62}/.+\.manifest\.xml$",
            },
            "snapshot_id": {"type": ["string", "null"], "pattern": r"^snap-[0-9a-f]{8,17}$"},
            "architecture": {"type": ["string", "null"], "enum": ["i386", "x86_64", "arm64", None, ""]},
            "root_device_name": {"oneOf": [_DEVICE, {"type": "null"}]},
            "boot": {"type": ["object", "null"]},
            "kernel_id": {"type": ["string", "null"]},
            "ramdisk_id": {"type": ["string", "null"]},
            "virtualization_type": {"type": ["string", "null"], "enum": ["hvm", "paravirtual", None, ""]},
            "block_device_mappings": {
                "type": ["array", "null"],
                "items": {
                    "type": "object",
                    "required": ["DeviceName"],
                    "properties": {"DeviceName": _DEVICE},
                },
            },
        },
    }

    def plan(self, ctx: StepContext, **args: Any) -> dict[str, Any]:
        return {"register": register_request(**args)}

    def run(self, ctx: StepContext, **args: Any) -> dict[str, Any]:
        request = register_request(**args)
        client = boto_client("ec2", cloud_ec2_settings(ctx.config))
        ctx.check_cancelled()
        ctx.fence()
        try:
            image_id = client.register_image(**request)["ImageId"]
        except Exception as exc:  # botocore's ClientError and connection errors: the cloud refused
            raise RegisterFailed(f"the cloud did not register the image: {exc}") from None
        ctx.ledger_created(image_id)
        ctx.event("registered", image_id=image_id)
        return {"image_id": image_id, "request": request}

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        image_id = (result or {}).get("image_id")
        if image_id:
            boto_client("ec2", cloud_ec2_settings(ctx.config)).deregister_image(ImageId=image_id)
            ctx.ledger_removed(image_id)
