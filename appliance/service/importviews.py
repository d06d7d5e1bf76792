"""Views of an import task's result: what the shipped workflows registered, read back as the API
layers show it — :func:`outcome` (flat: ids, size, location, encryption, guest, boot settings),
:func:`image_disks` (every disk an ImportImage stored) and :func:`block_device_mappings`, the guest
validation report (:func:`guest_report`, :func:`validated_report`), the boot settings
(:func:`boot_settings`) and the encryption asked for and applied (:func:`encryption_report`).

The workflows register their results under step names (``volume``, ``imported``, ``ids``, ``disk``,
``disk.streamed``, ``data_disks``, ``ova_data_disks``); this module is the one place that knows where
each lives. Nothing here writes: the service that creates tasks is :mod:`.imports`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ..store import Task
from ..targets.encryption import requested
from . import bootparams
from .importtasks import IMAGE_KINDS, IMPORT_IMAGE, IMPORT_INSTANCE, SNAPSHOT_KINDS, GiB, device_names

#: task kinds whose result is a bootable image the controller registers with boot settings
BOOTABLE_KINDS = (IMPORT_IMAGE, IMPORT_INSTANCE)
#: how deep :func:`guest_report` looks for a ``guest`` member in the registered results
_GUEST_DEPTH = 4


def guest_report(result: Any) -> dict[str, Any] | None:
    """The guest validation report (``GuestReport.to_dict()``) in a task result, or None.

    The workflows may register it directly (``result["guest"]``) or inside another step's result
    (an import-disk include's, or a hook point's ``image`` facts: ``{..., "guest": {...}}``); the
    shallowest dict member named ``guest`` that has a ``layout`` or ``findings`` is it.
    """
    level = [result] if isinstance(result, dict) else []
    for _ in range(_GUEST_DEPTH):
        found = [
            node["guest"]
            for node in level
            if isinstance(node.get("guest"), dict) and {"layout", "findings"} & node["guest"].keys()
        ]
        if found:
            return found[0]
        level = [v for node in level for v in node.values() if isinstance(v, dict)]
    return None


def validated_report(events: Sequence[Any]) -> dict[str, Any] | None:
    """The report of the last ``guest.validated`` event among ``events`` (the guest.validate step
    emits one; when validation fails the task, the task result has no report but the event does)."""
    for event in reversed(events):
        if event.kind == "guest.validated" and isinstance(event.data.get("report"), dict):
            return event.data["report"]
    return None


def boot_settings(task: Task, guest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``{kernel_id, ramdisk_id, virtualization_type, layout}`` of an image or instance import
    (None for other kinds): what the request asked for, and the disk layout (``disk`` or
    ``partition``) the guest validation found, each None until known or when not given."""
    if task.kind not in BOOTABLE_KINDS:
        return None
    params = task.params or {}
    # workflow defaults store an absent setting as ""
    boot: dict[str, Any] = {f: params.get(f) or None for f in bootparams.FIELDS}
    boot["layout"] = (guest or {}).get("layout")
    return boot


#: task kinds that store an image with the image target, and so may encrypt it
ENCRYPTABLE_KINDS = IMAGE_KINDS + SNAPSHOT_KINDS


def encryption_report(task: Task) -> dict[str, Any] | None:
    """``{requested, applied}`` of an image or snapshot import (None for other kinds): the
    encryption the request asked for and the encryption the stored image has, as the image target
    read it back (each ``{algorithm, kms_key_id}`` or None; ``applied`` is None until the image is
    stored, and stays None for an image stored unencrypted)."""
    if task.kind not in ENCRYPTABLE_KINDS:
        return None
    params = task.params or {}
    # validated when the task was submitted; workflow defaults store an absent key as ""
    wanted = requested(bool(params.get("encrypted")), params.get("kms_key_id") or None)
    return {"requested": wanted.to_dict() if wanted else None, "applied": outcome(task)["encryption"]}


def snapshot_id(task_id: str, n: int) -> str:
    """The snapshot id of disk ``n`` (1 = the boot disk) of the ImportImage ``task_id``: the boot
    disk's is ``snap-`` + the task id's 17 hex digits (as ever), a data disk's 17 hex digits derived
    from the task id and its position, so every disk has its own, the same on every read."""
    digits = task_id[-17:]
    if n == 1:
        return f"snap-{digits}"
    return "snap-" + hashlib.sha256(f"{task_id}/disk{n}".encode()).hexdigest()[:17]


def disk_size(disk: dict[str, Any]) -> int | None:
    source_image = disk.get("source_image") or {}
    stored = disk.get("stored") or {}
    size = source_image.get("virtual_size") or stored.get("size")
    return int(size) if size is not None else None


