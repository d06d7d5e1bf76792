"""Appliance tasks → EC2 output structures (botocore member names), per the issue-3 state mapping.

Conversion tasks (ImportVolume / ImportInstance), as Eucalyptus reported them:

==================  ==============  =================================================
task state          EC2 ``State``   ``StatusMessage``
==================  ==============  =================================================
pending, running    active          the phase (``Pending import-image upload``, ``downloading``…)
cancelling          cancelling      the cancel reason, else ``Cancelled by user``
cancelled           cancelled       the cancel reason, else ``Cancelled by user``
failed              cancelled       ``ClientError: <code>: <message>``
completed           completed       —
==================  ==============  =================================================

Import image / snapshot tasks: pending/running → ``active`` (message = sub-state, ``progress`` =
whole percent), completed → ``completed``, cancelling → ``deleting``, cancelled → ``deleted``,
failed → ``deleted`` with ``ClientError: …`` as AWS does.

While an ImportImage of several disks (DiskContainers, or an OVA's disks) is pending or running, each
``SnapshotDetail`` is its own disk's (:mod:`appliance.service.diskstatus`): ``Status`` ``pending``
before its turn, ``active`` with its own ``Progress``, ``StatusMessage`` (``downloading``,
``validating``, ``converting``, ``writing``, …) and ``DiskImageSize`` while it runs, ``completed``
(with its ``SnapshotId``, size and format) once stored. The task's ``Progress`` is then the mean of
its disks' (each disk counts alike) for DiskContainers, so it never goes back; an OVA's, whose disks
are only known once it is opened, stays the task's own.

Every ``StatusMessage`` (except euca2ools' ``Pending import-image upload``) is followed by a
summary of the task's error and warning findings (:func:`appliance.service.summary.findings_summary`),
e.g. ``completed; warnings: Guest.FstabDeviceMissing (…)``; a completed task without findings
keeps no message. A failed *snapshot* task's
``SnapshotTaskDetail.Status`` is ``error`` instead: the ``SnapshotImported`` waiter fails fast on
``error`` rather than polling a dead task for its 40 attempts; the task-level ``task-state``
filter still files it under ``deleted``.

``Encrypted`` and ``KmsKeyId`` of image and snapshot imports echo the request until the image is
stored; a completed task reports the encryption the image target read back from the stored image
(:func:`appliance.service.importviews.encryption_report`): ``Encrypted`` true only when the stored
object is encrypted, ``KmsKeyId`` the key the store names (for S3 on AWS, the key's ARN).

Every conversion task echoes ``image.format``, ``image.size`` (bytes), ``image.importManifestUrl``
and ``volume.size``: euca2ools ``resume-import`` reads them back to upload the parts. Every view is
redacted (:mod:`appliance.redact`): the echoed manifest URL keeps its bucket and key (all that
``resume-import`` takes from it) but not its signature, and no message carries a secret.
"""

from __future__ import annotations

from typing import Any

from appliance.redact import redact
from appliance.service.diskstatus import from_ova, overall_percent
from appliance.service.importtasks import IMPORT_VOLUME, device_names
from appliance.service.importviews import encryption_report, guest_report, outcome
from appliance.service.summary import findings_summary
from appliance.store import Task, TaskState

from .xml import format_timestamp

_CONVERSION_STATE = {
    TaskState.PENDING: "active",
    TaskState.RUNNING: "active",
    TaskState.CANCELLING: "cancelling",
    TaskState.CANCELLED: "cancelled",
    TaskState.FAILED: "cancelled",
    TaskState.COMPLETED: "completed",
}

_IMPORT_STATUS = {
    TaskState.PENDING: "active",
    TaskState.RUNNING: "active",
    TaskState.CANCELLING: "deleting",
    TaskState.CANCELLED: "deleted",
    TaskState.FAILED: "deleted",
    TaskState.COMPLETED: "completed",
}

#: conversion-task statusMessage for each phase of an active task (AWS/Eucalyptus wording)
_PHASE_MESSAGES = {"pending-upload": "Pending import-image upload"}


def conversion_state(task: Task) -> str:
    """EC2 ``ConversionTask.State`` of ``task``."""
    return _CONVERSION_STATE[task.state]


