"""What an instance, an image, a snapshot or a volume id is, for the appliance: where its disk is.

Two sources, tried in order:

(a) **what the appliance (or its fleet, sharing the task database) issued.** A completed
    ImportImage ``import-ami-X`` issued ``ami-X`` and ``snap-X``, a completed ImportSnapshot
    ``import-snap-X`` issued ``snap-X`` (the workflows derive the ids from the task id), and a
    completed ImportVolume/ImportInstance issued the ``vol-…`` its result names. Each maps to the
    stored output: an image-target location (a file or an S3 object, RAW) or a volume (a file, a
    block device, or an EC2 volume).
(b) **the controlling cloud**, through its EC2 API, when the volume target is ``ec2`` (the
    appliance runs in that cloud): an instance id (always the cloud's: the cloud launches the
    instances of ImportInstance) found by ``DescribeInstances`` is exported from
    its boot volume (snapshot → volume → attached here → read → detached → deleted; see
    :mod:`appliance.targets.ec2_export`), or, in an OVA, from all of its EBS volumes.

A ``vol-…`` is taken by no EC2 export action (they name instances and images); ``imaging export
vol-…`` (:mod:`appliance.cli.export`) resolves one through :meth:`Resolver.volume`.

An id found nowhere (or found in another account's task) is ``InvalidAMIID.NotFound`` /
``InvalidInstanceID.NotFound`` / ``InvalidSnapshot.NotFound`` / ``InvalidVolume.NotFound``, in
AWS's words; an id not of the EC2 form is the matching ``….Malformed``.

A stored image may have more than one location: each completed ``copy-image`` task
(:mod:`appliance.service.copies`) of it added one. ``locations`` of a resolved image lists them all,
the one its import stored first, then its copies in the order they completed.

A resolved source is a JSON object stored in the export task's parameters:
``{"type": "image", "location": {...}, "locations": [...], "size": N, "id": ..., "task_id": ...,
"firmware": "bios"|"efi", "platform": "linux"|"windows"}``, ``{"type": "volume", "volume": {...}, ...}``
or ``{"type": "cloud-instance", "instance_id": ..., "platform": ..., "volume_id": ..., "size": N,
"disks": [{"volume_id", "device_name", "size"}, ...]}`` (``disks``: every EBS volume, the root device
first). ``firmware`` and ``platform`` are what an OVA export writes in its OVF.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from ..config import Config
from ..errors import ImagingError, TaskNotFound
from ..store import Store, Task, TaskState
from ..targets.ec2_export import describe_boot_volume
from .importtasks import CONVERSION_KINDS, IMPORT_IMAGE, IMPORT_SNAPSHOT
from .importviews import image_disks, outcome

#: the kind of the tasks that copy a stored image to another store (:mod:`appliance.service.copies`)
COPY_IMAGE = "copy-image"

_HEX_ID = r"(?:[0-9a-f]{8}|[0-9a-f]{17})"
_FORMS = {
    "ami": re.compile(rf"^ami-({_HEX_ID})$"),
    "snap": re.compile(rf"^snap-({_HEX_ID})$"),
    "vol": re.compile(rf"^vol-({_HEX_ID})$"),
    "i": re.compile(rf"^i-({_HEX_ID})$"),
}


class ResourceNotFound(ImagingError):
    """An id that names nothing this caller may export; ``code`` is EC2's (``InvalidAMIID.NotFound``…)."""

    code = "InvalidAMIID.NotFound"


def firmware(task: Task, guest: dict[str, Any] | None) -> str:
    """``efi`` when the import's guest validation found a disk that boots only by UEFI (boot mode
    ``uefi``), or both ways (``bios+uefi``) and the request asked for ``BootMode=uefi``; else
    ``bios``. What an OVA export writes as the VM's firmware."""
    mode = (guest or {}).get("boot_mode")
    asked = (task.params or {}).get("boot_mode")
    if mode == "uefi" or (mode == "bios+uefi" and asked == "uefi"):
        return "efi"
    return "bios"


def platform(task: Task, guest: dict[str, Any] | None) -> str:
    """``windows`` when the import's guest validation found Windows (or found no operating system and
    the request said ``Platform=Windows``), else ``linux``: the OS type an OVA export writes in its
    ``OperatingSystemSection``, which an OVA import checks against the boot disk again."""
    family = ((guest or {}).get("os") or {}).get("family")
    if family is None:
        family = str((task.params or {}).get("platform") or "").lower()
    return "windows" if family == "windows" else "linux"


def _not_found(code: str, what: str, resource_id: str) -> ResourceNotFound:
    return ResourceNotFound(f"The {what} ID '{resource_id}' does not exist", f"{code}.NotFound")


