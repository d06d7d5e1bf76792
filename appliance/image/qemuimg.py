"""Running ``qemu-img`` on untrusted images: minimal environment, resource limits, an empty private directory.

Every call here follows the same rules (those of OpenStack Nova and Glance, with their known gaps closed):

* the format is always passed with ``-f`` (qemu-img never probes; CVE-2026-24708);
* the process runs under ``prlimit`` (CPU seconds and address space from ``config.limits``, no core dumps) so
  a crafted image cannot exhaust the host; a process killed by a limit becomes ``UnsafeImage.ResourceLimit``;
* the environment is ``LC_ALL=C LANG=C`` with a minimal ``PATH`` (stable, parseable messages);
* the working directory is an EMPTY private directory (mode 0700) that holds only a link to the image, so any
  relative backing-file or extent name inside the image resolves into that empty directory.

Why the ``prlimit`` binary rather than ``resource.setrlimit`` in ``preexec_fn``: ``preexec_fn`` is documented
as unsafe when the parent has threads (the workflow engine runs steps in threads) and cannot be used with
``subprocess`` in sub-interpreters. ``prlimit`` (util-linux, already a system dependency) sets the limits and
then ``exec``s qemu-img, so the limited process *is* qemu-img (same pid, which ``Popen.kill`` reaches) and
its exit status shows the signal that killed it.

``info`` and ``check`` raise :class:`~appliance.errors.ImageRejected` for an image qemu-img cannot read, and
return their results otherwise; interpretation of the ``info`` JSON (backing files, create types, …) lives in
:mod:`appliance.image.inspect`.
"""

from __future__ import annotations

import functools
import json
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

from ..config import Limits
from ..errors import Cancelled, Finding, ImageRejected, ImagingError, UsageError

QEMU_IMG = "qemu-img"
PRLIMIT = "prlimit"
#: the only directories a limited child may search for helpers
MINIMAL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: qemu formats for which ``qemu-img check`` exists (raw and vpc have no metadata to check)
CHECKABLE_FORMATS = frozenset({"qcow2", "vmdk", "vhdx", "vdi", "qed"})
#: name of the image link inside the private directory; deliberately extension-less and colon-free
LINK_NAME = "image"

_POLL_SECONDS = 0.1
# A limited qemu-img can still hang in uninterruptible I/O without using CPU; wall time is bounded as well.
_MIN_WALL_SECONDS = 60
_WALL_PER_CPU_SECOND = 4
# qemu-img reports these when an allocation fails under the address-space limit instead of crashing.
_ALLOCATION_FAILURES = ("Cannot allocate memory", "Resource temporarily unavailable", "Out of memory")


def qemu_env() -> dict[str, str]:
    """The complete environment for a qemu-img child: C locale and a minimal ``PATH``, nothing inherited."""
    return {"LC_ALL": "C", "LANG": "C", "PATH": MINIMAL_PATH}


def _which(name: str) -> str:
    # Resolved against the caller's PATH (not the child's minimal one) so operators and tests can choose the
    # binary; the child then gets an absolute path and never searches.
    found = shutil.which(name)
    if found is None:
        raise ImagingError(
            f"{name} not found on PATH; install it (Debian: qemu-utils for qemu-img, util-linux for prlimit)",
            code="MissingTool",
        )
    return found


@functools.cache
def _version(path: str) -> str:
    """First line of ``qemu-img --version`` for the binary at ``path`` (run once per path and process)."""
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=10, check=True, env=qemu_env()
    )
    return out.stdout.splitlines()[0].strip() if out.stdout else ""


def availability() -> tuple[str | None, str | None, str | None]:
    """(path, version, problem) of the ``qemu-img`` on PATH: a problem says why conversions cannot run
    here. The lookup is repeated per call (a package may be installed meanwhile), the version run is
    cached per binary."""
    path = shutil.which("qemu-img")
    if path is None:
        return None, None, "qemu-img is not installed (install the qemu-utils package)"
    try:
        return path, _version(path), None
    except (OSError, subprocess.SubprocessError) as exc:
        return path, None, f"qemu-img at {path} does not run: {exc}"


def qemu_img_problem() -> str | None:
    """Why conversions cannot run here, or None when ``qemu-img`` is usable."""
    return availability()[2]