def import_status(task: Task) -> str:
    """EC2 ``Status`` of an import image/snapshot task (also the ``task-state`` filter value)."""
    return _IMPORT_STATUS[task.state]


def _failure_message(task: Task) -> str:
    code = task.error_code or "InternalError"
    return f"ClientError: {code}: {task.error_message}" if task.error_message else f"ClientError: {code}"


def _with_findings(task: Task, base: str | None) -> str | None:
    """``base`` plus the task's error and warning findings, most severe first (capped at 255
    characters); a completed task with findings says ``completed; warnings: …``."""
    if task.state is TaskState.COMPLETED and base is None:
        summary = findings_summary(task.findings, base="completed")
        return None if summary == "completed" else summary  # nothing worth saying: no message, as before
    exclude = (task.error_code,) if task.state is TaskState.FAILED else ()
    return findings_summary(task.findings, base=base, exclude_codes=exclude)


def _conversion_message(task: Task) -> str | None:
    state = task.state
    if state in (TaskState.PENDING, TaskState.RUNNING):
        if task.phase == "pending-upload":
            # euca2ools matches this exact string to know it should upload the parts
            return _PHASE_MESSAGES[task.phase]
        return _with_findings(task, task.phase or "pending")
    if state in (TaskState.CANCELLING, TaskState.CANCELLED):
        return _with_findings(task, _cancel_reason(task))
    if state is TaskState.FAILED:
        return _with_findings(task, _failure_message(task))
    return _with_findings(task, None)


def _import_message(task: Task) -> str | None:
    state = task.state
    if state in (TaskState.PENDING, TaskState.RUNNING):
        phase = task.phase if task.phase and task.phase != "pending-upload" else None
        return _with_findings(task, phase or "pending")
    if state in (TaskState.CANCELLING, TaskState.CANCELLED):
        return _with_findings(task, _cancel_reason(task))
    if state is TaskState.FAILED:
        return _with_findings(task, _failure_message(task))
    return _with_findings(task, None)


def _cancel_reason(task: Task) -> str:
    return task.cancel_reason or "Cancelled by user"


def _progress(task: Task, disks: list[dict[str, Any]] | None = None) -> str | None:
    if task.state not in (TaskState.PENDING, TaskState.RUNNING):
        return None
    if disks and not from_ova(task, disks):  # the disks of the request, each counting alike
        return str(int(overall_percent(disks)))
    return str(int(task.percent or 0))


def _opt(mapping: dict[str, Any], key: str) -> Any:
    # Workflow parameters store an absent optional string as "": report it as absent.
    value = mapping.get(key)
    return None if value == "" else value


def _result(task: Task) -> dict[str, Any]:
    # The workflows' registered results, flattened by the appliance (it knows their layout).
    return outcome(task)


def _expiration(task: Task) -> str | None:
    value = _opt(task.params, "expiration_time")
    return format_timestamp(value) if value else None


def _tags(task: Task) -> list[dict[str, str]] | None:
    tags = task.params.get("tags") or []
    return [{"Key": t["key"], "Value": t.get("value", "")} for t in tags] or None


def _disk_image(task: Task) -> dict[str, Any]:
    p = task.params
    return {
        "Format": _opt(p, "image_format"),
        "Size": _opt(p, "image_bytes"),
        "ImportManifestUrl": _opt(p, "manifest_url"),
    }


def _volume(task: Task) -> dict[str, Any]:
    return {"Id": _result(task).get("volume_id"), "Size": task.params.get("volume_size")}