def _same_disk(a: Any, b: Any) -> bool:
    """Whether two stored locations name the same stored disk (a file path, or a bucket and key)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    return (a.get("path"), a.get("bucket"), a.get("key")) == (b.get("path"), b.get("bucket"), b.get("key"))


def _match(kind: str, resource_id: str, code: str, what: str) -> str:
    m = _FORMS[kind].match(resource_id or "")
    if m is None:
        raise ResourceNotFound(
            f"Invalid id: '{resource_id}' (expecting '{kind}-' and 8 or 17 hexadecimal digits)",
            f"{code}.Malformed",
        )
    return m.group(1)


class Resolver:
    """Resolves ids to the disks they name (see the module docstring)."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store

    def _completed(self, task_id: str, kinds: Collection[str], sees: Collection[str] | None) -> Task | None:
        try:
            task = self.store.get_task(task_id, account=sees)
        except TaskNotFound:
            return None
        if task.kind not in kinds or task.state is not TaskState.COMPLETED:
            return None
        return task

    def copies(self, task: Task, of: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The locations the completed copies of the image stored by the import ``task`` wrote, oldest
        first (copies belong to the image's account, as its import does). ``of``: only copies of that
        stored location (one disk of a multi-disk image); None: of the task's boot disk."""
        found: list[tuple[str, dict[str, Any]]] = []
        for copy in self.store.list_tasks(
            TaskState.COMPLETED.value, kind=[COPY_IMAGE], limit=None, account=[task.client_account]
        ):
            params = copy.params or {}
            result = copy.result if isinstance(copy.result, dict) else {}
            location = (result.get("copied") or {}).get("location")
            source = params.get("source") or {}
            if source.get("task_id") != task.id or not location:
                continue
            if _same_disk(source.get("location"), of if of is not None else outcome(task).get("location")):
                found.append((str(copy.finished_at or ""), dict(location, copy_task_id=copy.id)))
        return [location for _, location in sorted(found, key=lambda pair: pair[0])]

    def _stored(self, task: Task, resource_id: str) -> dict[str, Any] | None:
        found = outcome(task)
        location = found.get("location")
        if not location:
            return None
        return {
            "type": "image",
            "id": resource_id,
            "task_id": task.id,
            "location": location,
            "locations": [location, *self.copies(task)],
            "size": location.get("size") or found.get("size"),
            "firmware": firmware(task, found.get("guest")),
            "platform": platform(task, found.get("guest")),
        }

    def _data_disk(self, snapshot_id: str, sees: Collection[str] | None) -> dict[str, Any] | None:
        """A data disk of a multi-disk ImportImage (its snapshot id is derived from the task id and the
        disk's position, so it does not name its task: the completed image imports are searched)."""
        for task in self.store.list_tasks(
            TaskState.COMPLETED.value, kind=[IMPORT_IMAGE], limit=None, account=sees
        ):
            for disk in image_disks(task)[1:]:
                location = disk.get("location")
                if disk.get("snapshot_id") == snapshot_id and location:
                    return {
                        "type": "image",
                        "id": snapshot_id,
                        "task_id": task.id,
                        "location": location,
                        "locations": [location, *self.copies(task, of=location)],
                        "size": location.get("size") or disk.get("size"),
                        # a data disk boots nothing: no firmware or OS to carry into an OVF
                        "firmware": "bios",
                        "platform": "linux",
                    }
        return None

    def image(self, image_id: str, sees: Collection[str] | None = None) -> dict[str, Any]:
        """The stored disk of ``ami-X`` (issued by the ImportImage ``import-ami-X``)."""
        digits = _match("ami", image_id, "InvalidAMIID", "image")
        task = self._completed(f"import-ami-{digits}", (IMPORT_IMAGE,), sees)
        source = self._stored(task, image_id) if task is not None else None
        if source is None:
            raise _not_found("InvalidAMIID", "image", image_id)
        return source

    def snapshot(self, snapshot_id: str, sees: Collection[str] | None = None) -> dict[str, Any]:
        """The stored disk of ``snap-X`` (from ImportSnapshot ``import-snap-X`` or ImportImage
        ``import-ami-X``)."""
        digits = _match("snap", snapshot_id, "InvalidSnapshot", "snapshot")
        for task_id, kind in (
            (f"import-snap-{digits}", IMPORT_SNAPSHOT),
            (f"import-ami-{digits}", IMPORT_IMAGE),
        ):
            task = self._completed(task_id, (kind,), sees)
            source = self._stored(task, snapshot_id) if task is not None else None
            if source is not None:
                return source
        source = self._data_disk(snapshot_id, sees)
        if source is not None:
            return source
        raise _not_found("InvalidSnapshot", "snapshot", snapshot_id)

    def volume(self, volume_id: str, sees: Collection[str] | None = None) -> dict[str, Any]:
        """The volume ``vol-…`` a completed ImportVolume/ImportInstance wrote."""
        _match("vol", volume_id, "InvalidVolume", "volume")
        for task in self.store.list_tasks(
            TaskState.COMPLETED.value, kind=list(CONVERSION_KINDS), limit=None, account=sees
        ):
            found = outcome(task)
            if found.get("volume_id") == volume_id:
                return self._volume_source(task, volume_id)
        raise _not_found("InvalidVolume", "volume", volume_id)

    @staticmethod
    def _volume_source(task: Task, volume_id: str) -> dict[str, Any]:
        result = task.result if isinstance(task.result, dict) else {}
        volume = result.get("volume") or (result.get("imported") or {}).get("volume") or {}
        size = outcome(task).get("size") or volume.get("size")
        if volume.get("size_gib") and not size:
            size = int(volume["size_gib"]) << 30
        return {"type": "volume", "id": volume_id, "task_id": task.id, "volume": volume, "size": size}

    def instance(self, instance_id: str, sees: Collection[str] | None = None) -> dict[str, Any]:
        """The boot disk of the controlling cloud's instance ``i-…`` (when the volume target is
        ``ec2``). The appliance issues no instance ids itself: the controlling cloud launches the
        instances of ImportInstance, so their ids are that cloud's. A caller that sees only some
        accounts (:attr:`~appliance.service.importtasks.Caller.sees`) may export only instances whose
        reservation belongs to one of them (``OwnerId``)."""
        _match("i", instance_id, "InvalidInstanceID", "instance")
        settings = self.config.targets.get("volume") or {}
        if settings.get("type") == "ec2":
            boot = describe_boot_volume(settings, instance_id)
            # another account's instance does not exist for this caller (its reservation's owner)
            if boot is not None and (sees is None or boot.get("owner_id") in sees):
                return {"type": "cloud-instance", "id": instance_id} | boot
        raise _not_found("InvalidInstanceID", "instance", instance_id)
