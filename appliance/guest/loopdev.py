"""Host commands the guest mounts run, and loop devices: running a command with a timeout, probing
a device with ``blkid -p``, listing and undoing mounts, finding and detaching loop devices by the
file that backs them (device and inode, so a reused loop number is never mistaken for ours)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from ..errors import ImagingError
from ..mountfields import unescape_mount_field

log = logging.getLogger(__name__)


#: how long a command such as mount/losetup may take before it is considered hung
COMMAND_TIMEOUT = 60.0


class MountFailed(ImagingError):
    """Attaching or mounting the guest failed."""

    code = "Guest.MountFailed"


def run_cmd(
    argv: list[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError as exc:
        raise ImagingError(f"{argv[0]} not found; install util-linux", code="MissingTool") from exc
    except subprocess.TimeoutExpired as exc:
        raise MountFailed(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        raise MountFailed(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def blkid(device: str) -> dict[str, str]:
    # -p: probe the device itself (no cache, nothing the guest wrote into /etc/blkid.tab)
    proc = run_cmd(["blkid", "-p", "-o", "export", device], check=False)
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def mounts_under(directory: Path | str) -> list[str]:
    """Mount points at or below ``directory`` (from /proc/self/mountinfo), most recent first."""
    base = os.path.normpath(str(directory))
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = unescape_mount_field(line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(point)
    found.reverse()  # mountinfo lists in mount order; unmount children before parents
    return found


def unmount(point: str) -> None:
    if run_cmd(["umount", point], check=False).returncode != 0:
        # busy (a process still inside): detach it from the tree now, the kernel frees it later
        proc = run_cmd(["umount", "-l", point], check=False)
        if proc.returncode != 0 and point in mounts_under(point):
            log.warning("could not unmount %s: %s", point, proc.stderr.strip())


def loop_backing(loop: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file backing ``loop``, or None when it is not attached."""
    name = os.path.basename(loop)
    sysdir = Path("/sys/block") / name / "loop"
    if not sysdir.is_dir():
        return None
    proc = run_cmd(["losetup", "--json", "-l", "-O", "NAME,BACK-INO,BACK-MAJ:MIN", loop], check=False)
    try:
        dev = json.loads(proc.stdout)["loopdevices"][0]
        major, _, minor = dev["back-maj:min"].strip().partition(":")
        return os.makedev(int(major), int(minor)), int(dev["back-ino"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def detach(loop: str, backing: tuple[int, int] | None) -> bool:
    """Remove the partition nodes and detach ``loop`` if it is still backed by our image."""
    current = loop_backing(loop)
    if current is None:
        return False
    if backing is not None and current != backing_pair(backing):
        log.warning("%s now backs another file; not detaching it", loop)
        return False
    run_cmd(["partx", "-d", loop], check=False)
    run_cmd(["losetup", "-d", loop], check=False)
    return True


def loops_backed_by(path: str) -> list[str]:
    """Loop devices attached to ``path`` (``losetup -j``)."""
    proc = run_cmd(["losetup", "--list", "--noheadings", "--output", "NAME", "-j", path], check=False)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("/dev/")]


def backing_pair(backing: Any) -> tuple[int, int] | None:
    return (int(backing[0]), int(backing[1])) if backing else None
