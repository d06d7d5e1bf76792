"""Bundle actions: BundleInstance, DescribeBundleTasks, CancelBundleTask, and CreateImage.

The logic is :class:`appliance.service.bundles.BundleService` (sharing the import service's store and
engine); this module parses, calls it and renders ``BundleTask`` in EC2's shape.

States, as AWS names them (``BundleTaskState``):

====================  ==============================================================================
``State``             task
====================  ==============================================================================
pending               pending (queued)
waiting-for-shutdown  running, before the bundle stream starts: the point-in-time copy of the root
                      volume is taken and attached (the instance itself is never stopped)
bundling              running: tar → gzip → encrypt → parts uploaded as they are complete
storing               running, every byte bundled: the last part and the manifest are stored
cancelling            cancelling
complete              completed
failed                failed (``BundleTaskError``: the task's code and message) or cancelled (code
                      ``Cancelled``)
====================  ==============================================================================

``Progress`` is a percentage string (``"42%"``), as AWS shows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from appliance.errors import InvalidTaskId, TaskNotFound
from appliance.service.bundles import BundleService
from appliance.service.imports import ImportService
from appliance.service.importtasks import Caller
from appliance.store import Task, TaskState

from . import query
from .errors import Ec2Error, missing_parameter

Params = Mapping[str, Sequence[str]]


def _bundles(service: ImportService) -> BundleService:
    return BundleService(service.config, service.store, engine=service.engine)


def _state(task: Task) -> str:
    if task.state is TaskState.PENDING:
        return "pending"
    if task.state is TaskState.RUNNING:
        if task.phase != "bundling":
            return "waiting-for-shutdown"
        return "storing" if (task.percent or 0) >= 100 else "bundling"
    if task.state is TaskState.CANCELLING:
        return "cancelling"
    if task.state is TaskState.COMPLETED:
        return "complete"
    return "failed"


def _progress(task: Task) -> str:
    if task.state is TaskState.COMPLETED:
        return "100%"
    if task.state is TaskState.RUNNING and task.phase == "bundling":
        return f"{int(task.percent or 0)}%"
    return "0%"


def _error(task: Task) -> dict[str, str] | None:
    if task.state is TaskState.FAILED:
        return {"Code": task.error_code or "InternalError", "Message": task.error_message or ""}
    if task.state is TaskState.CANCELLED:
        return {"Code": "Cancelled", "Message": task.cancel_reason or "Cancelled by user"}
    return None


def bundle_task(task: Task) -> dict[str, Any]:
    """``BundleTask`` of a bundle-instance task (the upload policy's signature is never echoed)."""
    p = task.params
    s3 = {
        "AWSAccessKeyId": p.get("aws_access_key_id") or None,
        "Bucket": p.get("s3_bucket"),
        "Prefix": p.get("s3_prefix"),
        "UploadPolicy": p.get("upload_policy") or None,
    }
    view = {
        "BundleId": task.id,
        "BundleTaskError": _error(task),
        "InstanceId": p.get("instance_id"),
        "Progress": _progress(task),
        "StartTime": task.created_at,
        "State": _state(task),
        "Storage": {"S3": s3},
        "UpdateTime": task.updated_at,
    }
    return {k: v for k, v in view.items() if v is not None}


def _not_found(exc: Exception) -> Ec2Error:
    return Ec2Error("InvalidBundleID.NotFound", str(exc))


def bundle_instance(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """BundleInstance → ``{BundleTask}``."""
    data = query.parse("BundleInstance", params)
    s3 = (data.get("Storage") or {}).get("S3") or {}
    for member in ("Bucket", "Prefix", "AWSAccessKeyId", "UploadPolicy", "UploadPolicySignature"):
        if not s3.get(member):
            raise missing_parameter(f"Storage.S3.{member}")
    task = _bundles(service).bundle_instance(
        data["InstanceId"],
        bucket=s3["Bucket"],
        prefix=s3["Prefix"],
        access_key=s3["AWSAccessKeyId"],
        upload_policy=s3["UploadPolicy"],
        upload_policy_signature=s3["UploadPolicySignature"],
        account=caller.account,
        sees=caller.sees,
        dry_run=bool(data.get("DryRun")),
    )
    if task is None:
        query.check_dry_run(data)
        raise AssertionError("a dry run answers DryRunOperation")
    return {"BundleTask": bundle_task(task)}


_FILTERS: dict[str, Any] = {
    "bundle-id": lambda v: v.get("BundleId"),
    "error-code": lambda v: (v.get("BundleTaskError") or {}).get("Code"),
    "error-message": lambda v: (v.get("BundleTaskError") or {}).get("Message"),
    "instance-id": lambda v: v.get("InstanceId"),
    "progress": lambda v: v.get("Progress"),
    "s3-bucket": lambda v: v["Storage"]["S3"].get("Bucket"),
    "s3-prefix": lambda v: v["Storage"]["S3"].get("Prefix"),
    "start-time": lambda v: v.get("StartTime"),
    "state": lambda v: v.get("State"),
    "update-time": lambda v: v.get("UpdateTime"),
}
FILTER_NAMES = tuple(_FILTERS)


def describe_bundle_tasks(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """DescribeBundleTasks → ``{BundleTasks}`` (not paginated). Values of one filter are ORed, filters
    ANDed."""
    data = query.parse("DescribeBundleTasks", params)
    query.check_dry_run(data)
    try:
        tasks = _bundles(service).list(data.get("BundleIds") or (), caller.sees)
    except (TaskNotFound, InvalidTaskId) as exc:
        raise _not_found(exc) from None
    views = [bundle_task(t) for t in tasks]
    for f in data.get("Filters") or []:
        allowed = set(f.get("Values") or [])
        member = _FILTERS[f["Name"]]  # rules.ENUMS allows no other name
        views = [v for v in views if str(member(v)) in allowed]
    return {"BundleTasks": views}


def cancel_bundle_task(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """CancelBundleTask → ``{BundleTask}`` (now ``cancelling``)."""
    data = query.parse("CancelBundleTask", params)
    bundles = _bundles(service)
    try:
        bundles.get(data["BundleId"], caller.sees)
        query.check_dry_run(data)
        task = bundles.cancel(data["BundleId"], caller.sees)
    except (TaskNotFound, InvalidTaskId) as exc:
        raise _not_found(exc) from None
    return {"BundleTask": bundle_task(task)}


def create_image(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """CreateImage → ``{ImageId}``: snapshots of the instance's EBS volumes registered as an image in the
    controlling cloud, while the request waits (``NoReboot``, ``TagSpecifications``,
    ``BlockDeviceMappings``: see :mod:`appliance.targets.ec2_images`). ``SnapshotLocation`` (Outposts)
    and ``BootModeOverride`` are refused: the appliance cannot honour them."""
    data = query.parse("CreateImage", params)
    for member in ("SnapshotLocation", "BootModeOverride"):
        if data.get(member) is not None:
            raise Ec2Error(
                "InvalidParameterValue", f"CreateImage: {member} is not supported by this appliance"
            )
    created = _bundles(service).create_image(
        data["InstanceId"],
        data["Name"],
        description=data.get("Description"),
        block_device_mappings=data.get("BlockDeviceMappings") or [],
        no_reboot=bool(data.get("NoReboot")),
        tag_specifications=data.get("TagSpecifications") or [],
        sees=caller.sees,
        dry_run=bool(data.get("DryRun")),
    )
    if created is None:
        query.check_dry_run(data)
        raise AssertionError("a dry run answers DryRunOperation")
    return {"ImageId": created.image_id}
