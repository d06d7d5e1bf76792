"""Run one command inside a mounted guest, sandboxed: the launcher of every chroot command.

The guest is untrusted, and a chroot command runs the guest's own binaries (its ``/bin/sh``,
``ld.so``, libc) as root. A bare ``chroot(8)`` would leave them every capability of the worker, the
host's pid, mount and network namespaces, and a ``/proc`` through which ``/proc/<host pid>/root``
leads straight back to the host. This launcher runs as its own process
(``python -I -c ... --root ROOT --cwd DIR --status-fd N [--env K=V]... -- CMD...``, see
:func:`launcher_argv`) and:

* unshares new pid, mount, network, IPC and UTS namespaces and makes every mount private, so nothing
  it mounts reaches the host;
* forks: the parent waits and exits with the command's status; the child (pid 1 of the new pid
  namespace, killed with ``SIGKILL`` when the parent dies) chroots into the guest and mounts a fresh,
  *read-only* ``/proc`` there, which shows the sandbox's own processes only (read-only because a
  root without capabilities may still write root-owned files such as ``/proc/sys/kernel/*`` or
  ``/proc/sysrq-trigger``);
* drops every capability (bounding, ambient, effective, permitted, inheritable set), locks the
  securebits, sets ``no_new_privs``, closes every inherited descriptor but 0, 1 and 2, and then
  forks the command (exec'd with only the environment it was given) and reaps until it exits.

Root without capabilities cannot bypass file permissions, mount, load modules, chroot again,
ptrace anything outside or reach a network: the network namespace holds only ``lo``, so chroot
commands have no network. When the command exits, pid 1 exits and the kernel kills whatever the
command left behind. A guest without a ``/proc`` directory runs without ``/proc``.

The launcher reports on the descriptor ``--status-fd``: ``R`` right before the exec, or ``E`` and a
message when the sandbox could not be set up (the command is then never run). The caller turns
anything but a leading ``R`` into ``Run.SandboxFailed`` (:func:`check_status`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys
from pathlib import Path

from ..errors import ImagingError

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000

PR_SET_PDEATHSIG = 1
PR_CAPBSET_READ, PR_CAPBSET_DROP = 23, 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
#: NOROOT, NO_SETUID_FIXUP, KEEP_CAPS (off), NO_CAP_AMBIENT_RAISE, each locked
SECUREBITS_LOCKED_DOWN = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
CAP_SETPCAP = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1

#: exit status of the launcher when the sandbox could not be set up (the status pipe says why)
SETUP_FAILED = 125
#: the environment the launcher itself runs with (the command's comes from ``--env``)
LAUNCHER_ENV = {"LANG": "C"}

# The child imports appliance from the same tree as the caller, whether installed or not; -I keeps
# the caller's environment (PYTHONPATH, PYTHONSTARTUP...) away from a process that starts with root's
# capabilities.
_CHILD = "; ".join(
    (
        "import sys",
        "sys.path.insert(0, sys.argv.pop(1))",
        "from appliance.guest.sandbox import main",
        "sys.exit(main())",
    )
)
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


class SandboxFailed(ImagingError):
    """The sandbox for a chroot command could not be set up; the command did not run."""

    code = "Run.SandboxFailed"


class _Setup(Exception):
    """A step of the sandbox setup failed (message for the status pipe)."""


def launcher_argv(
    root: Path | str, command: list[str], *, cwd: str, env: dict[str, str], status_fd: int
) -> list[str]:
    """The argv that runs ``command`` (an argv list, resolved in the guest) sandboxed in ``root``.

    ``cwd`` is a directory inside the guest, ``env`` the command's whole environment, ``status_fd``
    the write end of a pipe the caller passes on (``pass_fds``) and reads with :func:`check_status`.
    """
    argv = [sys.executable, "-I", "-c", _CHILD, _PACKAGE_PARENT, "--root", str(root), "--cwd", cwd]
    argv += ["--status-fd", str(status_fd)]
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    return [*argv, "--", *command]


def check_status(status: bytes, exit_code: int | None, stderr_tail: str = "") -> None:
    """Raise :class:`SandboxFailed` unless the launcher's status report says the command was started."""
    if status.startswith(b"R"):
        return
    if status.startswith(b"E"):
        reason = status[1:].decode("utf-8", "replace").strip()
    else:
        reason = f"the launcher exited with status {exit_code} before starting the command"
        if stderr_tail:
            reason += f": {stderr_tail}"
    raise SandboxFailed(f"cannot sandbox the chroot command, so it was not run: {reason}")


# ------------------------------------------------------------------------------------ system calls

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise _Setup(f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")
    return result


def _prctl(option: int, arg: int = 0, what: str = "prctl") -> int:
    ul = ctypes.c_ulong
    return _check(_libc.prctl(ctypes.c_int(option), ul(arg), ul(0), ul(0), ul(0)), what)


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    rc = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), None)
    _check(rc, f"mount {fstype or source} on {target}")


def _capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this process, as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    eff, prm, inh = (
        getattr(data[0], f) | getattr(data[1], f) << 32 for f in ("effective", "permitted", "inheritable")
    )
    return eff, prm, inh


