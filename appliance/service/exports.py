"""Export tasks: the appliance side of VM Export (CreateInstanceExportTask, ExportImage).

:class:`ExportService` turns validated export requests into tasks in the same store as the imports
(kinds :data:`EXPORT_INSTANCE`, :data:`EXPORT_IMAGE`), run by the same worker through the shipped
workflows ``export-instance.yaml`` / ``export-image.yaml``. Tenancy, client tokens, the active-task
limit and cancellation work as for imports (:class:`~appliance.service.imports.ImportService`).

What an id names is the resolver's business (:mod:`appliance.service.resolver`): the request is
refused at once (``InvalidAMIID.NotFound``, ``InvalidInstanceID.NotFound``) when the id names
nothing this caller may export, and the task records the stored output it resolved to.

The exported object's key is exactly ``S3Prefix + exportTaskId + '.' + extension`` with the
extension of the disk format (``vmdk``, ``vhd``, ``raw``) or ``ova`` for the OVA container, as AWS
names it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from ..errors import ImagingError, UsageError
from ..sources.s3names import check_bucket, check_key
from ..store import Task
from .importtasks import NO_ACCOUNT
from .resolving import ResolvingService

EXPORT_INSTANCE = "export-instance"
EXPORT_IMAGE = "export-image"
INSTANCE_KINDS = (EXPORT_INSTANCE,)
IMAGE_KINDS = (EXPORT_IMAGE,)
KINDS = INSTANCE_KINDS + IMAGE_KINDS

_PREFIX = {EXPORT_INSTANCE: "export-i-", EXPORT_IMAGE: "export-ami-"}
#: AWS's forms: 17 hex digits (older export-i ids had 8 lower-case alphanumerics)
TASK_ID_PATTERNS = {
    EXPORT_INSTANCE: re.compile(r"^export-i-(?:[a-z0-9]{8}|[0-9a-f]{17})$"),
    EXPORT_IMAGE: re.compile(r"^export-ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$"),
}

#: DiskImageFormat → (qemu-img output format, subformat, object key extension)
DISK_FORMATS: dict[str, tuple[str, str | None, str]] = {
    "VMDK": ("vmdk", None, "vmdk"),  # appliance.image.convert writes VMDK as streamOptimized
    "VHD": ("vhd", "dynamic", "vhd"),  # what AWS exports: a dynamic VHD
    "RAW": ("raw", None, "raw"),
}
TARGET_ENVIRONMENTS = ("citrix", "vmware", "microsoft")
#: the most characters of a Description AWS takes
MAX_DESCRIPTION = 255


def object_key(task: Task) -> str:
    """The key of an export task's object: ``S3Prefix + exportTaskId + '.' + extension`` (``ova``
    with the OVA container; the workflows build the same key)."""
    return f"{task.params.get('s3_prefix') or ''}{task.id}.{task.params['key_extension']}"


class ExportService(ResolvingService):
    """Creates, lists and cancels export tasks. Shares the import service's store and engine."""

    noun = "export task"
    id_patterns = TASK_ID_PATTERNS
    id_prefixes = _PREFIX

    def not_found(self, task_id: str) -> str:
        return f"The export task ID '{task_id}' does not exist"

    # -- creating -------------------------------------------------------------------------------

    def _check(
        self,
        disk_format: str,
        bucket: str,
        prefix: str | None,
        container: str | None,
        description: str | None,
    ) -> str:
        fmt = (disk_format or "").upper()
        if fmt not in DISK_FORMATS:
            raise UsageError(f"DiskImageFormat {disk_format!r} is not one of {', '.join(DISK_FORMATS)}")
        if container is not None:
            if container != "ova":
                raise UsageError(f"ContainerFormat {container!r} is not valid; the only one is ova")
            if fmt != "VMDK":  # an OVA holds streamOptimized VMDKs, as AWS's does
                raise UsageError(f"ContainerFormat ova takes DiskImageFormat VMDK, not {disk_format!r}")
        check_bucket(bucket, "S3Bucket")
        if prefix:  # the key it begins must be a valid key
            check_key(f"{prefix}export-i-0123456789abcdef0.vmdk", "S3Prefix")
        if description is not None and len(description) > MAX_DESCRIPTION:
            raise UsageError(f"Description is longer than {MAX_DESCRIPTION} characters")
        return fmt

    def _submit(
        self,
        kind: str,
        params: dict[str, Any],
        *,
        client_token: str | None = None,
        account: str = NO_ACCOUNT,
    ) -> Task:
        # the key's extension, not the key: a repeated request (client token) has the same params
        ext = "ova" if params.get("container_format") else DISK_FORMATS[params["disk_image_format"]][2]
        params = {k: v for k, v in (params | {"key_extension": ext}).items() if v is not None}
        return self.submit_task(
            kind, params, task_id=self.new_task_id(kind), account=account, client_token=client_token
        )

    def export_instance(
        self,
        instance_id: str,
        *,
        target_environment: str,
        disk_image_format: str,
        bucket: str,
        prefix: str | None = None,
        container_format: str | None = None,
        description: str | None = None,
        tags: Iterable[dict[str, str]] = (),
        account: str = NO_ACCOUNT,
        sees: Collection[str] | None = None,
    ) -> Task:
        """CreateInstanceExportTask: the instance's boot disk as ``disk_image_format`` in ``bucket``; with
        ``container_format="ova"`` every disk of the instance in one OVA, the root device first. An
        instance with several volumes and no container is refused (``UnsupportedOperation``), as AWS
        refuses it."""
        if target_environment not in TARGET_ENVIRONMENTS:
            raise UsageError(
                f"TargetEnvironment {target_environment!r} is not one of {', '.join(TARGET_ENVIRONMENTS)}"
            )
        fmt = self._check(disk_image_format, bucket, prefix, container_format, description)
        source = self.resolver.instance(instance_id, sees)
        if len(source.get("disks") or ()) > 1 and not container_format:
            # AWS refuses a multi-volume instance (ec2-import-api.md §10, export errors); the OVA
            # container holds all of its disks (issue 13 §4)
            raise ImagingError(
                f"This instance has multiple volumes attached ({len(source['disks'])}); only an "
                "export with ContainerFormat=ova takes all of its disks",
                "UnsupportedOperation",
            )
        params = {
            "instance_id": instance_id,
            "target_environment": target_environment,
            "disk_image_format": fmt,
            "container_format": container_format,
            "s3_bucket": bucket,
            "s3_prefix": prefix or "",
            "description": description,
            "tags": list(tags),
            "source": source,
        }
        return self._submit(EXPORT_INSTANCE, params, account=account)

    def export_image(
        self,
        image_id: str,
        *,
        disk_image_format: str,
        bucket: str,
        prefix: str | None = None,
        role_name: str | None = None,
        container_format: str | None = None,
        description: str | None = None,
        client_token: str | None = None,
        tags: Iterable[dict[str, str]] = (),
        account: str = NO_ACCOUNT,
        sees: Collection[str] | None = None,
    ) -> Task:
        """ExportImage: the image's disk as ``disk_image_format`` in ``bucket``; with
        ``container_format="ova"`` (beyond AWS's ExportImage, which has no container) an OVA."""
        fmt = self._check(disk_image_format, bucket, prefix, container_format, description)
        source = self.resolver.image(image_id, sees)
        params = {
            "image_id": image_id,
            "disk_image_format": fmt,
            "container_format": container_format,
            "s3_bucket": bucket,
            "s3_prefix": prefix or "",
            "role_name": role_name,
            "description": description,
            "client_token": client_token,
            "tags": list(tags),
            "source": source,
        }
        return self._submit(EXPORT_IMAGE, params, client_token=client_token, account=account)

    # -- reading and cancelling -----------------------------------------------------------------

    def get(self, task_id: str, kinds: Collection[str], accounts: Collection[str] | None = None) -> Task:
        """The export task ``task_id`` of one of ``kinds`` (and of one of ``accounts``, when given);
        ``InvalidTaskId`` for a malformed id, ``TaskNotFound`` for an unknown one or another account's."""
        return self.get_task(task_id, kinds, accounts)

    def list(
        self, kinds: Collection[str], ids: Sequence[str] = (), accounts: Collection[str] | None = None
    ) -> list[Task]:
        """Export tasks of ``kinds`` (newest first); with ``ids``, exactly those."""
        return self.list_tasks(kinds, ids, accounts)

    def cancel(self, task_id: str, accounts: Collection[str] | None = None) -> Task:
        """CancelExportTask: the run stops, its partial object is deleted and any incomplete multipart
        upload of its key aborted (the export step's cleanup); a finished task is ``IncorrectState``."""
        return self.cancel_task(task_id, KINDS, accounts)


def export_outcome(task: Task) -> dict[str, Any]:
    """What an export wrote (``bucket``, ``key``, ``sha256``, ``size``, ``etag``, ``provenance``), or {}
    (not an export task, or not written yet)."""
    if task.kind not in KINDS:
        return {}
    result = task.result if isinstance(task.result, dict) else {}
    return dict(result.get("exported") or {})