def conversion_task(task: Task) -> dict[str, Any]:
    """``ConversionTask`` for an import-volume or import-instance task."""
    p = task.params
    state = conversion_state(task)
    message = _conversion_message(task)
    out: dict[str, Any] = {
        "ConversionTaskId": task.id,
        "ExpirationTime": _expiration(task),
        "State": state,
        "StatusMessage": message,
    }
    # bytes written to the target over the task's life (bytes_done restarts with each phase)
    bytes_converted = task.bytes_converted or 0
    if task.kind == IMPORT_VOLUME:
        out["ImportVolume"] = {
            "AvailabilityZone": _opt(p, "availability_zone"),
            "BytesConverted": bytes_converted,
            "Description": _opt(p, "description"),
            "Image": _disk_image(task),
            "Volume": _volume(task),
        }
    else:
        out["ImportInstance"] = {
            "Description": _opt(p, "description"),
            "InstanceId": _result(task).get("instance_id"),
            "Platform": _opt(p, "platform"),
            "Volumes": [
                {
                    "AvailabilityZone": _opt(p, "availability_zone"),
                    "BytesConverted": bytes_converted,
                    "Description": _opt(p, "volume_description"),
                    "Image": _disk_image(task),
                    "Volume": _volume(task),
                    "Status": state,
                    "StatusMessage": message,
                }
            ],
        }
    return redact(out)


def _user_bucket(container: dict[str, Any]) -> dict[str, str] | None:
    if not _opt(container, "bucket") and not _opt(container, "key"):
        return None
    return {"S3Bucket": _opt(container, "bucket"), "S3Key": _opt(container, "key")}


def _disk_format(container: dict[str, Any], disk: dict[str, Any] | None) -> str | None:
    # A disk out of an OVA has the format inspection found (VMDK), not the container's (OVA).
    if disk is not None and disk.get("ova_disk") and disk.get("format"):
        return str(disk["format"]).upper()
    return _opt(container, "format")


def _snapshot_detail(
    task: Task,
    container: dict[str, Any],
    snapshot_id: str | None,
    disk: dict[str, Any] | None = None,
    device_name: str | None = None,
    sized: bool = True,
) -> dict[str, Any]:
    """One ``SnapshotDetail``: of ``disk`` (one of ``outcome(task)["disks"]``) when the task stored
    it, else of the task as a whole (its size being the transfer's, while it runs, unless not
    ``sized``: one of several disks, whose own size is not known yet)."""
    if disk is not None:
        size = disk.get("size")
    elif task.state is TaskState.COMPLETED:
        size = _result(task).get("size")
    else:
        size = task.bytes_total if sized else None
    return {
        "Description": _opt(container, "description"),
        "DeviceName": device_name,
        "DiskImageSize": float(size) if size is not None else None,
        "Format": _disk_format(container, disk),
        "Progress": _progress(task),
        "SnapshotId": snapshot_id,
        "Status": import_status(task),
        "StatusMessage": _import_message(task),
        "Url": _opt(container, "url"),
        "UserBucket": _user_bucket(container),
    }


def _encryption(task: Task) -> dict[str, Any]:
    """``{Encrypted, KmsKeyId}`` of an image or snapshot import (see the module docstring)."""
    report = encryption_report(task) or {}
    shown = report.get("applied") if task.state is TaskState.COMPLETED else report.get("requested")
    return {"Encrypted": shown is not None, "KmsKeyId": (shown or {}).get("kms_key_id")}


def _running_detail(container: dict[str, Any], disk: dict[str, Any]) -> dict[str, Any]:
    """The ``SnapshotDetail`` of one disk of a running multi-disk import (``disk``: one of
    :func:`appliance.service.diskstatus.running_disks`)."""
    size = disk.get("size")
    state = disk["state"]
    return {
        "Description": _opt(container, "description"),
        "DeviceName": disk["device_name"],
        "DiskImageSize": float(size) if size is not None else None,
        "Format": _disk_format(container, disk),
        "Progress": str(int(disk["percent"])) if state in ("pending", "active") else None,
        "SnapshotId": disk.get("snapshot_id"),
        "Status": state,
        "StatusMessage": disk.get("phase"),
        "Url": _opt(container, "url"),
        "UserBucket": _user_bucket(container),
    }


