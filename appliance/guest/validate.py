"""Static guest validation: run the reader in a confined child, then judge the request against it.

The reader runs under the confinement policy of :mod:`appliance.confine` (``limits.guest_probe_*``, no
network, no inherited descriptors, a parent-death signal, an empty private directory).

:func:`validate_image` never raises for a bad image: a disk the reader cannot open, a reader crash, a
CPU/memory limit or a timeout all become a ``Guest.Unreadable`` finding; an image that names another file
it needs (backing file, parent disk) becomes ``Guest.ExternalReference``, without that file being read.
It raises only for caller mistakes (:class:`~appliance.errors.UsageError`) and cancellation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import config as config_mod
from .. import confine
from ..confine import Completed, Policy
from ..errors import Cancelled, Finding, UsageError
from ..image.formats import guest_format
from .codes import finding, for_data_disk
from .piped import MAX_ANSWER, ProtocolError, serve
from .report import GuestReport

PLATFORMS = {"linux": "linux", "windows": "windows"}
ARCHITECTURES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "arm64": "arm64",
    "aarch64": "arm64",
    "i386": "i386",
    "i686": "i386",
    "x86": "i386",
}
# The child imports appliance from the same tree as the parent, whether installed or not; -I keeps the
# environment and the working directory (which holds the image link) out of its import path.
CHILD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from appliance.guest.probe import main; sys.exit(main())"
)
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
#: the most a probe reading a file may print, stdout and stderr together: the largest answer the piped
#: probe may send (:data:`.piped.MAX_ANSWER`) and a MiB of messages. A reader subverted by its disk could
#: otherwise print without end into the worker's memory; past this it is killed and the guest unreadable.
PROBE_OUTPUT = MAX_ANSWER + (1 << 20)


def probe_policy(limits: config_mod.Limits, wall_seconds: float | None = None) -> Policy:
    """The policy of a probe reading a file (:func:`validate_image`, :class:`.early.PendingProbe`):
    ``limits.guest_probe_*``, ``wall_seconds``, its output capped at :data:`PROBE_OUTPUT`."""
    return dataclasses.replace(confine.guest_probe(limits, wall_seconds), max_output=PROBE_OUTPUT)


@contextmanager
def _image_argument(path: Path, parent: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(argument for the child, its working directory): a link in an empty private directory for a file,
    the absolute device path (and an empty directory) for a block device. The directory is made in
    ``parent`` (default: the system's temporary directory)."""
    st = path.stat()
    if stat.S_ISBLK(st.st_mode):
        with confine.private_dir(parent, prefix="guest-probe.") as directory:
            yield str(path.resolve()), directory
    else:
        with confine.private_link(path, parent, prefix="guest-probe.") as link:
            yield link.name, link.parent


def _unreadable(detail: str) -> GuestReport:
    return GuestReport().with_findings(
        [
            finding(
                "Guest.Unreadable",
                f"the guest disk could not be read ({detail}): re-export it as a single self-contained image "
                "and check it with `qemu-img check`; for a genuinely huge guest raise limits.guest_probe_*",
            )
        ]
    )


def interpret(res: Completed, policy: Policy) -> GuestReport:
    """The report a probe run gave (its answer, or how it failed: a finding, never an exception)."""
    if res.timed_out:
        return _unreadable(f"the reader did not finish in time; {policy.describe()}")
    if res.output_exceeded:
        return _unreadable(f"the reader printed more than its output cap; {policy.describe()}")
    if res.returncode < 0:
        name = confine.signal_name(-res.returncode)
        return _unreadable(f"the reader was killed by {name}; {policy.describe()}")
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if res.returncode != 0 or not isinstance(answer, dict):
        err = [ln for ln in res.stderr.splitlines() if ln.strip()]
        return _unreadable(f"the reader failed: {err[-1][:300] if err else f'exit status {res.returncode}'}")
    if answer.get("code") == "Guest.ExternalReference":
        return GuestReport().with_findings(
            [
                finding(
                    "Guest.ExternalReference",
                    f"{str(answer.get('error'))[:500]}: the other file was not read; flatten the image into "
                    "one self-contained file (e.g. `qemu-img convert` of the child) and upload that",
                )
            ]
        )
    if "error" in answer:
        return _unreadable(str(answer["error"])[:500])
    return GuestReport.from_dict(answer.get("report") or {})


