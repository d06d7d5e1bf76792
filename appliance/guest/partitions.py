"""The partitions of a guest disk attached to a loop device, and the guest's ``fstab`` read to find
them: the partition devices mapped with ``partx -a`` (this kernel has no device-mapper and loop
``max_part=0``) and waited for, each one's type, UUID and labels from ``blkid -p`` (never from the
guest), and the device an ``fstab`` spec names when it is on this disk (``fstab`` itself is parsed
by :mod:`appliance.guest.fstab`).
Used by :mod:`appliance.guest.mount` to find the root filesystem and the guest's other mounts.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

from .loopdev import MountFailed, blkid, run_cmd

#: how long to wait for /dev/loopNpM to appear after partx -a
PARTITION_NODE_WAIT = 5.0


@dataclass
class Partition:
    """One filesystem-bearing device of the image (a partition, or the whole loop for a bare fs)."""

    device: str
    number: int | None
    fstype: str | None
    uuid: str | None = None
    label: str | None = None
    partuuid: str | None = None
    partlabel: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _wait_for_nodes(loop: str, numbers: list[int]) -> None:
    deadline = time.monotonic() + PARTITION_NODE_WAIT
    while any(not os.path.exists(f"{loop}p{n}") for n in numbers):
        if time.monotonic() > deadline:
            missing = [f"{loop}p{n}" for n in numbers if not os.path.exists(f"{loop}p{n}")]
            raise MountFailed(f"partition devices did not appear: {', '.join(missing)}")
        time.sleep(0.05)


def partitions(loop: str) -> list[Partition]:
    top = blkid(loop)
    if "PTTYPE" not in top:
        # no partition table: a bare filesystem image (layout "partition")
        return [Partition(loop, None, top.get("TYPE"), top.get("UUID"), top.get("LABEL"))]
    run_cmd(["partx", "-a", loop], check=False)  # fails harmlessly for an empty table
    proc = run_cmd(["partx", "-g", "-o", "NR", loop], check=False)
    numbers = [int(x) for x in proc.stdout.split() if x.isdigit()]
    _wait_for_nodes(loop, numbers)
    parts = []
    for n in numbers:
        dev = f"{loop}p{n}"
        info = blkid(dev)
        parts.append(
            Partition(
                dev,
                n,
                info.get("TYPE"),
                info.get("UUID"),
                info.get("LABEL"),
                info.get("PART_ENTRY_UUID"),
                info.get("PART_ENTRY_NAME"),
            )
        )
    return parts


_DEV_NAME = re.compile(r"^/dev/(?:[shv]d[a-z]|xvd[a-z]|nvme\d+n\d+p|mmcblk\d+p)(\d+)$")


def find_partition(spec: str, parts: list[Partition]) -> Partition | None:
    """The partition an fstab device spec names, if it is on this disk."""
    keys = {
        "UUID=": "uuid",
        "LABEL=": "label",
        "PARTUUID=": "partuuid",
        "PARTLABEL=": "partlabel",
        "/dev/disk/by-uuid/": "uuid",
        "/dev/disk/by-label/": "label",
        "/dev/disk/by-partuuid/": "partuuid",
        "/dev/disk/by-partlabel/": "partlabel",
    }
    for prefix, attr in keys.items():
        if spec.startswith(prefix):
            want = spec[len(prefix) :].strip('"')
            for p in parts:
                value = getattr(p, attr)
                if value and value.lower() == want.lower():
                    return p
            return None
    match = _DEV_NAME.match(spec)
    if match:
        # a kernel device name: the guest's disk is our loop, so partition N is loopNpN
        n = int(match.group(1))
        return next((p for p in parts if p.number == n), None)
    return None
