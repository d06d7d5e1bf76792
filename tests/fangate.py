"""Hold a process at the moment it opens a file, with fanotify permission events (needs root).

:class:`OpenGate` watches the direct children of one directory (``FAN_OPEN_PERM``). Every open of a
file there is allowed at once, unless ``hold(path, pid)`` says to hold it: the opener then waits in
the kernel (killably: SIGKILL still ends it) until :meth:`OpenGate.release`, or until the gate
closes. The first held open is in :attr:`OpenGate.held`. A test can so kill a process at an exact
point of its work (the partial output exists, nothing has been written to it) without timing
anything. Only the one directory is watched, so no other process on the machine is slowed.

:class:`MountGate` does the same for every file of a mount (a directory bind-mounted onto itself,
:func:`bind_mount`), holding many openers at once, each under a key the test releases by itself.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_CONTENT = 0x4
FAN_MARK_ADD = 0x1
FAN_OPEN_PERM = 0x10000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ALLOW = 0x1
AT_FDCWD = -100
#: struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid
_EVENT = struct.Struct("IBBHQii")
#: struct fanotify_response: fd, response
_RESPONSE = struct.Struct("iI")


def comm(pid: int) -> str:
    """The command name of process ``pid`` ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _fanotify(path: Path, flags: int, mask: int, what: str) -> int:
    """A fanotify descriptor of permission events (``mask``) marked on ``path`` with ``flags``; the test
    is skipped where the kernel does not offer fanotify or ``what``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_mark.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    fd = libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC)
    if fd < 0:
        pytest.skip(f"fanotify is not available here: {os.strerror(ctypes.get_errno())}")
    if libc.fanotify_mark(fd, FAN_MARK_ADD | flags, mask, AT_FDCWD, os.fsencode(path)) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        pytest.skip(f"{what} are not available here: {os.strerror(err)}")
    return fd


def _events(fd: int) -> Iterator[tuple[int, int]]:
    """The events that came on ``fd`` within 50 ms, as (event descriptor, pid of the opener): none when
    nothing came, so that a gate's loop looks at its stop flag again."""
    ready, _, _ = select.select([fd], [], [], 0.05)
    if not ready:
        return
    try:
        buf = os.read(fd, 64 * 1024)
    except BlockingIOError:
        return
    offset = 0
    while offset + _EVENT.size <= len(buf):
        length, _vers, _res, _meta, _mask, event_fd, pid = _EVENT.unpack_from(buf, offset)
        offset += length
        yield event_fd, pid


class OpenGate:
    """See the module docstring; use it as a context manager."""

    def __init__(self, directory: Path, hold: Callable[[Path, int], bool]) -> None:
        mask = FAN_OPEN_PERM | FAN_EVENT_ON_CHILD
        self._fd = _fanotify(directory, 0, mask, "fanotify permission events")
        self._hold = hold
        #: (path, pid) of the first open held
        self.held: tuple[Path, int] | None = None
        self._released = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="open gate", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Let every held open (and every later one) through."""
        self._released.set()

    def _allow(self, event_fd: int) -> None:
        os.write(self._fd, _RESPONSE.pack(event_fd, FAN_ALLOW))
        os.close(event_fd)

    def _loop(self) -> None:
        waiting: list[int] = []
        while not self._stop.is_set():
            if self._released.is_set():
                while waiting:
                    self._allow(waiting.pop())
            for event_fd, pid in _events(self._fd):
                path = Path(os.readlink(f"/proc/self/fd/{event_fd}"))
                if not self._released.is_set() and self._hold(path, pid):
                    if self.held is None:
                        self.held = (path, pid)
                    waiting.append(event_fd)
                else:
                    self._allow(event_fd)
        while waiting:
            self._allow(waiting.pop())

    def close(self) -> None:
        self._released.set()
        self._stop.set()
        self._thread.join(timeout=10)
        os.close(self._fd)  # anything still pending is allowed by the kernel

    def __enter__(self) -> OpenGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FAN_MARK_MOUNT = 0x10


class MountGate:
    """Hold opens of files on one mount (``FAN_MARK_MOUNT``), each under a key, released key by key.

    ``decide(path, pid)`` runs in the gate's thread for every open of a file on the mount (directories
    are not reported): it returns a key to hold the open under, or None to allow it. It must not open
    files on the mount itself (the gate would wait for itself). Held openers wait in the kernel
    (killably) until :meth:`release` of their key, or until the gate closes; :attr:`held` keeps the
    first open held under each key. Use it on a mount that only the test's processes use, such as a
    directory bind-mounted onto itself (:func:`bind_mount`).
    """

    def __init__(self, mount: Path, decide: Callable[[Path, int], object | None]) -> None:
        self._fd = _fanotify(mount, FAN_MARK_MOUNT, FAN_OPEN_PERM, "fanotify mount marks")
        self._decide = decide
        self._lock = threading.Lock()
        #: key -> (path, pid) of the first open held under it
        self.held: dict[object, tuple[Path, int]] = {}
        self._waiting: dict[object, list[int]] = {}
        #: exceptions ``decide`` raised (the open was allowed): a test should assert there are none
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mount gate", daemon=True)
        self._thread.start()

    def _answer(self, event_fd: int, response: int = FAN_ALLOW) -> None:
        try:
            os.write(self._fd, _RESPONSE.pack(event_fd, response))
        except OSError:
            pass  # the opener is gone (killed): the kernel dropped its event
        finally:
            os.close(event_fd)

    def release(self, key: object) -> None:
        """Let the opens held under ``key`` through (``decide`` rules on later ones again)."""
        with self._lock:
            waiting = self._waiting.pop(key, [])
            self.held.pop(key, None)
        for event_fd in waiting:
            self._answer(event_fd)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for event_fd, pid in _events(self._fd):
                try:
                    key = self._decide(Path(os.readlink(f"/proc/self/fd/{event_fd}")), pid)
                except BaseException as exc:  # the test sees it; the opener must not wait for a bug
                    self.errors.append(exc)
                    key = None
                if key is None:
                    self._answer(event_fd)
                    continue
                with self._lock:
                    self.held.setdefault(key, (Path(os.readlink(f"/proc/self/fd/{event_fd}")), pid))
                    self._waiting.setdefault(key, []).append(event_fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            waiting = [fd for fds in self._waiting.values() for fd in fds]
            self._waiting.clear()
        for event_fd in waiting:
            self._answer(event_fd)
        os.close(self._fd)

    def __enter__(self) -> MountGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def bind_mount(directory: Path) -> Iterator[Path]:
    """``directory`` bind-mounted onto itself: a mount of its own, for a :class:`MountGate` (needs root).
    Unmounted afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=False)
