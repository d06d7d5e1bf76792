"""Running ``qemu-img`` on untrusted images: confined, with ``-f``, in an empty private directory.

Every call here follows the same rules (those of OpenStack Nova and Glance, with their known gaps closed):

* the format is always passed with ``-f`` (qemu-img never probes; CVE-2026-24708);
* the process runs under the confinement policy of :mod:`appliance.confine` (CPU seconds and address
  space from ``config.limits``, no core dumps, no network, no inherited descriptors, a parent-death
  signal, a minimal environment); a process stopped by a limit becomes ``UnsafeImage.ResourceLimit``;
* the working directory is an EMPTY private directory (mode 0700) that holds only a link to the image, so any
  relative backing-file or extent name inside the image resolves into that empty directory.

``info`` and ``check`` raise :class:`~appliance.errors.ImageRejected` for an image qemu-img cannot read, and
return their results otherwise; interpretation of the ``info`` JSON (backing files, create types, …) lives in
:mod:`appliance.image.inspect`.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import confine
from ..config import Limits
from ..confine import Completed, Policy
from ..errors import Finding, ImageRejected

QEMU_IMG = "qemu-img"
#: qemu formats for which ``qemu-img check`` exists (raw and vpc have no metadata to check)
CHECKABLE_FORMATS = frozenset({"qcow2", "vmdk", "vhdx", "vdi", "qed"})
#: name of the image link inside the private directory; deliberately extension-less and colon-free
LINK_NAME = confine.LINK_NAME


def qemu_img() -> str:
    """The qemu-img binary, resolved on the caller's ``PATH``, or a ``MissingTool`` error."""
    return confine.which(QEMU_IMG)


@functools.cache
def _version(path: str) -> str:
    """First line of ``qemu-img --version`` for the binary at ``path`` (run once per path and process)."""
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=10, check=True, env=confine.child_env()
    )
    return out.stdout.splitlines()[0].strip() if out.stdout else ""


def availability() -> tuple[str | None, str | None, str | None]:
    """(path, version, problem) of the ``qemu-img`` on PATH: a problem says why conversions cannot run
    here. The lookup is repeated per call (a package may be installed meanwhile), the version run is
    cached per binary."""
    path = shutil.which(QEMU_IMG)
    if path is None:
        return None, None, "qemu-img is not installed (install the qemu-utils package)"
    try:
        return path, _version(path), None
    except (OSError, subprocess.SubprocessError) as exc:
        return path, None, f"qemu-img at {path} does not run: {exc}"


def qemu_img_problem() -> str | None:
    """Why conversions cannot run here, or None when ``qemu-img`` is usable."""
    return availability()[2]


@contextmanager
def isolated(path: Path, parent: Path | None = None) -> Iterator[Path]:
    """An empty private directory (mode 0700) holding only a link to ``path``; yields the link.

    See :func:`appliance.confine.private_link`; ``parent`` defaults to the system temporary directory.
    """
    with confine.private_link(path, parent) as link:
        yield link


def _first_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def limit_finding(res: Completed, policy: Policy) -> Finding | None:
    """``UnsafeImage.ResourceLimit`` when a limit stopped the run (or it timed out), else ``None``."""
    hit = confine.limit_hit(res.returncode, res.stderr, res.timed_out, res.output_exceeded)
    if hit is None:
        return None
    return Finding.error(
        "UnsafeImage.ResourceLimit",
        f"{policy.tool} {hit} while reading the image ({policy.describe()}); a small image that needs this "
        "much is crafted to exhaust the host; for a genuine large image raise limits.qemu_img_* in the "
        "configuration",
    )


def _json_command(
    command: str, path: Path, fmt: str, policy: Policy, workdir: Path | None, cancel: threading.Event | None
) -> Completed:
    """``qemu-img <command> -f <fmt> --force-share --output=json`` of ``path`` under ``policy``, in a
    private directory under ``workdir``; ``UnsafeImage.ResourceLimit`` when a limit stopped it."""
    with isolated(path, workdir) as link:
        res = confine.run(
            [qemu_img(), command, "-f", fmt, "--force-share", "--output=json", link.name],
            policy,
            cwd=link.parent,
            cancel=cancel,
        )
    killed = limit_finding(res, policy)
    if killed:
        raise ImageRejected([killed])
    return res


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
    res = _json_command("info", path, fmt, confine.qemu_img_info(limits), workdir, cancel)
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
    res = _json_command("check", path, fmt, confine.qemu_img_check(limits), workdir, cancel)
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
