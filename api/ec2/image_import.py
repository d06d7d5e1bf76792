"""Image and snapshot import actions: ImportImage, ImportSnapshot, DescribeImportImageTasks,
DescribeImportSnapshotTasks, CancelImportTask.

Members that only make sense inside AWS are accepted and ignored: ``RoleName`` (an IAM role),
``ClientData`` (upload timing the client reports), ``LicenseSpecifications`` and
``UsageOperation`` (AWS billing). Members the appliance cannot honour are refused rather than
silently dropped: ``DiskContainer.N.SnapshotId``, and ``Encrypted``/``KmsKeyId`` when the
configured image target cannot encrypt (``InvalidParameter``). Where it can (the ``s3`` image
target), the image is stored server-side encrypted (``AES256``, or ``aws:kms`` with ``KmsKeyId``)
and the tasks report the encryption the stored object has
(:mod:`appliance.targets.encryption`).

Beyond AWS, ImportImage takes a kernel, a ramdisk and a virtualization type as the extra members
``KernelId``, ``RamdiskId``, ``VirtualizationType`` or as an ``[imaging:…]`` token in
``Description`` (:mod:`appliance.service.bootparams`), and every import an expected sha256 of its
source: ``ExpectedSha256`` or ``[imaging:sha256=…]`` in ``Description`` for the first (or only)
disk, ``DiskContainer.N.ExpectedSha256`` or the token in ``DiskContainer.N.Description`` for each
disk (:mod:`appliance.service.expected`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

from appliance.service import bootparams, expected
from appliance.service.imports import ImportService
from appliance.service.importtasks import IMAGE_KINDS, SNAPSHOT_KINDS, Caller, DiskContainer
from appliance.store import Task
from appliance.targets.encryption import Encryption

from . import query, views
from .errors import Ec2Error, invalid_value, missing_parameter

Params = Mapping[str, Sequence[str]]

#: wire names of the boot settings (extra members, beyond AWS) in ImportImage
BOOT_MEMBERS = {
    "kernel_id": "KernelId",
    "ramdisk_id": "RamdiskId",
    "virtualization_type": "VirtualizationType",
}

IMPORT_KINDS = IMAGE_KINDS + SNAPSHOT_KINDS


def _container(c: Mapping[str, Any], prefix: str) -> DiskContainer:
    if c.get("SnapshotId"):
        raise invalid_value(f"{prefix}.SnapshotId is not supported: import from a Url or a UserBucket")
    bucket = c.get("UserBucket") or {}
    return DiskContainer(
        format=c.get("Format"),
        url=c.get("Url"),
        bucket=bucket.get("S3Bucket"),
        key=bucket.get("S3Key"),
        description=c.get("Description"),
        device_name=c.get("DeviceName"),
        # beyond AWS: the disk's own expected sha256 (its extra member or its Description's token)
        expected_sha256=expected.resolve_disk(c.get(expected.MEMBER), c.get("Description"), prefix),
    )


def _tags(data: Mapping[str, Any]) -> list[dict[str, str]]:
    return [
        {"key": tag.get("Key", ""), "value": tag.get("Value", "")}
        for spec in data.get("TagSpecifications") or []
        for tag in spec.get("Tags") or []
    ]


def _encryption(service: ImportService, data: Mapping[str, Any]) -> Encryption | None:
    # checked before DryRun: a dry run of a request the appliance would refuse is refused
    return service.encryption(bool(data.get("Encrypted")), data.get("KmsKeyId"))


def import_image(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """ImportImage → ``ImportImageResult``."""
    data = query.parse("ImportImage", params)
    containers = data.get("DiskContainers") or []
    if not containers:
        raise missing_parameter("DiskContainer")
    disks = [_container(c, f"DiskContainer.{i}") for i, c in enumerate(containers, 1)]
    service.check_containers(disks)
    encryption = _encryption(service, data)
    boot = bootparams.resolve(
        {field: data.get(wire) for field, wire in BOOT_MEMBERS.items()},
        data.get("Description"),
        names=BOOT_MEMBERS | {"boot_mode": "BootMode"},
        boot_mode=data.get("BootMode"),
    )
    digest = expected.resolve(data.get(expected.MEMBER), data.get("Description"))
    query.check_dry_run(data)
    task = service.import_image(
        disks,
        architecture=data.get("Architecture"),
        platform=data.get("Platform"),
        boot_mode=data.get("BootMode"),
        license_type=data.get("LicenseType"),
        hypervisor=data.get("Hypervisor"),
        description=data.get("Description"),
        client_token=data.get("ClientToken"),
        tags=_tags(data),
        encryption=encryption,
        account=caller.account,
        expected_sha256=digest,
        **boot.to_dict(),
    )
    return views.import_image_result(task, service.disk_status(task))


def import_snapshot(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """ImportSnapshot → ``ImportSnapshotResult``."""
    data = query.parse("ImportSnapshot", params)
    if not data.get("DiskContainer"):
        raise missing_parameter("DiskContainer")
    disk = _container(data["DiskContainer"], "DiskContainer")
    service.check_containers([disk])
    encryption = _encryption(service, data)
    digest = expected.resolve(data.get(expected.MEMBER), data.get("Description"))
    query.check_dry_run(data)
    task = service.import_snapshot(
        disk,
        description=data.get("Description"),
        client_token=data.get("ClientToken"),
        tags=_tags(data),
        encryption=encryption,
        account=caller.account,
        expected_sha256=digest,
    )
    return views.import_snapshot_task(task)


def _state_filter(data: Mapping[str, Any]) -> list[set[str]]:
    # Each filter's values are ORed, filters are ANDed; names/values were validated by query.parse.
    return [set(f.get("Values") or []) for f in data.get("Filters") or []]


def _encode_token(task_id: str) -> str:
    return base64.urlsafe_b64encode(f"after:{task_id}".encode()).decode()


def _page(tasks: list[Task], max_results: int | None, token: str | None) -> tuple[list[Task], str | None]:
    """One page of ``tasks`` (newest first). The token names the last task returned, so tasks
    created between pages do not shift what the next page holds."""
    start = 0
    if token:
        try:
            marker = base64.urlsafe_b64decode(token.encode()).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            marker = ""
        ids = [t.id for t in tasks]
        if not marker.startswith("after:") or marker[6:] not in ids:
            raise Ec2Error(
                "InvalidPaginationToken", f"The pagination token {token} is not valid or has expired"
            )
        start = ids.index(marker[6:]) + 1
    if max_results is None:
        return tasks[start:], None
    page = tasks[start : start + max_results]
    more = start + max_results < len(tasks)
    return page, (_encode_token(page[-1].id) if more and page else None)


def _describe(
    service: ImportService, action: str, kinds: Sequence[str], params: Params, caller: Caller
) -> tuple[list[Task], str | None]:
    data = query.parse(action, params)
    max_results = data.get("MaxResults")  # 1 to 1000 (rules.BOUNDS)
    query.check_dry_run(data)
    tasks = service.list(kinds, data.get("ImportTaskIds") or (), caller.sees)
    for allowed in _state_filter(data):
        tasks = [t for t in tasks if views.import_status(t) in allowed]
    return _page(tasks, max_results, data.get("NextToken"))


def describe_import_image_tasks(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """DescribeImportImageTasks → ``{ImportImageTasks, NextToken}`` (paginated)."""
    tasks, token = _describe(service, "DescribeImportImageTasks", IMAGE_KINDS, params, caller)
    shown = [views.import_image_task(t, service.disk_status(t)) for t in tasks]
    return {"ImportImageTasks": shown, "NextToken": token}


def describe_import_snapshot_tasks(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """DescribeImportSnapshotTasks → ``{ImportSnapshotTasks, NextToken}`` (paginated)."""
    tasks, token = _describe(service, "DescribeImportSnapshotTasks", SNAPSHOT_KINDS, params, caller)
    return {"ImportSnapshotTasks": [views.import_snapshot_task(t) for t in tasks], "NextToken": token}


def cancel_import_task(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """CancelImportTask → ``{ImportTaskId, PreviousState, State}``."""
    data = query.parse("CancelImportTask", params)
    task_id = data.get("ImportTaskId")
    if not task_id:
        raise missing_parameter("ImportTaskId")
    query.check_dry_run(data)
    before = service.get(task_id, IMPORT_KINDS, caller.sees)
    after = service.cancel(task_id, IMPORT_KINDS, data.get("CancelReason"), caller.sees)
    return views.cancel_import_result(before, after)
