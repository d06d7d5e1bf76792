"""Crash recovery of guest mounts: the owner's record of what it attached and mounted, its lock, and
the sweep that undoes the records of owners that died (see :mod:`appliance.guest.mount`)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomicfile import write_json_atomic
from ..errors import ImagingError
from .loopdev import backing_pair, detach, loop_backing, loops_backed_by, mounts_under, unmount

log = logging.getLogger(__name__)


class AmbiguousLoop(ImagingError):
    """A loop device on a recorded backing file might belong to another owner attaching right now."""

    code = "Guest.AmbiguousLoop"


def _unrecorded_loops(record: dict[str, Any]) -> list[str]:
    """Loop devices the record's owner attached but did not live to record (killed inside losetup).

    Found by the recorded backing file; a device counts only when its backing inode still matches
    and no other record of the same state directory claims it. Raises :class:`AmbiguousLoop` when
    another owner is attaching the same file right now (its device cannot be told from ours yet).
    """
    path, backing = record.get("backing_path"), backing_pair(record.get("backing"))
    if not path or backing is None:
        return []
    candidates = [dev for dev in loops_backed_by(path) if loop_backing(dev) == backing]
    if not candidates:
        return []
    claimed, attaching = set(), False
    workdir = record.get("workdir")
    mounts_dir = Path(workdir).parent if workdir else None
    for other in sorted(mounts_dir.glob("*.json")) if mounts_dir and mounts_dir.is_dir() else []:
        try:
            data = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if data.get("workdir") == workdir:
            continue
        if data.get("loop"):
            claimed.add(data["loop"])
        elif backing_pair(data.get("backing")) == backing and _lock_held(other.with_suffix(".lock")):
            attaching = True
    candidates = [dev for dev in candidates if dev not in claimed]
    if candidates and attaching:
        raise AmbiguousLoop(
            f"another owner is attaching {path}; {', '.join(candidates)} left for a later sweep"
        )
    return candidates


def _kill_processes_rooted_in(root: str) -> list[int]:
    """SIGKILL processes whose root directory is ``root`` or below (left-overs of a chroot command)."""
    killed = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            proot = os.readlink(f"/proc/{entry}/root")
        except OSError:
            continue
        if proot == root or proot.startswith(root + "/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed


# --------------------------------------------------------------------------------------- state files


def _lock(path: Path, *, blocking: bool) -> int | None:
    """flock ``path`` (created if needed); None when not blocking and someone else holds it.

    Retries when the file was unlinked/replaced between open and lock (the usual lock-file race
    with a sweeper that removes lock files of dead owners).
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _lock_held(path: Path) -> bool:
    """Whether someone holds the flock on ``path`` (a live owner, or a sweeper at work)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: assume alive, the safe side
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # field 22 (starttime) after the parenthesised command name, which may contain spaces
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


class StateFile:
    """The owner's record of what it attached and mounted, for crash recovery."""

    def __init__(self, mounts_dir: Path, owner: str, image: str) -> None:
        mounts_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # names the images mounted
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", owner) or "owner"
        n = 0
        while True:
            stem = safe if n == 0 else f"{safe}.{n}"
            fd = _lock(mounts_dir / f"{stem}.lock", blocking=False)
            if fd is not None and not (mounts_dir / f"{stem}.json").exists():
                break
            if fd is not None:  # a dead owner's entry: leave it to sweep_stale, use another name
                os.close(fd)
            n += 1
        self.lock_fd = fd
        self.path = mounts_dir / f"{stem}.json"
        self.lock_path = mounts_dir / f"{stem}.lock"
        self.workdir = mounts_dir / f"{stem}.d"
        self.data: dict[str, Any] = {
            "owner": owner,
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "image": image,
            "workdir": str(self.workdir),
            "loop": None,
            "backing": None,
            "mounts": [],
        }
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data, 0o644)

    def close(self) -> None:
        """Remove the record (everything it lists is undone) and release the lock."""
        self.path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        os.close(self.lock_fd)


