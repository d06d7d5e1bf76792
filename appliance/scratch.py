"""Per-task scratch space under one root with a byte quota shared by every process.

Each task gets a private directory (mode 0700) ``ROOT/<task_id>``. Work that needs scratch
reserves its estimate first; a reservation that would push the sum of all reservations over the
quota, or the filesystem below ``min_free``, fails with ``InsufficientScratch`` before anything
is written. Writers keep inside their reservation (the decompressor caps its output at it), so
usage never exceeds the quota.

Reservations live in ``ROOT/<task_id>/.scratch.json`` and are summed under an ``flock`` on
``ROOT/.lock``, so concurrent tasks in separate processes (CLI runs, the worker) see each other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import InsufficientScratch, UsageError

_META = ".scratch.json"
_LOCK = ".lock"
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Reservation:
    id: int
    nbytes: int
    purpose: str


class ScratchSpace:
    """The scratch root: creates task directories and enforces the shared quota."""

    def __init__(self, root: Path, quota: int, min_free: int = 0) -> None:
        self.root = Path(root)
        self.quota = quota
        self.min_free = min_free
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @classmethod
    def from_config(cls, config) -> ScratchSpace:
        return cls(config.scratch.root, config.scratch.quota, config.scratch.min_free)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _task_dirs(self) -> Iterator[Path]:
        for entry in self.root.iterdir():
            if entry.is_dir() and _TASK_ID.match(entry.name):
                yield entry

    @staticmethod
    def _read_meta(task_dir: Path) -> dict:
        try:
            return json.loads((task_dir / _META).read_text())
        except (OSError, ValueError):
            return {}

    def reserved(self) -> int:
        """Bytes reserved by all tasks together."""
        total = 0
        for d in self._task_dirs():
            total += sum(r["nbytes"] for r in self._read_meta(d).get("reservations", {}).values())
        return total

    def free(self) -> int:
        """Bytes that could still be reserved (quota left, bounded by the filesystem's free space)."""
        st = os.statvfs(self.root)
        fs_free = st.f_bavail * st.f_frsize - self.min_free
        return max(0, min(self.quota - self.reserved(), fs_free))

    def for_task(self, task_id: str) -> TaskScratch:
        """The task's private directory, created (0700) if needed. Safe to call again after a restart."""
        if not _TASK_ID.match(task_id):
            raise UsageError(f"invalid task id for scratch: {task_id!r}")
        path = self.root / task_id
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
        scratch = TaskScratch(self, path)
        scratch._adopt()
        return scratch

    def cleanup_orphans(self, keep: Callable[[str], bool]) -> list[Path]:
        """Remove the directories of tasks that ``keep(task_id)`` rejects; return what was removed.

        A directory whose owning process is still alive on this host is never removed: it belongs
        to a run the store does not know about (e.g. a standalone ``imaging convert``).
        """
        removed = []
        host = socket.gethostname()
        with self._locked():
            for d in list(self._task_dirs()):
                if keep(d.name):
                    continue
                if self._owned_by_other_live_process(d, host):
                    continue
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        return removed

    def _owned_by_other_live_process(self, task_dir: Path, host: str) -> bool:
        meta = self._read_meta(task_dir)
        pid = meta.get("pid")
        return meta.get("host") == host and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)


class TaskScratch:
    """One task's scratch directory and its reservations."""

    def __init__(self, space: ScratchSpace, path: Path) -> None:
        self.space = space
        self.path = path

    @property
    def task_id(self) -> str:
        return self.path.name

    def _meta(self) -> dict:
        meta = ScratchSpace._read_meta(self.path)
        meta.setdefault("reservations", {})
        meta.setdefault("next_id", 1)
        return meta

    def _write(self, meta: dict) -> None:
        tmp = self.path / (_META + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.path / _META)

    def _adopt(self) -> None:
        # Record which process owns the directory now (a resumed task is adopted by a new process).
        with self.space._locked():
            meta = self._meta()
            meta.update(pid=os.getpid(), host=socket.gethostname())
            self._write(meta)

    @property
    def reservations(self) -> list[Reservation]:
        return [
            Reservation(int(k), v["nbytes"], v["purpose"]) for k, v in self._meta()["reservations"].items()
        ]

    @property
    def reserved(self) -> int:
        """Bytes this task has reserved."""
        return sum(r.nbytes for r in self.reservations)

    def usage(self) -> int:
        """Bytes actually allocated under the task directory (sparse files count what they use)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # removed while we walk
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
        return total

    def reserve(self, nbytes: int, purpose: str) -> int:
        """Reserve ``nbytes`` for ``purpose``; returns the reservation id.

        Raises ``InsufficientScratch`` (nothing reserved) when the quota or the disk cannot take it.
        """
        if nbytes < 0:
            raise UsageError("a scratch reservation cannot be negative")
        with self.space._locked():
            if not self.path.is_dir():
                raise InsufficientScratch(f"scratch directory {self.path} no longer exists")
            in_use = self.space.reserved()
            left = self.space.quota - in_use
            st = os.statvfs(self.space.root)
            fs_left = st.f_bavail * st.f_frsize - self.space.min_free
            if nbytes > left:
                raise InsufficientScratch(
                    f"{purpose} needs {_fmt(nbytes)} of scratch but only {_fmt(max(left, 0))} of the "
                    f"{_fmt(self.space.quota)} quota is free ({_fmt(in_use)} reserved by running tasks); "
                    "raise scratch.quota or wait for other tasks to finish"
                )
            if nbytes > fs_left:
                raise InsufficientScratch(
                    f"{purpose} needs {_fmt(nbytes)} of scratch but the filesystem at {self.space.root} "
                    f"has only {_fmt(max(fs_left, 0))} free above the {_fmt(self.space.min_free)} floor"
                )
            meta = self._meta()
            rid = meta["next_id"]
            meta["next_id"] = rid + 1
            meta["reservations"][str(rid)] = {"nbytes": nbytes, "purpose": purpose}
            self._write(meta)
            return rid

    def release(self, reservation_id: int) -> None:
        """Give a reservation back (unknown ids are ignored: release is idempotent)."""
        with self.space._locked():
            if not self.path.is_dir():
                return
            meta = self._meta()
            meta["reservations"].pop(str(reservation_id), None)
            self._write(meta)

    def cleanup(self) -> None:
        """Remove the directory and with it every reservation."""
        with self.space._locked():
            try:
                shutil.rmtree(self.path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
