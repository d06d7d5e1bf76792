"""Observing a real confined child while it runs: find it, hold it, read what /proc says about it.

Two ways to hold a child at a known point, both on the real tools:

* :func:`lease` puts a write lease on the image: a child that opens it blocks in ``open()`` until the
  lease is released (``fcntl(F_SETLEASE)``; root holds leases on any file). Deterministic, for tools that
  open the image themselves (qemu-img info/check, the guest probe).
* :func:`stop` sends SIGSTOP to a child found by :func:`find_descendant` (and SIGCONT on exit), for a
  child that is known to be busy (qemu-img convert reporting progress).

:func:`observe` then reads the child's limits, namespaces, working directory, descriptors, environment
and credentials.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import confine


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def parent(pid: int) -> int | None:
    """The parent of ``pid`` (None when it is gone)."""
    info = _ppid_and_state(pid)
    return None if info is None else info[0]


def gone(pid: int) -> bool:
    """The process no longer runs (it does not exist, or is a zombie nobody reaped yet)."""
    info = _ppid_and_state(pid)
    return info is None or info[1] in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def descendants(root: int | None = None) -> list[int]:
    """Live descendants of ``root`` (default: this process), parents before children."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_state(int(entry))
            if info is not None and info[1] not in ("Z", "X"):
                children.setdefault(info[0], []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def find_descendant(
    match: Callable[[list[str]], bool],
    root: int | None = None,
    timeout: float = 60.0,
    interval: float = 0.002,
) -> int:
    """The first live descendant of ``root`` whose argv ``match`` accepts; fails the test after
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(root):
            if match(cmdline(pid)):
                return pid
        time.sleep(interval)
    pytest.fail(f"no matching process appeared under {root or os.getpid()} within {timeout} s")


def is_tool(name: str, *words: str) -> Callable[[list[str]], bool]:
    """Matches the argv of the tool ``name`` itself (not the launcher chain in front of it)."""

    def match(argv: list[str]) -> bool:
        return bool(argv) and Path(argv[0]).name == name and all(w in argv for w in words)

    return match


def is_python_module(module: str) -> Callable[[list[str]], bool]:
    """Matches a ``python -I -c ... from <module> import main`` child."""

    def match(argv: list[str]) -> bool:
        return len(argv) > 3 and argv[1:3] == ["-I", "-c"] and f"from {module} import main" in argv[3]

    return match


@dataclass
class Lease:
    fd: int

    def broken(self) -> bool:
        """Someone opened the file: the lease is being broken and the opener waits."""
        return fcntl.fcntl(self.fd, fcntl.F_GETLEASE) != fcntl.F_WRLCK

    def wait_broken(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.broken():
            if time.monotonic() > deadline:
                pytest.fail("nobody opened the leased file")
            time.sleep(0.002)

    def release(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


@contextlib.contextmanager
def lease(path: Path) -> Iterator[Lease]:
    """A write lease on ``path``: whoever opens it next blocks until :meth:`Lease.release` (or the exit)."""
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease-break signal would kill us
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        yield Lease(fd)
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
        signal.signal(signal.SIGIO, previous)


@contextlib.contextmanager
def stop(pid: int) -> Iterator[None]:
    """Hold ``pid`` stopped (SIGSTOP) for the block, then let it continue."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while (_ppid_and_state(pid) or (0, "T"))[1] not in ("T", "t", "Z") and time.monotonic() < deadline:
            time.sleep(0.001)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@dataclass(frozen=True)
class Observed:
    """What /proc says about a confined child."""

    pid: int
    argv: list[str]
    cpu_seconds: int | None
    address_space: int | None
    core_size: int | None
    net_ns: str
    cwd: Path
    cwd_mode: int
    cwd_entries: list[str]
    #: descriptor number → what it refers to (a path, ``pipe:[…]``, ``anon_inode:…``)
    fds: dict[int, str]
    environ: dict[str, str]
    no_new_privs: bool
    effective_caps: int

    def files(self) -> dict[int, str]:
        """The descriptors above 2 that refer to files (not pipes, sockets or anonymous inodes)."""
        return {n: t for n, t in self.fds.items() if n > 2 and t.startswith("/")}


def _limit(text: str, name: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(name):
            soft = line[len(name) :].split()[0]
            return None if soft == "unlimited" else int(soft)
    raise AssertionError(f"no {name!r} in /proc limits")


def observe(pid: int) -> Observed:
    """Read the confinement of the (held) process ``pid``."""
    proc = Path(f"/proc/{pid}")
    limits = (proc / "limits").read_text()
    fds = {}
    for entry in (proc / "fd").iterdir():
        with contextlib.suppress(OSError):
            fds[int(entry.name)] = os.readlink(entry)
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
    environ = dict(
        item.split("=", 1) for item in (proc / "environ").read_bytes().decode().split("\0") if "=" in item
    )
    cwd = Path(os.readlink(proc / "cwd"))
    return Observed(
        pid=pid,
        argv=cmdline(pid),
        cpu_seconds=_limit(limits, "Max cpu time"),
        address_space=_limit(limits, "Max address space"),
        core_size=_limit(limits, "Max core file size"),
        net_ns=os.readlink(proc / "ns" / "net"),
        cwd=cwd,
        cwd_mode=cwd.stat().st_mode & 0o7777,
        cwd_entries=sorted(os.listdir(cwd)),
        fds=fds,
        environ=environ,
        no_new_privs=status["NoNewPrivs"].strip() == "1",
        effective_caps=int(status["CapEff"].strip(), 16),
    )


def own_net_ns() -> str:
    return os.readlink("/proc/self/ns/net")


def assert_confined(
    seen: Observed,
    policy: confine.Policy,
    *,
    cwd_entries: list[str],
    files: set[Path] = frozenset(),
    forbidden_fd_targets: set[str] = frozenset(),
) -> None:
    """``seen`` ran under the whole policy: ``policy``'s limits, no core dumps, a network namespace of its
    own (where this host has one), the private working directory holding ``cwd_entries``, no descriptor
    but 0-2 and ``files``, the minimal environment, no privileges."""
    assert seen.cpu_seconds == policy.cpu_seconds, seen
    assert seen.address_space == policy.address_space, seen
    assert seen.core_size == 0, seen
    if confine.isolation().network is not None:
        assert seen.net_ns != own_net_ns(), "the child shares the caller's network namespace"
    assert seen.cwd_mode == 0o700 and seen.cwd_entries == cwd_entries, seen
    allowed = {str(Path(f).resolve()) for f in files} | {str(f) for f in files}
    assert set(seen.files().values()) <= allowed, f"unexpected open files: {seen.files()} (allowed {allowed})"
    assert not set(seen.fds.values()) & set(forbidden_fd_targets), seen.fds
    assert seen.environ == confine.child_env(), seen.environ
    assert seen.no_new_privs and seen.effective_caps == 0, seen


def wait_reading(pid: int, fd: int = 0, timeout: float = 60.0) -> None:
    """Wait until ``pid`` blocks in ``read(fd, …)`` (``/proc/PID/syscall``: number 0, first argument)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/syscall").read_text().split()
            if len(fields) > 1 and fields[0] == "0" and int(fields[1], 16) == fd:
                return
        time.sleep(0.005)
    pytest.fail(f"process {pid} did not block reading descriptor {fd} within {timeout} s")


#: a guest probe subverted by its disk (in place of :data:`appliance.guest.validate.CHILD`): it prints more
#: than :data:`appliance.guest.validate.PROBE_OUTPUT` of noise, then a well-formed empty answer, and exits
#: (``--wait``: after reading its disk's name, as the pending probe's child does)
FLOODING_PROBE = (
    "import sys\n"
    "if sys.argv[-1] == '--wait': sys.stdin.readline()\n"
    "sys.stdout.write('x' * (10 << 20) + '\\n{\"report\": {}}\\n')\n"
)
