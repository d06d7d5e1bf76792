"""The one confinement policy for every process that parses untrusted bytes.

``qemu-img info``/``check``/``convert``, the decompressor child (:mod:`appliance.image.decompress`) and
the guest probe (:mod:`appliance.guest.probe`) all start through :func:`spawn` or :func:`run`, and so
all get the same treatment (README, "Confinement of untrusted-input parsers"):

* **resource limits**: RLIMIT_CPU and RLIMIT_AS from ``config.limits`` (a :class:`Policy` per tool; the
  conversion and decompression CPU limits scale with the size of the work), no core dumps; a wall-clock
  limit for the tools whose work does not scale (info, check, the probe);
* **no network**: a new, empty network namespace (inside a new user namespace, so this needs no
  privilege, and the tool keeps no capability: it is not root in that namespace). Where the kernel
  refuses user namespaces a root caller gets a plain network namespace; otherwise the tool runs in the
  caller's network namespace and :func:`isolation` says why, which the worker reports to health;
* **an empty private working directory** (mode 0700) holding only a link to the image, so a relative
  file name inside an image resolves to nothing (:func:`private_link`, :func:`private_dir`);
* **only the files it needs open**: stdin, stdout and stderr as the caller passes them, every other
  descriptor closed (no inherited file, socket or pipe);
* **a parent-death signal** (SIGKILL): when the process that started it dies, the tool dies with it,
  so a killed task leaves no qemu-img or probe behind;
* ``no_new_privs``, and the environment :func:`child_env` (C locale, a minimal ``PATH``,
  ``MALLOC_ARENA_MAX=2``) with nothing inherited.

Everything is set up by util-linux programs that ``exec`` the next one (``setpriv`` → ``unshare`` →
``prlimit`` → the tool), so the confined process *is* the tool: same pid (``Popen.kill`` reaches it), its
exit status shows the signal that killed it, and no Python runs between ``fork`` and ``exec``
(``preexec_fn`` is unsafe in the threaded worker).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import confinepipes
from .config import Limits
from .errors import Cancelled, ImagingError, UsageError

SETPRIV, UNSHARE, PRLIMIT = "setpriv", "unshare", "prlimit"
#: the only directories a confined child may search for helpers
MINIMAL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: glibc reserves 64 MiB of address space per malloc arena, one arena per thread up to 8 per core; two
#: arenas keep qemu-img's address space close to what it uses (measured 180-300 MiB instead of up to
#: 1.1 GiB for the same conversions) without a measurable cost in time (README, "Confinement")
MALLOC_ARENA_MAX = "2"
#: name of the image link inside the private directory; deliberately extension-less and colon-free
LINK_NAME = "image"
GiB = 1 << 30

# A confined tool can hang in uninterruptible I/O without using CPU; unless the policy says otherwise its
# wall time is bounded too.
_MIN_WALL_SECONDS = 60
_WALL_PER_CPU_SECOND = 4
# what a tool prints when an allocation fails under the address-space limit instead of crashing
ALLOCATION_FAILURES = (
    "Cannot allocate memory",
    "Resource temporarily unavailable",
    "Out of memory",
    "MemoryError",  # a Python child (the decompressor, the guest probe)
)


@dataclass(frozen=True)
class Policy:
    """The limits of one confined run; the rest of the policy is the same for every tool."""

    #: the tool, for messages (``qemu-img info``)
    tool: str
    cpu_seconds: int
    address_space: int
    #: wall-clock limit; None: none (the caller's cancel and the step's timeout bound it)
    wall_seconds: float | None
    #: bytes of output (stdout and stderr together) :func:`run` collects before it kills the tool; None:
    #: no cap (a tool whose output the formats bound)
    max_output: int | None = None

    def describe(self) -> str:
        cap = f", {_size_text(self.max_output)} of output" if self.max_output is not None else ""
        return f"limits: {self.cpu_seconds} CPU seconds, {self.address_space >> 20} MiB address space{cap}"


def _size_text(size: int) -> str:
    """``64 MiB``, ``256 KiB`` or ``1000 bytes``: a cap as it was configured (not rounded down to 0 MiB)."""
    for shift, unit in ((20, "MiB"), (10, "KiB")):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


def _wall(cpu_seconds: int) -> float:
    return float(max(_MIN_WALL_SECONDS, _WALL_PER_CPU_SECOND * cpu_seconds))


def qemu_img_info(limits: Limits) -> Policy:
    cpu = limits.qemu_img_info_cpu_seconds
    return Policy("qemu-img info", cpu, limits.qemu_img_address_space, _wall(cpu), limits.qemu_img_output)


def qemu_img_check(limits: Limits) -> Policy:
    """Its output is capped: it prints a line per damaged cluster, so much as the image is large."""
    cpu = limits.qemu_img_check_cpu_seconds
    return Policy("qemu-img check", cpu, limits.qemu_img_address_space, _wall(cpu), limits.qemu_img_output)


def qemu_img_convert(limits: Limits, virtual_size: int) -> Policy:
    """CPU: a base plus so much per started GiB of virtual size; no wall-clock limit (I/O caps may make a
    genuine conversion slow; cancel and the step timeout stop it)."""
    gib = math.ceil(max(0, virtual_size) / GiB)
    cpu = limits.qemu_img_convert_cpu_seconds + limits.qemu_img_convert_cpu_seconds_per_gib * gib
    return Policy("qemu-img convert", cpu, limits.qemu_img_convert_address_space, None)


def decompressor(limits: Limits, max_bytes: int) -> Policy:
    """CPU: a base plus so much per started GiB of the output cap (decoding work follows the output)."""
    gib = math.ceil(max(0, max_bytes) / GiB)
    cpu = limits.decompress_cpu_seconds + limits.decompress_cpu_seconds_per_gib * gib
    return Policy("the decompressor", cpu, limits.decompress_address_space, None)


def guest_probe(limits: Limits, wall_seconds: float | None = None) -> Policy:
    cpu = limits.guest_probe_cpu_seconds
    wall = wall_seconds if wall_seconds is not None else _wall(cpu)
    return Policy("the guest reader", cpu, limits.guest_probe_address_space, wall)


# -------------------------------------------------------------------------------------- the launcher


def child_env() -> dict[str, str]:
    """The complete environment of a confined child: C locale, a minimal ``PATH``, two malloc arenas."""
    return {"LC_ALL": "C", "LANG": "C", "PATH": MINIMAL_PATH, "MALLOC_ARENA_MAX": MALLOC_ARENA_MAX}


def which(name: str) -> str:
    """``name`` resolved on the caller's ``PATH`` (operators and tests choose the binaries; the child gets
    an absolute path and never searches), or a ``MissingTool`` error."""
    found = shutil.which(name)
    if found is None:
        raise ImagingError(
            f"{name} not found on PATH; install it (Debian: qemu-utils for qemu-img, util-linux for "
            "setpriv, unshare and prlimit)",
            code="MissingTool",
        )
    return found


@dataclass(frozen=True)
class Isolation:
    """How confined children are kept off the network here."""

    #: the ``unshare`` options that give a child a private network namespace; () when none works
    unshare: tuple[str, ...]
    #: why there is no private network namespace (None when there is one)
    reason: str | None = None

    @property
    def network(self) -> str | None:
        """``user+net``, ``net`` or None (the caller's network)."""
        if not self.unshare:
            return None
        return "user+net" if "--user" in self.unshare else "net"

    def to_dict(self) -> dict[str, str | None]:
        return {"network": self.network, "reason": self.reason}


def _try_unshare(options: tuple[str, ...]) -> str | None:
    """None when ``unshare OPTIONS -- true`` works here, else what it said."""
    try:
        res = subprocess.run(
            [which(UNSHARE), *options, "--", which("true")],
            capture_output=True,
            text=True,
            timeout=30,
            env=child_env(),
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError, ImagingError) as exc:
        return str(exc)
    if res.returncode == 0:
        return None
    return res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit status {res.returncode}"


@functools.cache
def isolation() -> Isolation:
    """Probe once per process which network isolation works for this user on this kernel.

    A new user namespace with a new network namespace needs no privilege on kernels that allow
    unprivileged user namespaces (Debian's do) and leaves the child without any capability; a root caller
    on a kernel that forbids them still gets a network namespace of its own.
    """
    error = _try_unshare(("--user", "--net"))
    if error is None:
        return Isolation(("--user", "--net"))
    if os.geteuid() == 0 and _try_unshare(("--net",)) is None:
        return Isolation(("--net",))
    return Isolation(
        (),
        f"no private network namespace for untrusted-input parsers: unshare --user --net fails ({error}); "
        "allow unprivileged user namespaces (sysctl user.max_user_namespaces > 0) or run the worker as root",
    )


def command(argv: list[str], policy: Policy) -> list[str]:
    """``argv`` behind the launcher chain that applies ``policy`` (see the module docstring)."""
    cmd = [which(SETPRIV), "--pdeathsig", "KILL", "--no-new-privs", "--"]
    net = isolation().unshare
    if net:
        cmd += [which(UNSHARE), *net, "--"]
    cmd += [which(PRLIMIT), "--core=0", f"--cpu={policy.cpu_seconds}", f"--as={policy.address_space}"]
    return [*cmd, "--", *argv]


def spawn(
    argv: list[str],
    policy: Policy,
    *,
    cwd: Path,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.PIPE,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` confined by ``policy`` in ``cwd`` (a private directory); returns its Popen.

    ``stdin``/``stdout``/``stderr`` are what :class:`subprocess.Popen` takes (a descriptor, PIPE,
    DEVNULL); nothing else is inherited. ``new_session`` puts it in a process group of its own.
    """
    return subprocess.Popen(
        command(argv, policy),
        cwd=cwd,
        env=child_env(),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        close_fds=True,
        start_new_session=new_session,
    )


@dataclass(frozen=True)
class Completed:
    """Outcome of one confined run."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    #: it printed more than the caller's ``max_output`` and was killed (the output is what came first)
    output_exceeded: bool = False


def run(argv: list[str], policy: Policy, *, cwd: Path, cancel: threading.Event | None = None) -> Completed:
    """Run ``argv`` confined by ``policy`` in ``cwd`` and collect its output (as text).

    Never raises for exit codes. Raises :class:`~appliance.errors.Cancelled` (after killing and reaping
    the process) when ``cancel`` is set. On expiry of the policy's wall-clock limit the process is killed
    and the result has ``timed_out=True``; past the policy's ``max_output``, ``output_exceeded=True``.
    """
    proc = subprocess.Popen(
        command(argv, policy),
        cwd=cwd,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        text=True,
        errors="replace",
    )
    return collect(proc, policy, cancel, max_output=policy.max_output)


def collect(
    proc: subprocess.Popen[Any],
    policy: Policy,
    cancel: threading.Event | None = None,
    *,
    input: bytes | None = None,
    max_output: int | None = None,
) -> Completed:
    """Wait for a confined process started with stdout and stderr on pipes (and stdin on a pipe when
    ``input`` is given: written to it, then closed) and collect its output as text.

    Never raises for exit codes. Raises :class:`~appliance.errors.Cancelled` (after killing and reaping
    the process) when ``cancel`` is set. On expiry of the policy's wall-clock limit, counted from this
    call, the process is killed and the result has ``timed_out=True``. With ``max_output`` (bytes of
    stdout and stderr together; not with ``input``) a process printing more is killed as soon as it
    does and the result has ``output_exceeded=True``: its output costs the caller at most that much
    memory. A kill takes the process's group when it leads one (:func:`spawn`'s ``new_session``).
    """
    deadline = None if policy.wall_seconds is None else time.monotonic() + policy.wall_seconds
    if max_output is not None:
        if input is not None:  # (a caller's mistake: the process it started is not left running)
            confinepipes.kill(proc)
            proc.communicate()
            raise UsageError("collect takes no input with an output cap")
        out, err, timed_out, exceeded = confinepipes.read_capped(
            proc, policy.tool, cancel, deadline, max_output
        )
        return Completed(
            proc.returncode, _text(out), _text(err), timed_out=timed_out, output_exceeded=exceeded
        )
    data = input
    try:
        while True:
            try:
                out, err = proc.communicate(data, timeout=confinepipes.POLL_SECONDS)
                return Completed(proc.returncode, _text(out), _text(err))
            except subprocess.TimeoutExpired:
                data = None  # communicate keeps writing what the first call was given
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"cancelled while running {policy.tool}") from None
                if deadline is not None and time.monotonic() > deadline:
                    confinepipes.kill(proc)
                    out, err = proc.communicate()
                    return Completed(proc.returncode, _text(out), _text(err), timed_out=True)
    finally:
        if proc.poll() is None:
            confinepipes.kill(proc)
            proc.communicate()


def _text(data: str | bytes | bytearray | None) -> str:
    """A pipe's output as text (a text-mode pipe's already is)."""
    if isinstance(data, bytes | bytearray):
        return data.decode("utf-8", "replace")
    return data or ""


def limit_hit(
    returncode: int, stderr: str, timed_out: bool = False, output_exceeded: bool = False
) -> str | None:
    """How a limit stopped a confined run (``killed by SIGXCPU``, ``out of memory: …``, ``did not finish
    in time``, ``printed more than its output cap``), or None when it ended on its own."""
    if output_exceeded:
        return "printed more than its output cap"
    if timed_out:
        return "did not finish in time"
    if returncode < 0:
        return f"was killed by {signal_name(-returncode)}"
    if any(marker in stderr for marker in ALLOCATION_FAILURES):
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        return f"ran out of memory ({lines[0][:200] if lines else 'allocation failed'})"
    return None


def signal_name(number: int) -> str:
    """``SIGXCPU`` for 24."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ------------------------------------------------------------------------------ private directories


@contextmanager
def private_dir(parent: Path | None = None, prefix: str = "confined.") -> Iterator[Path]:
    """A new empty directory (mode 0700) under ``parent`` (default: the system temporary directory),
    removed with whatever it holds on exit."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        directory.chmod(0o700)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def private_link(path: Path, parent: Path | None = None, prefix: str = "qemu-img.") -> Iterator[Path]:
    """An empty private directory holding only a link to ``path`` (a regular file); yields the link.

    The link is a hard link when ``parent`` is on the image's filesystem, else a symlink to the absolute
    path (qemu resolves relative names against the link's own directory either way, which we measured).
    """
    target = _regular_file(path)
    with private_dir(parent, prefix) as directory:
        yield link_into(directory, target)


def _regular_file(path: Path) -> Path:
    target = Path(path).resolve()
    if not target.is_file():
        raise UsageError(f"{path}: not a regular file")
    return target


def link_into(directory: Path, path: Path) -> Path:
    """A link named :data:`LINK_NAME` to ``path`` (a regular file) in ``directory`` (a private directory);
    a hard link when both are on one filesystem, else a symlink to the absolute path (see
    :func:`private_link`)."""
    target = _regular_file(path)
    link = directory / LINK_NAME
    try:
        os.link(target, link)
    except OSError:  # EXDEV across filesystems, EPERM under fs.protected_hardlinks
        link.symlink_to(target)
    return link
