"""What an inspection concludes: the verdicts (a whole image's, a download's preflight) and the coded
findings the stages record in them, with the advice each gives."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import Cancelled, Finding, Severity
from .formats import (
    COMPRESSION_SUFFIXES,
)

_FLATTEN = "flatten it into a standalone image with `qemu-img convert` first"
VMDK_EXPORT = (
    "export the disk as a single-file VMDK (`qemu-img convert -O vmdk -o subformat=streamOptimized`, or "
    "'Export OVF' in VMware) and upload that"
)


@dataclass(kw_only=True)
class Verdict:
    """What the content checks found out about an image: its format, size and findings.

    ``format`` is the user-facing name (raw, qcow2, vmdk, vhd, vhdx, iso, vdi, …) or ``None`` when
    undetermined; ``qemu_format`` the name to pass to ``qemu-img -f`` (``vpc`` for vhd, ``raw`` for iso).
    """

    format: str | None = None
    qemu_format: str | None = None
    virtual_size: int | None = None
    compression: str | None = None
    findings: list[Finding] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def safe(self) -> bool:
        """True when no finding has error severity."""
        return not any(f.severity is Severity.ERROR for f in self.findings)

    @property
    def errors(self) -> list[Finding]:
        """The error findings, in the order they were found."""
        return [f for f in self.findings if f.severity is Severity.ERROR]

    def add(self, finding: Finding) -> None:
        """Record ``finding`` unless its code is already recorded (stages overlap on purpose)."""
        if all(f.code != finding.code for f in self.findings):
            self.findings.append(finding)


@dataclass(kw_only=True)
class InspectionResult(Verdict):
    """What inspection found out about one image file.

    ``path`` is the file actually inspected (the decompressed copy for a compressed input; it is removed again
    and ``path`` reset to ``source`` when the image is unsafe). ``actual_size`` is the allocated size on disk
    of ``path``.
    """

    path: Path
    source: Path
    actual_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for the CLI, the API and task records."""
        return {
            "path": str(self.path),
            "source": str(self.source),
            "format": self.format,
            "qemu_format": self.qemu_format,
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "compression": self.compression,
            "safe": self.safe,
            "findings": [f.to_dict() for f in self.findings],
            "details": self.details,
        }


@dataclass(kw_only=True)
class Preflight(Verdict):
    """What :func:`preflight` decided from an image's first bytes (and last bytes).

    ``pending`` names what the given bytes could not decide: ``footer`` (a VMDK stream's footer at the
    end of the file; the streaming decoder checks it when it gets there), ``tail`` (the last 512 bytes,
    where a fixed VHD keeps its footer: a RAW stream is checked for one when it ends), ``content``
    (regions beyond the head: only a full inspection of the whole file decides). ``complete`` is true
    when nothing is pending. ``compression`` set and ``format`` None: the head is compressed, and the
    decompressed head decides the rest (preflight it again, with the claim's inner format).
    """

    pending: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.pending

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (task records, checkpoints)."""
        return {
            "format": self.format,
            "qemu_format": self.qemu_format,
            "virtual_size": self.virtual_size,
            "compression": self.compression,
            "safe": self.safe,
            "pending": list(self.pending),
            "findings": [f.to_dict() for f in self.findings],
            "details": self.details,
        }


def compression_mismatch(claimed: str, claimed_fmt: str | None, compression: str | None) -> Finding:
    detected = f"{compression}-compressed" if compression else "no compression"
    return Finding.error(
        "FormatMismatch",
        f"claimed {claimed}, detected {detected}; give the format that matches the file "
        f"(e.g. {claimed_fmt}{COMPRESSION_SUFFIXES[compression] if compression else ''})",
    )


def backing_finding(what: str) -> Finding:
    return Finding.error(
        "UnsafeImage.BackingFile",
        f"the image is not self-contained: {what}, which would be read from this host; {_FLATTEN}",
    )


def data_file_finding() -> Finding:
    return Finding.error(
        "UnsafeImage.DataFile",
        "the qcow2 image keeps its data in an external data file, which would be read from this host; "
        "convert it into a self-contained image with `qemu-img convert -O qcow2` first",
    )


def create_type_finding(create_type: str | None, config: Config) -> Finding:
    allowed = ", ".join(config.safety.vmdk_allowed_types) or "none"
    what = f"VMDK subformat {create_type!r}" if create_type else "this VMDK subformat"
    return Finding.error(
        "UnsafeImage.VmdkCreateType", f"{what} is not accepted (allowed: {allowed}); {VMDK_EXPORT}"
    )


def banned_finding(fmt: str) -> Finding:
    return Finding.error(
        "UnsafeImage.BannedFormat",
        f"{fmt} images are not accepted; convert it to qcow2 or raw with `qemu-img convert` and upload that",
    )


def size_finding(size: int, config: Config) -> Finding:
    limit = config.limits.max_virtual_size
    return Finding.error(
        "SizeLimitExceeded",
        f"the virtual disk size {size} bytes ({size / 2**30:.1f} GiB) exceeds the limit of {limit} bytes "
        f"({limit / 2**30:.1f} GiB, limits.max_virtual_size); shrink the disk or ask for a higher limit",
    )


def unexpected_output(expected: str | None, detected: str) -> Finding:
    return Finding.error(
        "ConversionFailed.UnexpectedFormat",
        f"the conversion output should be {expected} but its content is detected as {detected}; the "
        "output is not used (a format hidden inside another is unsafe)",
    )


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("image inspection cancelled")
