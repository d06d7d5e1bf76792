"""Device target: write onto a block device that the controller attached to this machine.

The device comes per task (``create(..., device="/dev/vdb")``) or from ``targets.volume.path``.
Before anything is written it must be a block device, at least as large as the image, writable,
not the disk (or a partition of the disk) that holds the root filesystem, not mounted (nor any of
its partitions), not used by swap, without holders (device-mapper, md, bcache stack on it), and
the kernel must grant an exclusive open (``O_EXCL``), which is the kernel's own in-use check. The
parsing checks come first because their messages say what uses the device.

A device is assumed to hold stale data (``zeroed: false``), so writers zero what they skip; set
``assume_zeroed: true`` for devices known to read as zeros (fresh cloud volumes).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import schemas
from ..errors import UsageError
from ..mountfields import unescape_mount_field
from .base import TargetError, Volume, new_volume_id, validate_settings
from .rawio import block_device_size, fsync_path

#: the settings schema (``appliance/schemas/target-device.json``)
SCHEMA: dict[str, Any] = schemas.load("target-device")

SYS = Path("/sys")
MOUNTINFO = Path("/proc/self/mountinfo")
SWAPS = Path("/proc/swaps")


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo`` (the fields the checks need)."""

    major: int
    minor: int
    mount_point: str
    fstype: str
    source: str


@dataclass(frozen=True)
class BlockDevice:
    """A checked block device."""

    path: Path  # resolved (no symlinks)
    name: str  # kernel name, e.g. "loop3", "vdb"
    rdev: tuple[int, int]
    size: int


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse ``/proc/<pid>/mountinfo`` text (see proc(5)); malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2 or ":" not in fields[2]:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            entries.append(
                MountEntry(
                    int(major),
                    int(minor),
                    unescape_mount_field(fields[4]),
                    tail[0],
                    unescape_mount_field(tail[1]),
                )
            )
        except ValueError:
            continue
    return entries


def read_mounts(mountinfo: Path = MOUNTINFO) -> list[MountEntry]:
    """The current mounts."""
    return parse_mountinfo(mountinfo.read_text())