def disk_view(disk: Any) -> dict[str, Any]:
    """An import-disk include's result with a streamed disk's facts (``image.stream``'s result,
    registered as ``streamed``) where the scratch path registers them: ``stored``, ``source_image``,
    ``guest``."""
    disk = dict(disk) if isinstance(disk, dict) else {}
    streamed = disk.get("streamed") or {}
    for key in ("stored", "source_image", "guest"):
        if not disk.get(key) and streamed.get(key):
            disk[key] = streamed[key]
    return disk


def image_disks(task: Task) -> list[dict[str, Any]]:
    """Every disk an ImportImage stored, boot disk first (empty until the task completes, and for
    other kinds): ``index`` (1 = the boot disk), ``device_name``, ``snapshot_id``, ``format`` (the
    source's, as inspected), ``size`` (bytes of the disk), ``location`` (where the image target
    stored it), ``container`` (the index of the DiskContainer it came from, 1-based) and ``ova_disk``
    (its member name when it came out of an OVA).

    The order is the request's: the DiskContainers in order; for an OVA, its disks in the OVF's order
    (its boot disk first)."""
    if task.kind != IMPORT_IMAGE or not isinstance(task.result, dict):
        return []
    result = task.result
    boot = disk_view(result.get("disk"))
    if not boot.get("stored"):
        return []
    containers = (task.params or {}).get("disk_containers") or []
    ova = (boot.get("opened") or {}).get("ova") or {}
    ova_names = [d.get("name") for d in ova.get("disks") or []]
    found: list[tuple[dict[str, Any], int, str | None]] = [(boot, 1, ova_names[0] if ova_names else None)]
    found += [(disk_view(d), n, None) for n, d in enumerate(result.get("data_disks") or [], 2)]
    found += [
        (d or {}, 1, name) for d, name in zip(result.get("ova_data_disks") or [], ova_names[1:], strict=False)
    ]
    # a DiskContainer's DeviceName names its disk (an OVA's: its boot disk); the others by position
    given = [
        (containers[c - 1].get("device_name") or None)
        if c <= len(containers) and (n == 0 or not ova)
        else None
        for n, (_d, c, _name) in enumerate(found)
    ]
    names = device_names(given)
    out = []
    for n, ((disk, container, ova_disk), device) in enumerate(zip(found, names, strict=True), 1):
        source_image = disk.get("source_image") or {}
        out.append(
            {
                "index": n,
                "device_name": device,
                "snapshot_id": snapshot_id(task.id, n),
                "format": source_image.get("format"),
                "size": disk_size(disk),
                "location": disk.get("stored") or None,
                "container": container,
                "ova_disk": ova_disk,
            }
        )
    return out


def block_device_mappings(disks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The EC2 ``BlockDeviceMappings`` of an image of ``disks`` (:func:`image_disks`): every disk at
    its device, from its snapshot; what ``image.register`` (RegisterImage) takes."""
    return [
        {
            "DeviceName": d["device_name"],
            "Ebs": {"SnapshotId": d["snapshot_id"], "VolumeSize": -(-(d["size"] or 0) // GiB) or None},
        }
        for d in disks
    ]


def outcome(task: Task) -> dict[str, Any]:
    """What an import produced, flat: ``volume_id``, ``instance_id``, ``snapshot_id``, ``image_id``,
    ``size`` (bytes of the disk), ``location``, ``encryption`` (what the stored image has,
    ``{algorithm, kms_key_id}``) — each None until known; of an image, its boot disk's — plus
    ``guest`` (the guest validation report, None until there is one), ``boot``
    (:func:`boot_settings`), and for an ImportImage ``disks`` (:func:`image_disks`: every disk, boot
    disk first) and ``block_device_mappings`` (:func:`block_device_mappings`).

    The shipped workflows register their results under step names (``volume``, ``imported``,
    ``ids``, ``disk``, ``disk.streamed``); this is the one place that knows where each lives.
    """
    result = task.result if isinstance(task.result, dict) else {}
    volume = result.get("volume") or (result.get("imported") or {}).get("volume") or {}
    ids = result.get("ids") or {}
    disk = disk_view(result.get("disk"))  # streamed into the image target, or through scratch
    stored = disk.get("stored") or {}
    source_image = disk.get("source_image") or {}
    written = result.get("written") or (result.get("imported") or {}).get("written") or {}
    guest = guest_report(result)
    disks = image_disks(task)
    return {
        "volume_id": volume.get("id"),
        "instance_id": (result.get("instance") or {}).get("instance_id"),
        "snapshot_id": ids.get("snapshot_id"),
        "image_id": ids.get("image_id"),
        "size": source_image.get("virtual_size") or stored.get("size") or written.get("virtual_size"),
        "location": stored or None,
        "encryption": stored.get("encryption"),
        "guest": guest,
        "boot": boot_settings(task, guest),
        "disks": disks,
        "block_device_mappings": block_device_mappings(disks) if disks else None,
    }