def _loopback_up() -> None:
    """Bring ``lo`` of the new (otherwise empty) network namespace up, for tools that use localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req)[:18])[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _drop_capabilities(cap_last: int) -> None:
    """Leave this process, and anything it execs, without any capability and unable to gain one."""
    effective = _capabilities()[0]
    can_setpcap = bool(effective >> CAP_SETPCAP & 1)
    for cap in range(cap_last + 1):
        if _prctl(PR_CAPBSET_READ, cap, "read the bounding set") != 1:
            continue
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EPERM and not can_setpcap:
                # the worker runs without CAP_SETPCAP (systemd drop-in): the bounding set stays,
                # but with no_new_privs and empty permitted/effective sets an exec gains nothing
                break
            _check(-1, f"drop capability {cap} from the bounding set")
    if can_setpcap:
        # uid 0 gets no capabilities from exec, setuid does not touch them: belt and braces
        _prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN, "lock the securebits")
    cleared = _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0) == 0
    if not cleared and ctypes.get_errno() != errno.EINVAL:  # EINVAL: a kernel without ambient caps
        _check(-1, "clear the ambient capabilities")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), (_CapData * 2)()), "capset")
    if _capabilities() != (0, 0, 0) or _prctl(PR_GET_NO_NEW_PRIVS) != 1:
        raise _Setup("capabilities are still held after dropping them")


# -------------------------------------------------------------------------------------- the launcher


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="appliance.guest.sandbox", description="run a command sandboxed in a guest"
    )
    parser.add_argument("--root", required=True, help="the guest's / on the host")
    parser.add_argument("--cwd", default="/", help="working directory inside the guest")
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the command")
    parser.add_argument("command", nargs="+")
    return parser.parse_args(argv)


def _report(fd: int, message: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, message)


def _confine(args: argparse.Namespace, parent: int, cap_last: int, keep: set[int]) -> None:
    """Turn this process (pid 1 of the new namespaces) into the sandbox: guest root, fresh read-only
    /proc, no capabilities, no descriptors but 0, 1, 2 and ``keep``."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
    if select.select([parent], [], [], 0)[0]:
        os._exit(SETUP_FAILED)  # the parent died before the death signal was armed
    os.close(parent)
    os.chroot(args.root)
    os.chdir("/")
    # after the chroot: /proc resolves inside the guest whatever links it holds
    st = os.lstat("/proc") if os.path.lexists("/proc") else None
    if st is not None and stat.S_ISDIR(st.st_mode):
        _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    else:
        os.write(2, b"sandbox: the guest has no /proc directory; running without /proc\n")
    _drop_capabilities(cap_last)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    low = 3
    for fd in sorted(keep):
        os.set_inheritable(fd, False)  # closed by the exec
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(low, limit))


def _command(args: argparse.Namespace, status: int) -> None:
    """In the confined sandbox: report the start, change directory, exec the command (never returns)."""
    env = dict(item.partition("=")[::2] for item in args.env)
    _report(status, b"R")
    try:
        os.chdir(args.cwd)
    except OSError as exc:
        os.write(2, f"sandbox: cannot change directory to {args.cwd}: {exc.strerror}\n".encode())
        os._exit(2)
    try:
        os.execvpe(args.command[0], args.command, env)
    except OSError as exc:
        os.write(2, f"sandbox: cannot run {args.command[0]}: {exc.strerror}\n".encode())
        os._exit(127 if exc.errno == errno.ENOENT else 126)


def _init(args: argparse.Namespace, parent: int, cap_last: int, result: int) -> None:
    """pid 1 of the sandbox: confine itself, run the command as its child, reap, report (never returns).

    The command is not pid 1 itself because the kernel shields a namespace's init from every signal
    it has no handler for (``kill $$``, SIGPIPE would be ignored); pid 1 stays as confined as the
    command, and its exit takes everything the command left behind with it.
    """
    status = args.status_fd
    try:
        _confine(args, parent, cap_last, {status, result})
        command = os.fork()
    except (OSError, _Setup) as exc:
        _report(status, f"E{exc}".encode())
        os._exit(SETUP_FAILED)
    if command == 0:
        os.close(result)
        _command(args, status)
    os.close(status)
    while True:  # reap orphans adopted by pid 1 until the command itself is done
        pid, wait_status = os.wait()
        if pid == command:
            break
    _report(result, struct.pack("=i", wait_status))
    os._exit(0)


def _exit_like(wait_status: int) -> int:
    """Exit the way the child did: its status, or killed by the same signal."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the launcher itself leaves no core file
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.waitstatus_to_exitcode(wait_status)


def main(argv: list[str] | None = None) -> int:
    """Run the launcher (see the module docstring); returns the command's exit status."""
    args = _parse(argv)
    status = args.status_fd
    # a SIGTERM/SIGINT/SIGHUP kills the launcher; its death signal then kills the child and with it
    # the whole pid namespace (pid 1 of a namespace ignores signals it does not handle)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    try:
        cap_last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        _check(_libc.unshare(ctypes.c_int(NAMESPACES)), "unshare namespaces")
        # private before anything is mounted: nothing mounted in the sandbox may reach the host
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        with contextlib.suppress(OSError):  # no localhost then; the sandbox is no weaker for it
            _loopback_up()
        parent = os.pidfd_open(os.getpid())
        result_r, result_w = os.pipe()
        pid = os.fork()
    except (OSError, ValueError, _Setup) as exc:
        _report(status, f"E{exc}".encode())
        return SETUP_FAILED
    if pid == 0:
        try:
            os.close(result_r)
            _init(args, parent, cap_last, result_w)
        finally:
            os._exit(SETUP_FAILED)  # whatever happened, the child never runs the parent's code
    for fd in (parent, status, result_w):
        os.close(fd)
    _, init_status = os.waitpid(pid, 0)
    with os.fdopen(result_r, "rb") as f:
        reported = f.read()
    # the command's own wait status, or (setup failed, init killed) the init's
    return _exit_like(struct.unpack("=i", reported)[0] if len(reported) == 4 else init_status)


__all__ = ["SandboxFailed", "check_status", "launcher_argv", "main"]