def _rdev_of(path: str) -> tuple[int, int] | None:
    """Device number of ``path`` if it is a block device node, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _sys_dir(rdev: tuple[int, int], sys_root: Path) -> Path | None:
    p = sys_root / "dev" / "block" / f"{rdev[0]}:{rdev[1]}"
    try:
        return p.resolve(strict=True)
    except OSError:
        return None


def _dev_number(sys_dir: Path) -> tuple[int, int] | None:
    try:
        major, _, minor = (sys_dir / "dev").read_text().strip().partition(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def whole_disk(sys_dir: Path) -> Path:
    """The sysfs directory of the disk a partition belongs to (the device itself if not a partition)."""
    return sys_dir.parent if (sys_dir / "partition").exists() else sys_dir


def partitions(sys_dir: Path) -> list[Path]:
    """sysfs directories of the partitions of a whole disk."""
    try:
        return [p for p in sys_dir.iterdir() if (p / "partition").exists()]
    except OSError:
        return []


def holders(sys_dir: Path) -> list[str]:
    """Kernel names of the devices stacked on this one (``holders/`` in sysfs)."""
    try:
        return sorted(os.listdir(sys_dir / "holders"))
    except OSError:
        return []


def _leaves(sys_dir: Path, sys_root: Path, depth: int = 0) -> Iterator[Path]:
    """The real disks under a stacked device (dm, md): follow ``slaves/`` down."""
    try:
        slaves = sorted(os.listdir(sys_dir / "slaves"))
    except OSError:
        slaves = []
    if not slaves or depth > 8:
        yield sys_dir
        return
    for name in slaves:
        child = (sys_root / "class" / "block" / name).resolve()
        yield from _leaves(child, sys_root, depth + 1)


def root_disks(mounts: list[MountEntry], sys_root: Path = SYS) -> set[Path]:
    """sysfs directories of the whole disks holding the root filesystem (empty if unknown)."""
    out: set[Path] = set()
    for m in mounts:
        if m.mount_point != "/":
            continue
        for rdev in {(m.major, m.minor), _rdev_of(m.source)}:
            if rdev is None:
                continue
            sys_dir = _sys_dir(rdev, sys_root)
            if sys_dir is not None:
                out.update(whole_disk(leaf) for leaf in _leaves(sys_dir, sys_root))
    return out


def _swap_rdevs(swaps: Path) -> set[tuple[int, int]]:
    try:
        lines = swaps.read_text().splitlines()[1:]
    except OSError:
        return set()
    return {r for line in lines if line.split() and (r := _rdev_of(unescape_mount_field(line.split()[0])))}


def inspect_block_device(
    path: str | Path,
    size_bytes: int,
    *,
    sys_root: Path = SYS,
    mountinfo: Path = MOUNTINFO,
    swaps: Path = SWAPS,
) -> BlockDevice:
    """Check that ``path`` may be overwritten with ``size_bytes`` of image; returns what was found.

    Raises :class:`TargetError` with code ``InvalidTarget.NotFound``, ``.NotBlockDevice``,
    ``.RootDisk``, ``.InUse`` (mounted, swap, holders, or the kernel refuses an exclusive open),
    ``.ReadOnly`` or ``.TooSmall``. Nothing is opened for writing.
    """
    shown = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TargetError(f"device {shown} does not exist", "InvalidTarget.NotFound") from None
    except OSError as exc:
        raise TargetError(f"cannot stat device {shown}: {exc.strerror}", "InvalidTarget.NotFound") from exc
    if not stat.S_ISBLK(st.st_mode):
        raise TargetError(f"{shown} is not a block device", "InvalidTarget.NotBlockDevice")
    real = Path(os.path.realpath(path))
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    sys_dir = _sys_dir(rdev, sys_root)
    if sys_dir is None:
        raise TargetError(f"{shown} ({rdev[0]}:{rdev[1]}) is not known to sysfs", "InvalidTarget.NotFound")
    disk = whole_disk(sys_dir)

    mounts = read_mounts(mountinfo)
    if disk in root_disks(mounts, sys_root):
        raise TargetError(
            f"{shown} is (on) {disk.name}, the disk holding the root filesystem", "InvalidTarget.RootDisk"
        )
    # The device itself, and if it is a whole disk, each of its partitions.
    family = [sys_dir, *([] if sys_dir != disk else partitions(disk))]
    family_rdevs = {d: _dev_number(d) for d in family}
    for m in mounts:
        m_rdevs = {(m.major, m.minor), _rdev_of(m.source)}
        for d, r in family_rdevs.items():
            if r is not None and r in m_rdevs:
                raise TargetError(
                    f"{d.name} is mounted on {m.mount_point} ({m.fstype})", "InvalidTarget.InUse"
                )
    swap = _swap_rdevs(swaps)
    for d, r in family_rdevs.items():
        if r in swap:
            raise TargetError(f"{d.name} is in use as swap", "InvalidTarget.InUse")
        if held := holders(d):
            raise TargetError(f"{d.name} is in use by {', '.join(held)}", "InvalidTarget.InUse")
    try:
        if (sys_dir / "ro").read_text().strip() == "1":
            raise TargetError(f"{shown} is read-only", "InvalidTarget.ReadOnly")
    except OSError:
        pass

    try:
        # O_EXCL on a block device: the kernel refuses it while anything else has claimed the device.
        fd = os.open(real, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise TargetError(
                f"{shown} is in use (the kernel refuses an exclusive open)", "InvalidTarget.InUse"
            ) from exc
        raise TargetError(f"cannot open {shown}: {exc.strerror}", "InvalidTarget.NotFound") from exc
    try:
        size = block_device_size(fd)
    finally:
        os.close(fd)
    if size < size_bytes:
        raise TargetError(
            f"{shown} has {size} bytes, less than the {size_bytes} bytes needed", "InvalidTarget.TooSmall"
        )
    return BlockDevice(real, sys_dir.name, rdev, size)


class DeviceVolumeTarget:
    """Writes volumes straight onto a block device given per task or by ``targets.volume.path``."""

    def __init__(self, path: str | None = None, assume_zeroed: bool = False) -> None:
        self.path = path
        self.assume_zeroed = assume_zeroed

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> DeviceVolumeTarget:
        """Build from ``config.targets["volume"]``; :class:`ConfigError` names a bad key."""
        s = validate_settings(settings, SCHEMA, "targets.volume")
        return cls(s.get("path"), bool(s.get("assume_zeroed", False)))

    def create(
        self,
        task_id: str,
        size_bytes: int,
        *,
        availability_zone: str | None = None,
        client_token: str | None = None,
        device: str | None = None,
    ) -> Volume:
        """Check the device (see :func:`inspect_block_device`) and hand it out as a volume.

        ``client_token`` is not needed: nothing is created, a create run again hands out the same device.
        """
        chosen = device or self.path
        if not chosen:
            raise UsageError("no device given: pass device=... or set targets.volume.path")
        dev = inspect_block_device(chosen, size_bytes)
        volume_id = new_volume_id()
        info = {
            "type": "device",
            "volume_id": volume_id,
            "path": str(dev.path),
            "device": str(chosen),
            "rdev": f"{dev.rdev[0]}:{dev.rdev[1]}",
            "size": dev.size,
            "zeroed": self.assume_zeroed,
            "task_id": task_id,
        }
        return Volume(volume_id, dev.path, dev.size, info)

    def reopen(self, volume_info: Mapping[str, Any]) -> Volume:
        """Check the same device again (same device number, still unused and large enough)."""
        dev = inspect_block_device(str(volume_info["path"]), 0)
        if f"{dev.rdev[0]}:{dev.rdev[1]}" != volume_info.get("rdev"):
            raise TargetError(
                f"{dev.path} is now device {dev.rdev[0]}:{dev.rdev[1]}, not {volume_info.get('rdev')}",
                "InvalidVolume.NotFound",
            )
        info = dict(volume_info, size=dev.size, zeroed=False)  # it may hold part of an earlier write
        return Volume(str(volume_info["volume_id"]), dev.path, dev.size, info)

    def finalize(self, volume: Volume) -> dict[str, Any]:
        """fsync the device; returns ``{type, volume_id, path, size}``."""
        fsync_path(volume.path, f"device {volume.path}")
        return {"type": "device", "volume_id": volume.id, "path": str(volume.path), "size": volume.size}

    def delete(self, volume_info: Mapping[str, Any]) -> None:
        """Nothing to undo: the device belongs to the controller, which detaches or reuses it.

        Its content is left as written (wiping a multi-GiB device in an undo path would be slow and
        the controller may want to inspect it).
        """

    def describe(self) -> dict[str, Any]:
        """``{type, path, assume_zeroed}``."""
        return {"type": "device", "path": self.path, "assume_zeroed": self.assume_zeroed}