def validate_image(
    path: str | Path,
    fmt: str = "raw",
    *,
    bootable: bool = True,
    config: config_mod.Config | None = None,
    cancel: threading.Event | None = None,
    wall_seconds: float | None = None,
    workdir: Path | None = None,
) -> GuestReport:
    """Read the guest in ``path`` (a file or block device in format ``fmt``) without mounting or trusting it.

    ``fmt`` is the format the image is known to have (e.g. what :func:`appliance.image.inspect.inspect_image`
    found), under any of its names (:func:`appliance.image.formats.guest_format`): it is not checked against
    the content here, so an unverified claim must be inspected first. ``bootable=False`` (data disks:
    ImportSnapshot/ImportVolume) turns boot findings into info. The reader runs under
    ``config.limits.guest_probe_*`` and ``wall_seconds`` (default: 4 times the CPU limit, ≥ 60 s),
    in a private directory made in ``workdir`` (a task's scratch, which goes with the task even when its
    process is killed; default: the system's temporary directory).
    """
    reader_format = guest_format(fmt)
    src = Path(path)
    if not src.exists():
        raise UsageError(f"no such image: {src}")
    if reader_format is None:
        report = _unreadable(
            f"{fmt.strip().lower()} images are not read directly; validate the image after conversion to raw"
        )
    else:
        cfg = config if config is not None else config_mod.from_dict({})
        policy = probe_policy(cfg.limits, wall_seconds)
        with _image_argument(src, workdir) as (argument, private):
            res = confine.run(
                [sys.executable, "-I", "-c", CHILD, PACKAGE_PARENT, "--format", reader_format, argument],
                policy,
                cwd=private,
                cancel=cancel,
            )
        report = interpret(res, policy)
    if not bootable:
        report = report.with_findings([for_data_disk(f) for f in report.findings])
    return report


#: how often the parent looks at cancel and the wall clock while the piped probe runs
_POLL_SECONDS = 0.1
#: stderr kept of the piped probe
_STDERR_KEEP = 8192


def validate_ranges(
    read_at: Callable[[int, int], bytes],
    size: int,
    fmt: str = "raw",
    *,
    bootable: bool = True,
    config: config_mod.Config | None = None,
    cancel: threading.Event | None = None,
    wall_seconds: float | None = None,
    workdir: Path | None = None,
) -> GuestReport:
    """:func:`validate_image` of a disk that is not a local file: ``size`` bytes read with
    ``read_at(offset, length)`` (e.g. an S3 object, :class:`appliance.targets.s3read.ObjectRangeReader`).

    The probe child runs under the same policy (no network, the limits, an empty private directory in
    ``workdir``) and reads the disk over its stdin/stdout (:mod:`.piped`): this process answers each
    read, so nothing but disk bytes reaches the child. The report is interpreted as
    :func:`validate_image` does (a bad image is a finding, never an exception). Raises what ``read_at``
    raises (the child is killed first) and :class:`~appliance.errors.Cancelled`."""
    reader_format = guest_format(fmt)
    if reader_format is None:
        report = _unreadable(
            f"{fmt.strip().lower()} images are not read directly; validate the image after conversion to raw"
        )
    else:
        cfg = config if config is not None else config_mod.from_dict({})
        policy = confine.guest_probe(cfg.limits, wall_seconds)
        argv = [sys.executable, "-I", "-c", CHILD, PACKAGE_PARENT, "--format", reader_format]
        with confine.private_dir(workdir, prefix="guest-probe.") as private:
            res = _run_piped([*argv, "--piped", str(size)], policy, private, size, read_at, cancel)
        report = interpret(res, policy)
    if not bootable:
        report = report.with_findings([for_data_disk(f) for f in report.findings])
    return report


