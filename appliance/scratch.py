"""Per-task scratch space under one root with a byte quota shared by every process.

Each task gets a private directory (mode 0700) ``ROOT/<task_id>``. Work that needs scratch reserves
what it will write before writing it; a reservation that would push the sum of all reservations over
the quota, or promise the filesystem more than it has above ``min_free``, fails with
``InsufficientScratch`` before anything is written. Writers keep inside their reservation, so usage
never exceeds the quota.

What a reservation holds:

- a writer that knows its size reserves exactly that (a download whose source declares its length, the
  RAW form of a disk from its header);
- a writer that does not (a chunked download without Content-Length, a decompressor) uses an
  :class:`appliance.allowance.Allowance`, which grows the reservation as the bytes arrive, a step
  ahead of them, and fails with ``InsufficientScratch`` only when the quota (or the disk) cannot hold
  the bytes themselves;
- when the work is done the reservation is shrunk to what the output holds, and it stays as long as the
  output does (it is released with the task's directory, or by the step's undo).

Reservations are tagged with the workflow step that made them (:meth:`TaskScratch.for_step`): the
engine releases a step's reservations when an attempt of it fails and when a resumed task re-runs a step
that was interrupted, so a step never counts twice against the quota.

The filesystem check counts what is reserved but not yet written: for each task, its reservations less
the bytes its directory already holds. A finished download is therefore not counted once as used disk
space and again as a reservation.

Reservations live in ``ROOT/<task_id>/.scratch.json`` and are read and changed only under an ``flock``
on ``ROOT/.lock``, so concurrent tasks in separate processes (CLI runs, the worker's task children) see
each other and a check and the reservation it allows are one atomic step.

The space (:class:`ScratchSpace`) owns the lock and admits every reservation against the quota and
the disk (:meth:`ScratchSpace.admit`); a task's scratch (:class:`TaskScratch`) keeps its own
reservations and asks the space before one grows.

A write that finds no room anyway (ENOSPC, EDQUOT: the disk filled with something else) becomes
``InsufficientScratch`` through :func:`appliance.nospace.no_space_error`.
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

from .atomicfile import write_json_atomic
from .config import Config
from .errors import InsufficientScratch, UsageError
from .pids import pid_alive

#: a task's reservations
_META = ".scratch.json"
#: the lock of the accounting
_LOCK = ".lock"
#: the root's high-water mark of reserved bytes (kept when task directories go)
_PEAK = ".peak.json"
#: the accounting's own files: bookkeeping rather than scratch a step uses (never reserved)
ACCOUNTING_FILES = frozenset({_META, _LOCK, _PEAK})
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def reserved_in(meta: dict) -> int:
    """Bytes the reservations of one task's meta hold."""
    return sum(r["nbytes"] for r in meta.get("reservations", {}).values())


def _allocated(directory: Path) -> int:
    """Bytes allocated under ``directory`` (sparse files count what they use, a file with several links
    once; nothing mounted below it is counted)."""
    try:
        device = os.lstat(directory).st_dev
    except FileNotFoundError:
        return 0
    total = 0
    seen: set[int] = set()
    for dirpath, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if _on_device(os.path.join(dirpath, d), device)]
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed while we walk
                st = os.lstat(os.path.join(dirpath, name))
                if st.st_dev == device and st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_blocks * 512
    return total


def _on_device(path: str, device: int) -> bool:
    try:
        return os.lstat(path).st_dev == device
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class Reservation:
    id: int
    nbytes: int
    purpose: str
    #: the workflow step that made it (None outside a workflow)
    step: str | None = None


