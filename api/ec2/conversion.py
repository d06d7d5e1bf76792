"""Legacy conversion-task actions: ImportVolume, ImportInstance, DescribeConversionTasks,
CancelConversionTask. Each handler parses the wire parameters, checks what only the wire form
can tell (which members were given), calls :class:`~appliance.service.imports.ImportService` and returns
the output structure for :func:`api.ec2.xml.render`.

Beyond AWS, ImportInstance takes a kernel, a ramdisk and a virtualization type as
``LaunchSpecification.KernelId``/``.RamdiskId``/``.VirtualizationType`` or as an ``[imaging:…]``
token in ``Description`` (:mod:`appliance.service.bootparams`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from appliance.service import bootparams, expected
from appliance.service.imports import ImportService
from appliance.service.importtasks import CONVERSION_KINDS, Caller, DiskImage
from appliance.sources.methods import method_of_manifest

from . import query, views
from .errors import invalid_value, missing_parameter

Params = Mapping[str, Sequence[str]]

#: boot settings (beyond AWS, :mod:`appliance.service.bootparams`): LaunchSpecification member → field
BOOT_MEMBERS = {
    "KernelId": "kernel_id",
    "RamdiskId": "ramdisk_id",
    "VirtualizationType": "virtualization_type",
}

GiB = 1 << 30


def _disk_image(
    image: Mapping[str, Any], volume: Mapping[str, Any] | None, prefix: str, description: str | None = None
) -> DiskImage:
    """A :class:`DiskImage` from ``Image``/``Volume`` members (``prefix`` names them in errors)."""
    if volume is None or "Size" not in volume:
        raise missing_parameter(f"{prefix}Volume.Size")
    if not image.get("ImportManifestUrl"):
        raise missing_parameter(f"{prefix}Image.ImportManifestUrl")
    # both within AWS's bounds already (rules.BOUNDS)
    size, nbytes = volume["Size"], image["Bytes"]
    if image["Format"] == "RAW" and nbytes > size * GiB:
        # A RAW image is the disk itself, so it must fit; other formats' sizes are checked
        # against the virtual size once the upload is inspected.
        raise invalid_value(
            f"{prefix}Image.Bytes ({nbytes}) is larger than {prefix}Volume.Size "
            f"({size} GiB = {size * GiB} bytes); "
            f"the volume must be at least {-(-nbytes // GiB)} GiB"
        )
    return DiskImage(
        format=image["Format"],
        bytes=nbytes,
        manifest_url=image["ImportManifestUrl"],
        volume_size=size,
        description=description,
    )


def import_volume(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """ImportVolume → ``{ConversionTask}``."""
    data = query.parse("ImportVolume", params)
    zone, zone_id = data.get("AvailabilityZone"), data.get("AvailabilityZoneId")
    if zone and zone_id:
        raise invalid_value("Either AvailabilityZone or AvailabilityZoneId must be specified, but not both.")
    if not (zone or zone_id):
        raise missing_parameter("AvailabilityZone")
    image = _disk_image(data["Image"], data["Volume"], "")
    service.check_method(method_of_manifest(image.manifest_url), "Image.ImportManifestUrl")
    digest = expected.resolve(data.get(expected.MEMBER), data.get("Description"))
    query.check_dry_run(data)
    task = service.import_volume(
        image,
        availability_zone=zone or zone_id,
        description=data.get("Description"),
        account=caller.account,
        expected_sha256=digest,
    )
    return {"ConversionTask": views.conversion_task(task)}


def import_instance(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """ImportInstance (one disk, as AWS) → ``{ConversionTask}``."""
    data = query.parse("ImportInstance", params)
    disks = data.get("DiskImages") or []
    if not disks:
        raise missing_parameter("DiskImage.1.Image.Format")
    if len(disks) > 1:
        raise invalid_value("ImportInstance supports only single-volume VMs; use ImportImage for more disks")
    disk = disks[0]
    if "Image" not in disk:
        raise missing_parameter("DiskImage.1.Image.Format")
    image = _disk_image(disk["Image"], disk.get("Volume"), "DiskImage.1.", disk.get("Description"))
    service.check_method(method_of_manifest(image.manifest_url), "DiskImage.1.Image.ImportManifestUrl")
    launch = dict(data.get("LaunchSpecification") or {})
    architecture = launch.pop("Architecture", None)
    instance_type = launch.pop("InstanceType", None)
    boot = bootparams.resolve(
        {field: launch.pop(member, None) for member, field in BOOT_MEMBERS.items()},
        data.get("Description"),
        names={field: f"LaunchSpecification.{member}" for member, field in BOOT_MEMBERS.items()},
    )
    digest = expected.resolve(data.get(expected.MEMBER), data.get("Description"))
    query.check_dry_run(data)
    task = service.import_instance(
        image,
        platform=data["Platform"],
        architecture=architecture,
        instance_type=instance_type,
        description=data.get("Description"),
        launch=launch,
        account=caller.account,
        expected_sha256=digest,
        **boot.to_dict(),
    )
    return {"ConversionTask": views.conversion_task(task)}


def describe_conversion_tasks(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """DescribeConversionTasks → ``{ConversionTasks}`` (all the caller sees, or the ids asked for)."""
    data = query.parse("DescribeConversionTasks", params)
    query.check_dry_run(data)
    tasks = service.list(CONVERSION_KINDS, data.get("ConversionTaskIds") or (), caller.sees)
    return {"ConversionTasks": [views.conversion_task(t) for t in tasks]}


def cancel_conversion_task(service: ImportService, params: Params, caller: Caller) -> None:
    """CancelConversionTask → no output (``<return>true</return>``)."""
    data = query.parse("CancelConversionTask", params)
    query.check_dry_run(data)
    service.cancel(data["ConversionTaskId"], CONVERSION_KINDS, data.get("ReasonMessage"), caller.sees)
    return None