def _run_piped(
    argv: list[str],
    policy: Policy,
    cwd: Path,
    size: int,
    read_at: Callable[[int, int], bytes],
    cancel: threading.Event | None,
) -> Completed:
    """Run the piped probe, serving its reads in a thread; its answer as :func:`confine.run` would
    have collected it from a probe reading a file."""
    proc = confine.spawn(argv, policy, cwd=cwd, stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    outcome: dict[str, object] = {}
    errors = bytearray()

    def drain() -> None:
        while chunk := os.read(stderr.fileno(), 65536):
            errors.extend(chunk)
            del errors[:-_STDERR_KEEP]

    def answer_reads() -> None:
        try:
            outcome["answer"] = serve(stdout.fileno(), stdin.fileno(), size, read_at)
        except ProtocolError as exc:
            outcome["protocol"] = str(exc)
        except BaseException as exc:  # a failure to read the disk: the caller's, not the image's
            outcome["failure"] = exc
        finally:
            if "answer" not in outcome and proc.poll() is None:
                proc.kill()

    threads = [
        threading.Thread(target=drain, name="guest-probe-stderr", daemon=True),
        threading.Thread(target=answer_reads, name="guest-probe-reads", daemon=True),
    ]
    for t in threads:
        t.start()
    deadline = None if policy.wall_seconds is None else time.monotonic() + policy.wall_seconds
    timed_out = False
    try:
        while threads[1].is_alive():
            threads[1].join(_POLL_SECONDS)
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled while running {policy.tool}")
            if deadline is not None and time.monotonic() > deadline and threads[1].is_alive():
                timed_out = True
                proc.kill()
                threads[1].join()
        proc.wait()
        threads[0].join()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in threads:
            t.join()
        for pipe in (stdin, stdout, stderr):
            with contextlib.suppress(OSError):
                pipe.close()
    failure = outcome.get("failure")
    if isinstance(failure, BaseException):
        raise failure
    answer = outcome.get("answer")
    text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else ""
    err = errors.decode("utf-8", "replace")
    if "protocol" in outcome:
        err += f"\nthe reader broke the read protocol: {outcome['protocol']}"
    return Completed(proc.returncode, text, err, timed_out=timed_out)


def normalize_architecture(name: str) -> str:
    """``amd64``/``x64`` → ``x86_64``, ``aarch64`` → ``arm64``, ``i686``/``x86`` → ``i386``."""
    arch = ARCHITECTURES.get(name.strip().lower())
    if arch is None:
        raise UsageError(f"unknown architecture {name!r}; use one of x86_64, arm64, i386")
    return arch


#: the boot modes a disk's ``boot_mode`` (guest/analyze.py) allows, by the BootMode asked for
_BOOTS_IN = {"uefi": ("uefi", "bios+uefi"), "legacy-bios": ("bios", "bios+uefi")}


def _boot_mode_mismatch(report: GuestReport, boot_mode: str | None) -> list[Finding]:
    wanted = (boot_mode or "").strip().lower()
    if wanted not in _BOOTS_IN or report.boot_mode is None or report.boot_mode in _BOOTS_IN[wanted]:
        return []
    has = {"bios": "BIOS boot code only", "uefi": "a UEFI loader only"}.get(
        report.boot_mode, report.boot_mode
    )
    return [
        finding(
            "Guest.BootModeMismatch",
            f"the import asks for boot mode {wanted} but the boot disk has {has}: import it as "
            f"{'legacy-bios' if wanted == 'uefi' else 'uefi'} (or without a boot mode), or install the "
            "missing bootloader",
        )
    ]


def check_request(
    report: GuestReport,
    platform: str | None = None,
    architecture: str | None = None,
    *,
    virtualization_type: str | None = None,
    kernel_id: str | None = None,
    boot_mode: str | None = None,
) -> list[Finding]:
    """Findings where the request disagrees with the guest.

    ``boot_mode`` (``uefi`` or ``legacy-bios``: the request's BootMode, or an OVA's firmware) that the
    disk cannot boot in is ``Guest.BootModeMismatch``, an error as in AWS, whose import of a VM in a
    boot mode its disk does not support fails; a disk whose boot mode is unknown (no partition table)
    is not judged here (``Guest.NotBootable`` and friends speak for it).

    ``Guest.PlatformMismatch`` / ``Guest.ArchitectureMismatch``; for the Eucalyptus-style boot
    parameters: a partition image imported as ``hvm`` (``Guest.PartitionImageNeedsKernel``) and a
    kernel given for an image without a root filesystem (``Guest.NoRootFilesystem``). Nothing is
    said about what was not found (``Guest.OsUnknown`` already covers that).
    """
    out: list[Finding] = []
    paravirtual = bool(kernel_id) or (virtualization_type or "").lower() == "paravirtual"
    if report.layout == "partition" and (virtualization_type or "").lower() == "hvm":
        out.append(
            finding(
                "Guest.PartitionImageNeedsKernel",
                "the image is a bare filesystem (no partition table, no bootloader) but the request asks "
                "for hvm: import it as paravirtual with a KernelId, or import the whole disk",
            )
        )
    if paravirtual and report.root is None:
        out.append(
            finding(
                "Guest.NoRootFilesystem",
                "a kernel was given for paravirtual boot but no root filesystem was found on the image: "
                "import the partition that holds the guest's root filesystem",
            )
        )
    family = report.os.get("family")
    if platform:
        wanted = PLATFORMS.get(platform.strip().lower())
        if wanted is None:
            raise UsageError(f"unknown platform {platform!r}; use Linux or Windows")
        if family and family != wanted:
            found = report.os.get("pretty_name") or family.capitalize()
            out.append(
                finding(
                    "Guest.PlatformMismatch",
                    f"the request says Platform {platform} but the disk holds {found}: correct the Platform "
                    "parameter or import the intended disk",
                )
            )
    out += _boot_mode_mismatch(report, boot_mode)
    found_arch = report.os.get("architecture")
    if architecture:
        wanted_arch = normalize_architecture(architecture)
        if found_arch and found_arch != wanted_arch:
            out.append(
                finding(
                    "Guest.ArchitectureMismatch",
                    f"the request says architecture {architecture}, the guest's programs are {found_arch}: "
                    "correct the architecture parameter or import the intended disk",
                )
            )
    return out