def undo(record: dict[str, Any], on_change: Callable[[str, str], None] | None = None) -> list[str]:
    """Unmount everything under the record's workdir, detach its loop device, remove its dirs."""
    done = []
    workdir = record.get("workdir")
    recorded = set(record.get("mounts") or [])
    if workdir and mounts_under(os.path.join(workdir, "root")):
        # a chroot command (or its daemons) left behind keeps the mounts busy
        _kill_processes_rooted_in(os.path.join(workdir, "root"))
    for _ in range(3):  # stacked mounts on one point need one pass each
        points = mounts_under(workdir) if workdir else list(reversed(record.get("mounts") or []))
        if not points:
            break
        for point in points:
            unmount(point)
            done.append(f"unmounted {point}")
            if on_change and point in recorded:
                on_change("removed", f"mount:{point}")
    loop = record.get("loop")
    loops = [loop] if loop else _unrecorded_loops(record)
    for device in loops:
        if detach(device, record.get("backing")):
            done.append(f"detached {device}")
            if on_change:
                on_change("removed", f"loop:{device}")
    if workdir and os.path.isdir(workdir) and not mounts_under(workdir):
        # only after every mount is gone: rmtree must never descend into a guest filesystem
        shutil.rmtree(workdir, ignore_errors=True)
    return done


def sweep_stale(state_dir: Path | str, on_change: Callable[[str, str, str], None] | None = None) -> list[str]:
    """Undo the mounts and loop devices recorded by owners that are no longer running.

    An owner is gone when nobody holds its lock file (the kernel drops ``flock``s of dead
    processes) and its recorded PID is not running with the recorded start time. Returns one line
    per action taken; ``on_change(owner, "removed", resource)`` is called for every recorded mount
    and loop device undone (the worker puts them in the owning task's cleanup ledger).
    Idempotent; concurrent sweepers skip entries another sweeper is working on.
    """
    mounts_dir = Path(state_dir) / "mounts"
    if not mounts_dir.is_dir():
        return []
    cleaned: list[str] = []
    for path in sorted(mounts_dir.glob("*.json")):
        # one bad record (a hung umount, a root-owned lock file) must not stop the sweep nor the worker
        try:
            cleaned.extend(_sweep_one(path, on_change))
        except (OSError, ImagingError) as exc:
            log.warning("could not sweep mount record %s (left for a later sweep): %s", path, exc)
    return cleaned


def _sweep_one(path: Path, on_change: Callable[[str, str, str], None] | None) -> list[str]:
    """Undo one mount record if its owner is gone; the lines of :func:`sweep_stale`."""
    lock_path = path.with_suffix(".lock")
    try:
        fd = _lock(lock_path, blocking=False)
    except PermissionError:
        # e.g. written by a worker that ran as root (the drop-in), swept by one that no longer does
        log.warning("cannot open %s (permission denied); skipping its mount record", lock_path)
        return []
    if fd is None:
        return []  # alive (or being swept right now)
    try:
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            # its owner finished between glob and lock: drop the lock file our lock just recreated
            lock_path.unlink(missing_ok=True)
            return []
        except PermissionError:
            log.warning("cannot read mount record %s (permission denied); skipping it", path)
            return []
        except (OSError, ValueError):
            log.warning("unreadable mount record %s; removing it", path)
            path.unlink(missing_ok=True)
            return []
        pid = record.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _process_start(pid) == record.get("pid_start"):
            return []  # same process still running; its lock was lost (should not happen)
        owner = str(record.get("owner"))
        report = functools.partial(on_change, owner) if on_change else None
        actions = undo(record, report)
        if not undone(record):
            log.warning("mount record %s not fully undone; left for a later sweep", path)
            return [f"{owner}: {a}" for a in actions]
        path.unlink(missing_ok=True)
        lock_path.unlink(missing_ok=True)
        return [f"{owner}: {a}" for a in actions]
    finally:
        os.close(fd)


def undone(record: dict[str, Any]) -> bool:
    """Nothing the record lists is still mounted or attached."""
    workdir, loop, backing = record.get("workdir"), record.get("loop"), backing_pair(record.get("backing"))
    if workdir and mounts_under(workdir):
        return False
    if loop:
        return loop_backing(loop) != backing
    try:
        return not _unrecorded_loops(record)
    except AmbiguousLoop:
        return False