def limited_command(argv: list[str], cpu_seconds: int | None, address_space: int | None) -> list[str]:
    """``argv`` prefixed with ``prlimit`` so the command runs with the given limits and no core dumps.

    ``cpu_seconds`` sets RLIMIT_CPU (soft = hard, so the kernel sends SIGXCPU and the process dies);
    ``address_space`` sets RLIMIT_AS in bytes. ``None`` leaves that limit unset. ``prlimit`` execs the
    command, so the returned argv's process is the command itself.
    """
    cmd = [_which(PRLIMIT), "--core=0"]
    if cpu_seconds is not None:
        cmd.append(f"--cpu={int(cpu_seconds)}")
    if address_space is not None:
        cmd.append(f"--as={int(address_space)}")
    return [*cmd, "--", *argv]


@contextmanager
def isolated(path: Path, parent: Path | None = None) -> Iterator[Path]:
    """An empty private directory (mode 0700) holding only a link to ``path``; yields the link.

    The directory is removed on exit. The link is a hard link when ``parent`` is on the image's filesystem,
    else a symlink to the absolute path (qemu resolves relative names against the link's own directory either
    way, which we measured). ``parent`` defaults to the system temporary directory.
    """
    target = Path(path).resolve()
    if not target.is_file():
        raise UsageError(f"{path}: not a regular file")
    directory = Path(tempfile.mkdtemp(prefix="qemu-img.", dir=parent))
    try:
        directory.chmod(0o700)
        link = directory / LINK_NAME
        try:
            os.link(target, link)
        except OSError:  # EXDEV across filesystems, EPERM under fs.protected_hardlinks
            link.symlink_to(target)
        yield link
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class Completed:
    """Outcome of one limited qemu-img run."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


def run_limited(
    argv: list[str],
    *,
    cpu_seconds: int | None,
    address_space: int | None,
    cwd: Path,
    cancel: threading.Event | None = None,
    wall_seconds: float | None = None,
) -> Completed:
    """Run ``argv`` under :func:`limited_command` in ``cwd`` with :func:`qemu_env`.

    Never raises for exit codes. Raises :class:`~appliance.errors.Cancelled` (after killing and reaping the
    process) when ``cancel`` is set. ``wall_seconds`` defaults to a multiple of ``cpu_seconds``; on expiry
    the process is killed and the result has ``timed_out=True``.
    """
    if wall_seconds is None:
        wall_seconds = max(_MIN_WALL_SECONDS, _WALL_PER_CPU_SECOND * (cpu_seconds or 0))
    proc = subprocess.Popen(
        limited_command(argv, cpu_seconds, address_space),
        cwd=cwd,
        env=qemu_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    deadline = time.monotonic() + wall_seconds
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=_POLL_SECONDS)
                return Completed(proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"cancelled while running {Path(argv[0]).name} {argv[1]}") from None
                if time.monotonic() > deadline:
                    proc.kill()
                    out, err = proc.communicate()
                    return Completed(proc.returncode, out, err, timed_out=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _first_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _limit_finding(res: Completed, action: str, cpu_seconds: int, address_space: int) -> Finding | None:
    """``UnsafeImage.ResourceLimit`` when the run was killed by a limit (or timed out), else ``None``."""
    limits = f"limits: {cpu_seconds} CPU seconds, {address_space // (1 << 20)} MiB address space"
    advice = (
        "a small image that needs this much is crafted to exhaust the host; for a genuine large image raise "
        "limits.qemu_img_* in the configuration"
    )
    if res.timed_out:
        return Finding.error(
            "UnsafeImage.ResourceLimit",
            f"qemu-img {action} did not finish in time ({limits}); {advice}",
        )
    if res.returncode < 0:
        try:
            name = signal.Signals(-res.returncode).name
        except ValueError:
            name = f"signal {-res.returncode}"
        return Finding.error(
            "UnsafeImage.ResourceLimit",
            f"qemu-img {action} was killed by {name} while reading the image ({limits}); {advice}",
        )
    if any(marker in res.stderr for marker in _ALLOCATION_FAILURES):
        return Finding.error(
            "UnsafeImage.ResourceLimit",
            f"qemu-img {action} ran out of memory ({limits}): {_first_line(res.stderr)}; {advice}",
        )
    return None


def info(
    path: Path,
    fmt: str,
    limits: Limits,
    *,
    workdir: Path | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """``qemu-img info -f <fmt> --force-share --output=json`` under limits, in an isolated directory.

    ``fmt`` is qemu's format name (``vpc`` not ``vhd``). The private directory is created under ``workdir``
    (default: the system temporary directory). Returns the parsed JSON. Raises ImageRejected with
    ``UnsafeImage.ResourceLimit`` when a limit killed qemu-img, and ``CorruptImage`` when qemu-img fails,
    writes anything to stderr, or prints something that is not a JSON object.
    """
    with isolated(path, workdir) as link:
        res = run_limited(
            [_which(QEMU_IMG), "info", "-f", fmt, "--force-share", "--output=json", link.name],
            cpu_seconds=limits.qemu_img_info_cpu_seconds,
            address_space=limits.qemu_img_address_space,
            cwd=link.parent,
            cancel=cancel,
        )
    killed = _limit_finding(res, "info", limits.qemu_img_info_cpu_seconds, limits.qemu_img_address_space)
    if killed:
        raise ImageRejected([killed])
    if res.returncode != 0 or res.stderr.strip():
        raise ImageRejected(
            [
                Finding.error(
                    "CorruptImage",
                    f"qemu-img cannot read the image as {fmt}: {_first_line(res.stderr) or 'no message'}; "
                    "the file is damaged, incomplete or refers to other files; re-export it as a single "
                    "self-contained image",
                )
            ]
        )
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ImageRejected(
            [Finding.error("CorruptImage", f"qemu-img info printed no usable JSON for this {fmt} image")]
        )
    return data


def check(
    path: Path,
    fmt: str,
    limits: Limits,
    *,
    workdir: Path | None = None,
    cancel: threading.Event | None = None,
) -> list[Finding]:
    """Integrity check with ``qemu-img check -f <fmt> --force-share --output=json`` under limits, isolated.

    Formats without a checker (raw, vpc, …) return ``[]`` without running anything. Leaked clusters only give
    a ``Integrity.LeakedClusters`` warning (wasted space; a conversion drops them). Corruption, an incomplete
    check, or stderr output on success raise ImageRejected(``CorruptImage``); a limit kill raises
    ``UnsafeImage.ResourceLimit``.
    """
    if fmt not in CHECKABLE_FORMATS:
        return []
    with isolated(path, workdir) as link:
        res = run_limited(
            [_which(QEMU_IMG), "check", "-f", fmt, "--force-share", "--output=json", link.name],
            cpu_seconds=limits.qemu_img_check_cpu_seconds,
            address_space=limits.qemu_img_address_space,
            cwd=link.parent,
            cancel=cancel,
        )
    killed = _limit_finding(res, "check", limits.qemu_img_check_cpu_seconds, limits.qemu_img_address_space)
    if killed:
        raise ImageRejected([killed])
    try:
        report = json.loads(res.stdout) if res.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    if not isinstance(report, dict):
        report = {}
    # Exit codes (qemu-img(1)): 0 clean, 1 check not completed, 2 corruptions, 3 leaks only, 63 unsupported.
    if res.returncode == 0 and not res.stderr.strip():
        return []
    if res.returncode == 3:
        leaks = report.get("leaks", "some")
        return [
            Finding.warning(
                "Integrity.LeakedClusters",
                f"{leaks} leaked cluster(s): allocated but unused space; harmless, the conversion drops them",
            )
        ]
    if res.returncode == 63:
        return [Finding.info("Integrity.NotChecked", f"qemu-img cannot check {fmt} images")]
    if res.returncode == 2:
        what = f"{report.get('corruptions', 'some')} corruption(s)"
    elif res.returncode == 1:
        what = "the check could not complete"
    elif res.returncode == 0:
        what = "it reported problems"
    else:
        what = f"unexpected result (exit status {res.returncode})"
    detail = _first_line(res.stderr)
    raise ImageRejected(
        [
            Finding.error(
                "CorruptImage",
                f"qemu-img check found the {fmt} image damaged: {what}"
                + (f": {detail}" if detail else "")
                + "; the file is truncated or corrupt, upload it again or repair it at the source",
            )
        ]
    )
