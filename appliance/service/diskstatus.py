"""The status of each disk of a running ImportImage, from the steps that work on it.

A multi-disk ImportImage (several DiskContainers, or an OVA with data disks) runs its disks one after
the other, each an include of ``import-disk`` (an OVA's data disks: ``import-ova-disk``) recorded in
the store under its own path: the boot disk at a top-level step, the data disks as the items of a loop
(``2.loop1``, ``2.loop2``, …), each include's steps below it (``2.loop1/include/3``). Every step that
reports progress keeps its own latest figures (:attr:`~appliance.store.StepRecord.progress`), so a
disk's status is read from its include and the steps under it — never guessed from the task's
overall percentage:

- ``pending``: no include of the disk has started yet (its turn has not come);
- ``active``: its include runs; ``percent`` is the highest percent its steps reported (the same
  model as a single-disk task's: the download is the first half, the conversion the whole), ``phase``
  the phase the running step reported (``downloading``, ``converting``, ``writing``, …) or, for a
  step that reports none, its EC2 sub-state (``validating`` while it is inspected and validated),
  ``size`` the bytes the running transfer moves (the source's size, then the disk's);
- ``completed``: its include finished — the disk is stored; ``size`` and ``format`` its own;
- ``deleting``: its include failed or was undone (the task is failing and removes what it stored).

A disk is named by the include's ``name`` parameter: empty for the boot disk (disk 1), ``diskN`` for
the N-th disk — the name it has in scratch and in the image target (:data:`~appliance.steps.imports.
DISK_NAME`). The shipped workflows set it; this module and :mod:`.importviews` are the places that
know the layout of their results.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..store import StepRecord, StepState, Task
from .importtasks import IMPORT_IMAGE, device_names
from .importviews import disk_size, disk_view, snapshot_id

PENDING = "pending"
ACTIVE = "active"
COMPLETED = "completed"
DELETING = "deleting"

#: the EC2 sub-state of a disk whose running step reports no phase of its own
_ACTION_PHASE = {
    "source.route": "validating",
    "source.fetch": "downloading",
    "ova.open": "validating",
    "image.inspect": "validating",
    "guest.validate": "validating",
    "scratch.reserve": "converting",
    "image.convert": "converting",
    "image.stream": "converting",
    "image.store": "storing",
    "util.echo": "validating",
}
_DISK_NAME = re.compile(r"^disk([0-9]+)$")


def is_ova(task: Task) -> bool:
    """Whether the ImportImage ``task`` is asked to import an OVA (its only DiskContainer: ``Format=ova``)."""
    containers = (task.params or {}).get("disk_containers") or []
    return bool(containers) and str(containers[0].get("format") or "").lower() == "ova"


def may_open_ova(task: Task) -> bool:
    """Whether the ImportImage ``task`` has one DiskContainer given no format, which its ``ova.open``
    opens as an OVA when its content is one (known once it is opened)."""
    containers = (task.params or {}).get("disk_containers") or []
    return task.kind == IMPORT_IMAGE and len(containers) == 1 and not containers[0].get("format")


def from_ova(task: Task, disks: Sequence[dict[str, Any]]) -> bool:
    """Whether the disks of ``task`` (:func:`running_disks`) are an OVA's: asked for, or found when it
    was opened."""
    return is_ova(task) or any(d.get("ova_disk") for d in disks)


def several_disks(task: Task) -> bool:
    """Whether ``task`` is an ImportImage whose disks each have a status of their own: several
    DiskContainers, or an OVA (whose data disks are known once it is opened)."""
    if task.kind != IMPORT_IMAGE:
        return False
    return len((task.params or {}).get("disk_containers") or []) > 1 or is_ova(task)


def _disk_number(record: StepRecord) -> int | None:
    """The disk (1 = the boot disk) a top-level include record (or loop item) works on, or None."""
    if "/" in record.idx or not record.action.startswith("include:"):
        return None
    args = record.args if isinstance(record.args, dict) else {}
    if "disk" not in args:  # a loop's own record ({"items": [...]}), or another include
        return None
    name = args.get("name") or ""
    if name == "":
        return 1
    found = _DISK_NAME.match(str(name))
    return int(found.group(1)) if found else None


def _below(steps: Sequence[StepRecord], record: StepRecord) -> list[StepRecord]:
    return [s for s in steps if s.idx.startswith(record.idx + "/")]


def _opened(steps: Sequence[StepRecord], boot: StepRecord | None) -> dict[str, Any]:
    """What the OVA's ``ova.open`` found (its ``data_disks``, its ``ova`` package), {} until it completed."""
    for s in _below(steps, boot) if boot is not None else []:
        if s.action == "ova.open" and s.state is StepState.COMPLETED and isinstance(s.result, dict):
            return s.result
    return {}