class ScratchSpace:
    """The scratch root: creates task directories and enforces the shared quota."""

    def __init__(self, root: Path, quota: int, min_free: int = 0) -> None:
        self.root = Path(root)
        self.quota = quota
        self.min_free = min_free
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @classmethod
    def from_config(cls, config: Config) -> ScratchSpace:
        return cls(config.scratch.root, config.scratch.quota, config.scratch.min_free)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the root's lock: every read-and-change of reservations happens under it."""
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
    def read_meta(task_dir: Path) -> dict:
        try:
            return json.loads((task_dir / _META).read_text())
        except (OSError, ValueError):
            return {}

    def reserved(self) -> int:
        """Bytes reserved by all tasks together."""
        return sum(reserved_in(self.read_meta(d)) for d in self._task_dirs())

    def peak(self) -> int:
        """The most bytes ever reserved at once under this root, by all tasks together (the scratch an
        import really needed; it survives the task directories). :meth:`reset_peak` starts it again."""
        with self.locked():
            return self._read_peak()

    def reset_peak(self) -> None:
        """Start the high-water mark of :meth:`peak` again from what is reserved now."""
        with self.locked():
            write_json_atomic(self.root / _PEAK, {"reserved": self.reserved()}, 0o600, durable=False)

    def _read_peak(self) -> int:
        try:
            return int(json.loads((self.root / _PEAK).read_text())["reserved"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def note_peak(self) -> None:
        """Raise the high-water mark to what is reserved now (lock held)."""
        now = self.reserved()
        if now > self._read_peak():
            write_json_atomic(self.root / _PEAK, {"reserved": now}, 0o600, durable=False)

    def _unwritten(self, override: tuple[Path, int] | None = None) -> int:
        """Bytes reserved but not yet written, over all tasks: each task's reservations less what its
        directory holds. ``override`` = (task dir, its reservations) replaces what that task's meta says."""
        total = 0
        for d in self._task_dirs():
            if override is not None and d == override[0]:
                reserved = override[1]
            else:
                reserved = reserved_in(self.read_meta(d))
            if reserved > 0:
                total += max(0, reserved - _allocated(d))
        return total

    def _fs_room(self) -> int:
        """Bytes the filesystem has free above ``min_free`` (negative when below it)."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize - self.min_free

    def free(self) -> int:
        """Bytes that could still be reserved: the quota left, bounded by the filesystem's free space above
        ``min_free`` less what existing reservations have yet to write."""
        with self.locked():
            return max(0, min(self.quota - self.reserved(), self._fs_room() - self._unwritten()))

    def admit(self, task_dir: Path, rest: int, nbytes: int, purpose: str) -> None:
        """Raise ``InsufficientScratch`` unless the task of ``task_dir``, whose other reservations hold
        ``rest`` bytes, may hold ``nbytes`` in the one being made or grown (lock held).

        Both bounds are checked here, where the reservations of every task are known: the quota, and
        the filesystem's room above ``min_free`` less what every task has reserved but not written.
        """
        others = rest + sum(reserved_in(self.read_meta(d)) for d in self._task_dirs() if d != task_dir)
        left = self.quota - others
        if nbytes > left:
            raise InsufficientScratch(
                f"{purpose} needs {_fmt(nbytes)} of scratch but only {_fmt(max(left, 0))} of the "
                f"{_fmt(self.quota)} quota is free ({_fmt(others)} reserved by running tasks); "
                "raise scratch.quota or wait for other tasks to finish"
            )
        room = self._fs_room()
        if self._unwritten((task_dir, rest + nbytes)) > room:
            promised = self._unwritten((task_dir, rest))
            raise InsufficientScratch(
                f"{purpose} needs {_fmt(nbytes)} of scratch but the filesystem at {self.root} has only "
                f"{_fmt(max(room, 0))} free above the {_fmt(self.min_free)} floor, "
                f"{_fmt(promised)} of it reserved by running tasks and not yet written; free space there, "
                "or lower scratch.quota to what the disk can hold"
            )

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
        with self.locked():
            for d in list(self._task_dirs()):
                if keep(d.name):
                    continue
                if self._owned_by_other_live_process(d, host):
                    continue
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        return removed

    def _owned_by_other_live_process(self, task_dir: Path, host: str) -> bool:
        meta = self.read_meta(task_dir)
        pid = meta.get("pid")
        return meta.get("host") == host and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid)


class TaskScratch:
    """One task's scratch directory and its reservations.

    ``step`` tags the reservations this object makes (see :meth:`for_step`); all objects of one task
    share the directory and see every reservation.
    """

    def __init__(self, space: ScratchSpace, path: Path, step: str | None = None) -> None:
        self.space = space
        self.path = path
        self.step = step

    @property
    def task_id(self) -> str:
        return self.path.name

    def for_step(self, step: str | None) -> TaskScratch:
        """The same directory, with reservations tagged as made by workflow step ``step``."""
        return TaskScratch(self.space, self.path, step)

    def _meta(self) -> dict:
        meta = ScratchSpace.read_meta(self.path)
        meta.setdefault("reservations", {})
        meta.setdefault("next_id", 1)
        return meta

    def _write(self, meta: dict) -> None:
        # Not fsynced: the accounting of a scratch directory means nothing after a power loss.
        write_json_atomic(self.path / _META, meta, 0o600, durable=False)

    def _adopt(self) -> None:
        # Record which process owns the directory now (a resumed task is adopted by a new process).
        with self.space.locked():
            meta = self._meta()
            meta.update(pid=os.getpid(), host=socket.gethostname())
            self._write(meta)

    @property
    def reservations(self) -> list[Reservation]:
        return [
            Reservation(int(k), v["nbytes"], v["purpose"], v.get("step"))
            for k, v in self._meta()["reservations"].items()
        ]

    @property
    def reserved(self) -> int:
        """Bytes this task has reserved."""
        return sum(r.nbytes for r in self.reservations)

    def usage(self) -> int:
        """Bytes actually allocated under the task directory (sparse files count what they use)."""
        return _allocated(self.path)

    def _admit(self, meta: dict, rid: int, nbytes: int, purpose: str) -> None:
        """Raise ``InsufficientScratch`` unless reservation ``rid`` may hold ``nbytes`` (lock held).

        Shrinking, and a reservation of nothing, always succeed.
        """
        if nbytes < 0:
            raise UsageError("a scratch reservation cannot be negative")
        if not self.path.is_dir():
            raise InsufficientScratch(f"scratch directory {self.path} no longer exists")
        old = meta["reservations"].get(str(rid), {}).get("nbytes", 0)
        if nbytes > old:
            self.space.admit(self.path, reserved_in(meta) - old, nbytes, purpose)

    def reserve(self, nbytes: int, purpose: str) -> int:
        """Reserve ``nbytes`` for ``purpose``; returns the reservation id.

        Raises ``InsufficientScratch`` (nothing reserved) when the quota or the disk cannot take it.
        """
        with self.space.locked():
            meta = self._meta()
            rid = meta["next_id"]
            self._admit(meta, rid, nbytes, purpose)
            meta["next_id"] = rid + 1
            meta["reservations"][str(rid)] = {"nbytes": nbytes, "purpose": purpose, "step": self.step}
            self._write(meta)
            self.space.note_peak()
            return rid

    def resize(self, reservation_id: int, nbytes: int) -> None:
        """Make reservation ``reservation_id`` hold ``nbytes`` (grow or shrink), atomically.

        Growing raises ``InsufficientScratch`` (the reservation unchanged) when the quota or the disk
        cannot take it; shrinking always succeeds. ``UsageError`` for an unknown reservation.
        """
        with self.space.locked():
            meta = self._meta()
            entry = meta["reservations"].get(str(reservation_id))
            if entry is None:
                raise UsageError(f"no scratch reservation {reservation_id} in {self.path}")
            self._admit(meta, reservation_id, nbytes, entry["purpose"])
            grows = nbytes > entry["nbytes"]
            entry["nbytes"] = nbytes
            self._write(meta)
            if grows:
                self.space.note_peak()

    def release(self, reservation_id: int) -> None:
        """Give a reservation back (unknown ids are ignored: release is idempotent)."""
        with self.space.locked():
            if not self.path.is_dir():
                return
            meta = self._meta()
            meta["reservations"].pop(str(reservation_id), None)
            self._write(meta)

    def release_step(self, step: str) -> int:
        """Give back every reservation workflow step ``step`` made; returns the bytes released."""
        with self.space.locked():
            if not self.path.is_dir():
                return 0
            meta = self._meta()
            mine = [k for k, v in meta["reservations"].items() if v.get("step") == step]
            released = sum(meta["reservations"].pop(k)["nbytes"] for k in mine)
            if mine:
                self._write(meta)
            return released

    def cleanup(self) -> None:
        """Remove the directory and with it every reservation."""
        with self.space.locked():
            try:
                shutil.rmtree(self.path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