def _image_snapshot_details(task: Task, running: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One ``SnapshotDetail`` per disk, in request order (an OVA's disks in its OVF's order): once
    the disks are stored, each with its own size, format, device and snapshot id; while several run
    (``running``: :meth:`~appliance.service.imports.ImportService.disk_status`), each with its own
    status; else one per DiskContainer, the boot disk's with the task's snapshot id."""
    containers = _opt(task.params, "disk_containers") or []
    if running and task.state in (TaskState.PENDING, TaskState.RUNNING):
        return [
            _running_detail(containers[d["container"] - 1], d)
            for d in running
            if d["container"] <= len(containers)
        ]
    disks = _result(task).get("disks") or []
    if disks:
        return [
            _snapshot_detail(
                task, containers[d["container"] - 1], d["snapshot_id"], disk=d, device_name=d["device_name"]
            )
            for d in disks
            if d["container"] <= len(containers)
        ]
    names = device_names([c.get("device_name") or None for c in containers])
    first = _result(task).get("snapshot_id")
    return [
        _snapshot_detail(task, c, first if n == 0 else None, device_name=name, sized=len(containers) == 1)
        for n, (c, name) in enumerate(zip(containers, names, strict=True))
    ]


#: EC2's names for what guest validation found: the OS family, and how the disk boots
_PLATFORMS = {"linux": "Linux", "windows": "Windows"}
_BOOT_MODES = {"bios": "legacy-bios", "uefi": "uefi", "bios+uefi": "uefi-preferred"}


def _detected(task: Task) -> dict[str, str]:
    """``{platform, architecture, boot_mode}`` as EC2 names them, from the guest validation of an image
    import's boot disk (what EC2 reports for an import that did not give them); {} before it ran."""
    guest = guest_report(task.result) if isinstance(task.result, dict) else None
    if not guest:
        return {}
    os_ = guest.get("os") or {}
    found = {
        "platform": _PLATFORMS.get(str(os_.get("family") or "").lower()),
        "architecture": os_.get("architecture"),
        "boot_mode": _BOOT_MODES.get(str(guest.get("boot_mode") or "")),
    }
    return {k: v for k, v in found.items() if v}


def import_image_task(task: Task, disks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``ImportImageTask`` (DescribeImportImageTasks item) for an import-image task; ``disks``: the
    status of each of its disks while several run (:meth:`~appliance.service.imports.ImportService.
    disk_status`), None to show every disk with the task's."""
    p = task.params
    found = _detected(task)
    view = {
        "Architecture": _opt(p, "architecture") or found.get("architecture"),
        "BootMode": _opt(p, "boot_mode") or found.get("boot_mode"),
        "Description": _opt(p, "description"),
        **_encryption(task),
        "Hypervisor": _opt(p, "hypervisor"),
        "ImageId": _result(task).get("image_id"),
        "ImportTaskId": task.id,
        "LicenseType": _opt(p, "license_type"),
        "Platform": _opt(p, "platform") or found.get("platform"),
        "Progress": _progress(task, disks),
        "SnapshotDetails": _image_snapshot_details(task, disks),
        "Status": import_status(task),
        "StatusMessage": _import_message(task),
        "Tags": _tags(task),
    }
    return redact(view)


def import_image_result(task: Task, disks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``ImportImageResult``: the task view without ``BootMode``, which that shape lacks."""
    out = import_image_task(task, disks)
    del out["BootMode"]
    return out


def snapshot_task_detail(task: Task) -> dict[str, Any]:
    """``SnapshotTaskDetail`` of an import-snapshot task (``Status`` ``error`` when it failed)."""
    container = task.params.get("disk_container") or {}
    detail = _snapshot_detail(task, container, _result(task).get("snapshot_id"))
    del detail["DeviceName"]  # not a member of SnapshotTaskDetail
    # the disk's own description, else the request's (as EC2 shows an import given only --description)
    detail["Description"] = detail["Description"] or _opt(task.params, "description")
    detail |= _encryption(task)
    if task.state is TaskState.FAILED:
        detail["Status"] = "error"
    return redact(detail)


def import_snapshot_task(task: Task) -> dict[str, Any]:
    """``ImportSnapshotTask`` (also the ``ImportSnapshotResult`` members) for an import-snapshot task."""
    view = {
        "Description": _opt(task.params, "description"),
        "ImportTaskId": task.id,
        "SnapshotTaskDetail": snapshot_task_detail(task),
        "Tags": _tags(task),
    }
    return redact(view)


def cancel_import_result(before: Task, after: Task) -> dict[str, Any]:
    """``CancelImportTaskResult`` from the task before and after the cancel."""
    return {"ImportTaskId": after.id, "PreviousState": import_status(before), "State": import_status(after)}