def _running_phase(inner: Sequence[StepRecord]) -> str:
    """The phase of a running disk: what its running step (the innermost) reported, else that step's
    sub-state; between steps, the last phase reported."""
    running = [
        s for s in inner if s.state is StepState.RUNNING and not s.action.startswith(("include:", "hooks:"))
    ]
    if running:
        step = running[-1]
        phase = (step.progress or {}).get("phase")
        if phase:
            return str(phase)
        if "/hook/" in step.idx:
            return "updating"  # an operator hook changes the disk
        return _ACTION_PHASE.get(step.action, step.name)
    reported = _latest(inner, "phase")
    return str(reported) if reported else ACTIVE


def _figure(step: StepRecord, key: str) -> Any:
    """One figure of a step's latest progress report, None when it reported none."""
    return (step.progress or {}).get(key)


def _latest(inner: Sequence[StepRecord], key: str) -> Any:
    values = [v for v in (_figure(s, key) for s in inner) if v is not None]
    return values[-1] if values else None


def running_disks(task: Task, steps: Sequence[StepRecord]) -> list[dict[str, Any]]:
    """Each disk of the running ImportImage ``task`` (its step records ``steps``), in request order (an
    OVA's, claimed or found by ``ova.open``: its boot disk, then its data disks once it is opened):
    ``index`` (1 = the boot disk),
    ``container`` (its DiskContainer, 1-based), ``device_name``, ``state`` (``pending``, ``active``,
    ``completed``, ``deleting``: see the module docstring), ``percent`` (0 to 100), ``phase`` (None
    unless active or pending), ``size`` (bytes, None until known), ``format`` (as inspected, None
    until known), ``snapshot_id`` (once stored) and ``ova_disk`` (the OVA member it came from)."""
    containers = (task.params or {}).get("disk_containers") or []
    includes: dict[int, StepRecord] = {}
    for step in steps:
        number = _disk_number(step)
        if number is not None:
            includes[number] = step
    opened = _opened(steps, includes.get(1))
    # an OVA found by ova.open (no Format, or an after_fetch hook's claim) brings its data disks only as
    # the only DiskContainer: beside others, import-image does not import them (their names collide)
    ova = is_ova(task) or (len(containers) == 1 and bool(opened.get("ova")))
    opened = opened if ova else {}
    members = [d.get("name") for d in (opened.get("ova") or {}).get("disks") or []]
    count = 1 + len(opened.get("data_disks") or []) if ova else len(containers)
    count = max([count, *includes])
    given = [
        (containers[n - 1].get("device_name") or None)
        if n <= len(containers) and (n == 1 or not ova)
        else None
        for n in range(1, count + 1)
    ]
    out = []
    for n, device in enumerate(device_names(given), 1):
        record = includes.get(n)
        disk: dict[str, Any] = {
            "index": n,
            "container": 1 if ova else n,
            "device_name": device,
            "state": PENDING,
            "percent": 0.0,
            "phase": PENDING,
            "size": None,
            "format": None,
            "snapshot_id": None,
            "ova_disk": None,
        }
        data_disks = opened.get("data_disks") or []
        member = data_disks[n - 2] if ova and 2 <= n <= len(data_disks) + 1 else None
        if isinstance(member, dict):  # an OVA's data disk: ova.open inspected it already
            disk["ova_disk"] = member.get("name")
            disk["format"] = member.get("format")
        elif ova and n <= len(members):
            disk["ova_disk"] = members[n - 1]
        if record is None:
            out.append(disk)  # its turn has not come
            continue
        state = record.state
        if state is StepState.COMPLETED:
            done = disk_view(record.result)
            disk |= {
                "state": COMPLETED,
                "percent": 100.0,
                "phase": None,
                "size": disk_size(done),
                "format": (done.get("source_image") or {}).get("format") or disk["format"],
                "snapshot_id": snapshot_id(task.id, n),
            }
        elif state in (StepState.RUNNING, StepState.PENDING):
            inner = _below(steps, record)
            percents = [float(p) for p in (_figure(s, "percent") for s in inner) if p is not None]
            disk |= {
                "state": ACTIVE,
                "percent": max(percents, default=0.0),
                "phase": _running_phase(inner),
                "size": _latest(inner, "total"),
            }
        else:
            disk |= {"state": DELETING, "phase": None}
        out.append(disk)
    return out


def overall_percent(disks: Sequence[dict[str, Any]]) -> float:
    """The task's percent from its disks' (each counts alike): never decreasing while the number of
    disks is known from the start (several DiskContainers), as each disk's percent never does."""
    return sum(float(d["percent"]) for d in disks) / len(disks) if disks else 0.0
