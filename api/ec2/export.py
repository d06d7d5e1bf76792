"""Export actions: CreateInstanceExportTask, DescribeExportTasks, CancelExportTask, ExportImage,
DescribeExportImageTasks — and the views of export tasks in EC2's shapes.

The logic is :class:`appliance.service.exports.ExportService` (which shares the import service's
store and engine); this module parses, calls it and renders. ``RoleName`` (an IAM role inside AWS)
is accepted, echoed and otherwise ignored.

States, as AWS reports them:

==================  ======================  ================================  =====================
task state          ExportTask ``State``    ExportImageTask ``Status``        ``StatusMessage``
==================  ======================  ================================  =====================
pending, running    active                  active (``Progress`` in percent)  the phase
cancelling          cancelling              deleting                          the cancel reason
cancelled           cancelled               deleted                           the cancel reason
failed              cancelled               deleted                           ``ClientError: …``
completed           completed               completed                         —
==================  ======================  ================================  =====================

Filters: DescribeExportTasks takes ``state`` (the ExportTask states) and ``instance-id``;
DescribeExportImageTasks takes ``task-state`` (``active|completed|deleting|deleted``) and
``image-id``. Values of one filter are ORed, filters are ANDed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from appliance.errors import InvalidTaskId, TaskNotFound
from appliance.redact import redact
from appliance.service.exports import IMAGE_KINDS, INSTANCE_KINDS, ExportService, object_key
from appliance.service.imports import ImportService
from appliance.service.importtasks import Caller
from appliance.store import Task, TaskState

from . import query
from .errors import Ec2Error, missing_parameter
from .image_import import _page, _tags

Params = Mapping[str, Sequence[str]]

_EXPORT_STATE = {
    TaskState.PENDING: "active",
    TaskState.RUNNING: "active",
    TaskState.CANCELLING: "cancelling",
    TaskState.CANCELLED: "cancelled",
    TaskState.FAILED: "cancelled",
    TaskState.COMPLETED: "completed",
}
_IMAGE_STATUS = {
    TaskState.PENDING: "active",
    TaskState.RUNNING: "active",
    TaskState.CANCELLING: "deleting",
    TaskState.CANCELLED: "deleted",
    TaskState.FAILED: "deleted",
    TaskState.COMPLETED: "completed",
}


def _exports(service: ImportService) -> ExportService:
    return ExportService(service.config, service.store, engine=service.engine)


def _opt(params: dict[str, Any], key: str) -> Any:
    value = params.get(key)
    return None if value == "" else value


def _message(task: Task) -> str | None:
    if task.state in (TaskState.PENDING, TaskState.RUNNING):
        return task.phase or "pending"
    if task.state in (TaskState.CANCELLING, TaskState.CANCELLED):
        return task.cancel_reason or "Cancelled by user"
    if task.state is TaskState.FAILED:
        code = task.error_code or "InternalError"
        return f"ClientError: {code}: {task.error_message}" if task.error_message else f"ClientError: {code}"
    return None


def _task_tags(task: Task) -> list[dict[str, str]] | None:
    tags = task.params.get("tags") or []
    return [{"Key": t["key"], "Value": t.get("value", "")} for t in tags] or None


def export_task(task: Task) -> dict[str, Any]:
    """``ExportTask`` of an export-instance task."""
    p = task.params
    return redact(
        {
            "Description": _opt(p, "description"),
            "ExportTaskId": task.id,
            "ExportToS3Task": {
                "ContainerFormat": _opt(p, "container_format"),
                "DiskImageFormat": p.get("disk_image_format"),
                "S3Bucket": p.get("s3_bucket"),
                "S3Key": object_key(task),
            },
            "InstanceExportDetails": {
                "InstanceId": p.get("instance_id"),
                "TargetEnvironment": p.get("target_environment"),
            },
            "State": _EXPORT_STATE[task.state],
            "StatusMessage": _message(task),
            "Tags": _task_tags(task),
        }
    )


def export_image_task(task: Task) -> dict[str, Any]:
    """``ExportImageTask`` of an export-image task."""
    p = task.params
    active = task.state in (TaskState.PENDING, TaskState.RUNNING)
    return redact(
        {
            "Description": _opt(p, "description"),
            "ExportImageTaskId": task.id,
            "ImageId": p.get("image_id"),
            "Progress": str(int(task.percent or 0)) if active else None,
            "S3ExportLocation": {"S3Bucket": p.get("s3_bucket"), "S3Prefix": _opt(p, "s3_prefix")},
            "Status": _IMAGE_STATUS[task.state],
            "StatusMessage": _message(task),
            "Tags": _task_tags(task),
        }
    )


def _not_found(exc: TaskNotFound | InvalidTaskId) -> Ec2Error:
    # the message alone: str() would prefix the toolkit's own code (TaskNotFound: ...)
    return Ec2Error("InvalidExportTaskID.NotFound", exc.message)


def create_instance_export_task(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """CreateInstanceExportTask → ``{ExportTask}``."""
    data = query.parse("CreateInstanceExportTask", params)
    s3 = data.get("ExportToS3Task") or {}
    for member in ("DiskImageFormat", "S3Bucket"):
        if not s3.get(member):
            raise missing_parameter(f"ExportToS3.{member}")
    task = _exports(service).export_instance(
        data["InstanceId"],
        target_environment=data["TargetEnvironment"],
        disk_image_format=s3["DiskImageFormat"],
        bucket=s3["S3Bucket"],
        prefix=s3.get("S3Prefix"),
        container_format=s3.get("ContainerFormat"),
        description=data.get("Description"),
        tags=_tags(data),
        account=caller.account,
        sees=caller.sees,
    )
    return {"ExportTask": export_task(task)}


def describe_export_tasks(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """DescribeExportTasks → ``{ExportTasks}`` (not paginated)."""
    data = query.parse("DescribeExportTasks", params)
    try:
        tasks = _exports(service).list(INSTANCE_KINDS, data.get("ExportTaskIds") or (), caller.sees)
    except (TaskNotFound, InvalidTaskId) as exc:
        raise _not_found(exc) from None
    views = [export_task(t) for t in tasks]
    for f in data.get("Filters") or []:
        allowed = set(f.get("Values") or [])
        if f.get("Name") == "state":
            views = [v for v in views if v["State"] in allowed]
        else:  # instance-id (rules.ENUMS allows no other name)
            views = [v for v in views if v["InstanceExportDetails"]["InstanceId"] in allowed]
    return {"ExportTasks": views}


def cancel_export_task(service: ImportService, params: Params, caller: Caller) -> None:
    """CancelExportTask → no output (``<return>true</return>``)."""
    data = query.parse("CancelExportTask", params)
    try:
        _exports(service).cancel(data["ExportTaskId"], caller.sees)
    except (TaskNotFound, InvalidTaskId) as exc:
        raise _not_found(exc) from None


def export_image(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """ExportImage → ``ExportImageResult``."""
    data = query.parse("ExportImage", params)
    location = data["S3ExportLocation"]
    exports = _exports(service)
    # the image is resolved before DryRun: a dry run of an export of an unknown image is refused
    exports.resolver.image(data["ImageId"], caller.sees)
    query.check_dry_run(data)
    task = exports.export_image(
        data["ImageId"],
        disk_image_format=data["DiskImageFormat"],
        bucket=location["S3Bucket"],
        prefix=location.get("S3Prefix"),
        role_name=data.get("RoleName"),
        description=data.get("Description"),
        client_token=data.get("ClientToken"),
        tags=_tags(data),
        account=caller.account,
        sees=caller.sees,
    )
    view = export_image_task(task)
    view["DiskImageFormat"] = task.params.get("disk_image_format")
    view["RoleName"] = _opt(task.params, "role_name")
    return view


def describe_export_image_tasks(service: ImportService, params: Params, caller: Caller) -> dict[str, Any]:
    """DescribeExportImageTasks → ``{ExportImageTasks, NextToken}`` (paginated)."""
    data = query.parse("DescribeExportImageTasks", params)
    query.check_dry_run(data)
    try:
        tasks = _exports(service).list(IMAGE_KINDS, data.get("ExportImageTaskIds") or (), caller.sees)
    except (TaskNotFound, InvalidTaskId) as exc:
        raise _not_found(exc) from None
    for f in data.get("Filters") or []:
        allowed = set(f.get("Values") or [])
        if f.get("Name") == "task-state":
            tasks = [t for t in tasks if _IMAGE_STATUS[t.state] in allowed]
        else:  # image-id
            tasks = [t for t in tasks if t.params.get("image_id") in allowed]
    page, token = _page(tasks, data.get("MaxResults"), data.get("NextToken"))
    return {"ExportImageTasks": [export_image_task(t) for t in page], "NextToken": token}
