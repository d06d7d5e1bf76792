"""Safe inspection of untrusted disk images: never run qemu-img on an unchecked file.

Stages, each of which must pass before the next runs (mirroring Nova's ``fetch_to_raw``):

1. **compression** — gzip/xz/zstd/bzip2 detected by magic are decompressed, capped and sparse, into the
   caller's work directory (:mod:`appliance.image.decompress`); a claim such as ``raw.gz`` must match
   the detected compression. A claim without a suffix accepts a compressed file (the inner format is
   what is checked).
2. **content inspector** — oslo.utils' ``format_inspector`` runs every format inspector over the file
   (``InspectWrapper``), so polyglots are seen; multiple matches are rejected except ISO+MBR under
   ``safety.iso_policy: allow-hybrid``; the inspector's ``safety_check()`` runs; then checks oslo.utils 10.2
   lacks: fixed VHDs (footer only) are recognised and verified, text-only VMDK descriptors are refused (the
   binary ``KDMV`` header is required), VMDK delta disks (``parentCID``/``parentFileNameHint``) and
   differencing VHDs are refused; the boot sector of a bare FAT/NTFS volume, which ends in ``55 AA``
   like an MBR, is not checked as a partition table (:mod:`appliance.image.bootsector`); the VMDK
   create type, banned formats, the ISO policy, the claim and the virtual size are checked.
3. **qemu-img info** under limits in an empty private directory (:mod:`appliance.image.qemuimg`),
   interpreted by :func:`assess_info` (backing file, data file, create type, extents, corrupt flag,
   size, format agreement).
4. **qemu-img check** for formats that have one (qcow2, vmdk, vhdx, vdi, qed): corruption rejects, leaks warn.

:func:`inspect_image` returns an :class:`InspectionResult` and never raises for an unsafe image; use
:func:`require_safe` to turn an unsafe result into :class:`~appliance.errors.ImageRejected`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oslo_utils.imageutils import format_inspector as fi

from ..config import Config
from ..errors import Cancelled, Finding, ImageRejected, Severity, UsageError
from ..partials import Ledger
from . import bootsector, qemuimg
from .decompress import decompress, detect_compression
from .detect import END_BYTES, Detector
from .formats import (
    COMPRESSION_SUFFIXES,
    SIGNATURE_BYTES,
    VHD_COOKIE,
    VMDK_MAGIC,
    check_output_format,
    compression_of,
    parse_claim,
    strip_compression_suffix,
    to_qemu,
)

_READ_CHUNK = 64 * 1024
_SECTOR = 512
_VHD_FIXED, _VHD_DYNAMIC, _VHD_DIFFERENCING = 2, 3, 4
_VMDK_NO_PARENT_CID = "ffffffff"
#: inspectors that read the virtual size from a header
_HEADER_SIZED = frozenset({"qcow2", "vhd", "vhdx", "vmdk", "vdi"})

_FLATTEN = "flatten it into a standalone image with `qemu-img convert` first"
_VMDK_EXPORT = (
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


# --------------------------------------------------------------------------------------------- public API


def inspect_image(
    path: Path,
    claimed: str | None = None,
    *,
    config: Config,
    workdir: Path | None = None,
    max_decompressed: int | None = None,
    reserve: Callable[[int, bool], None] | None = None,
    cancel: threading.Event | None = None,
    ledger: Ledger | None = None,
    decompress_to: Path | None = None,
    run_check: bool = True,
) -> InspectionResult:
    """Inspect ``path``, optionally claimed to be ``claimed`` (``qcow2``, ``raw.gz``, …), without trusting it.

    ``run_check=False`` stops before ``qemu-img check``: the caller runs :func:`check_image` on the
    result and must apply its findings before it trusts the image or anything made from it (a
    conversion runs it alongside qemu-img convert and publishes nothing unless it passes).

    A compressed input is decompressed into ``workdir`` (capped at ``max_decompressed``, default
    ``config.limits.max_decompressed_size``; ``reserve`` reserves scratch for it as it grows, see
    :func:`appliance.image.decompress.decompress`) as a partial output ``ledger`` is told about, renamed
    to ``decompress_to`` (default: a new name in ``workdir``) when complete; the decompressed file is
    kept only when the image is safe (it is then ``result.path`` and belongs to the caller). qemu-img's
    private directories are created under ``workdir`` too when given. Stops at the first stage with an
    error finding; qemu-img never runs when the content inspector rejected the file.

    Raises UsageError for an unknown claim, a missing file, or a compressed input without ``workdir``;
    Cancelled when ``cancel`` is set. Never raises for an unsafe image: the result carries error findings.
    """
    claimed_fmt, claimed_compression = parse_claim(claimed)
    source = Path(path)
    if not source.is_file():
        raise UsageError(f"{source}: no such image file")
    result = InspectionResult(path=source, source=source)
    compression = detect_compression(source)
    result.compression = compression
    if claimed_compression is not None and claimed_compression != compression:
        result.add(_compression_mismatch(claimed or "", claimed_fmt, compression))
        return _finish(result)
    if compression is None:
        _inspect_file(result, claimed_fmt, config=config, workdir=workdir, cancel=cancel, run_check=run_check)
        return _finish(result)

    if workdir is None or not Path(workdir).is_dir():
        raise UsageError(
            f"{source.name} is {compression}-compressed; a work directory to decompress into is needed"
        )
    limit = config.limits.max_decompressed_size if max_decompressed is None else max_decompressed
    target = decompress_to if decompress_to is not None else _fresh_path(Path(workdir), source)
    try:
        result.details["decompressed_size"] = decompress(
            source,
            target,
            compression,
            limit,
            reserve=reserve,
            cancel=cancel,
            ledger=ledger,
            limits=config.limits,
        )
    except ImageRejected as exc:
        result.findings.extend(exc.findings)
        return _finish(result)
    result.path = target
    try:
        _inspect_file(
            result, claimed_fmt, config=config, workdir=Path(workdir), cancel=cancel, run_check=run_check
        )
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if not result.safe:
        target.unlink(missing_ok=True)
        result.path = source
    return _finish(result)


#: how many leading bytes :func:`preflight` wants: within them every inspector has what it needs for a
#: streamable image (a VMDK's embedded descriptor, up to 1 MiB after its header; the VHDX header
#: region at 192-256 KiB; the ISO volume descriptor at 32 KiB)
PREFLIGHT_HEAD = 2 << 20
#: how many trailing bytes: a VMDK stream's footer marker, footer and end-of-stream marker (the last
#: 512 of them are where a fixed VHD keeps its footer)
PREFLIGHT_TAIL = END_BYTES


def preflight(
    head: bytes,
    tail: bytes | None = None,
    claimed: str | None = None,
    *,
    config: Config,
    size: int | None = None,
) -> Preflight:
    """The content checks of :func:`inspect_image` on an image's first bytes (``head``, ideally
    :data:`PREFLIGHT_HEAD` of them) and last bytes (``tail``, ideally :data:`PREFLIGHT_TAIL`; needs the
    image's ``size``), before the rest is downloaded: the format detected against the claim
    (compression included), polyglots, the ISO policy, the VMDK create type and descriptor, delta
    disks, differencing VHDs, banned formats and the virtual size. The same code as the file
    inspection decides, on the bytes given.

    What those bytes cannot decide is in ``pending`` (see :class:`Preflight`); qemu-img never runs
    here. A compressed head decides only the compression: preflight the decompressed head again with
    the claim's inner format. Never raises for an unsafe image; UsageError for an unknown claim or
    ``tail`` without ``size``.
    """
    claimed_fmt, claimed_compression = parse_claim(claimed)
    if tail is not None and size is None:
        raise UsageError("preflight needs the image size to place its last bytes")
    if size is not None and len(head) > size:
        raise UsageError(f"preflight got {len(head)} leading bytes of an image of {size}")
    result = Preflight()
    result.details["head_bytes"] = len(head)
    compression = compression_of(head[:SIGNATURE_BYTES])
    result.compression = compression
    if claimed_compression is not None and claimed_compression != compression:
        result.add(_compression_mismatch(claimed or "", claimed_fmt, compression))
        return result
    if compression is not None:
        result.pending.append("content")  # the decompressed head decides
        return result
    if tail is not None and size is not None and size - len(head) <= len(tail):
        head = head + tail[len(tail) - (size - len(head)) :]  # overlapping: the whole file
    whole = size is not None and len(head) >= size
    detector = Detector()
    detector.feed(head)
    ignore: frozenset[str] = frozenset()
    partial = False
    if detector.formats is None and not whole:
        if tail is not None and detector.waiting_for_end():
            detector.feed_tail(tail)
        elif detector.waiting_for_end():
            result.pending.append("footer")
            ignore = frozenset({"footer"})  # oslo's VMDK footer check: the decoder checks it at the end
        else:
            result.pending.append("content")
            partial = True
    if whole:
        footer: bytes | None = head[-_SECTOR:]
    else:
        footer = None if tail is None else tail[-_SECTOR:]
    view = _View(detector.finish(), head, footer, size)
    _content_stage(
        result, claimed_fmt, view, config=config, output=False, ignore_checks=ignore, partial=partial
    )
    if result.format == "raw" and footer is None:
        result.pending.append("tail")
    return result


def require_safe(result: InspectionResult) -> InspectionResult:
    """Return ``result`` if it is safe, else raise ImageRejected carrying all its findings (errors first)."""
    if not result.safe:
        ordered = result.errors + [f for f in result.findings if f.severity is not Severity.ERROR]
        raise ImageRejected(ordered)
    return result


def verify_output(path: Path, expected: str, *, config: Config) -> InspectionResult:
    """Re-inspect a conversion's output, which must be a safe image detected as ``expected``.

    Output whose content is detected as anything else (e.g. ``raw`` output that is really qcow2 or vmdk: a
    format hidden inside raw) gets ``ConversionFailed.UnexpectedFormat`` and qemu-img is not run on it; raw
    output is checked by its content alone (it has no metadata for qemu-img to read), other formats also
    by ``qemu-img info`` and ``check``. ISO
    content is accepted for raw output (qemu reads ISO as raw). Like :func:`inspect_image` this returns the
    result and does not raise for an unsafe output: pass it to :func:`require_safe`.
    """
    fmt = check_output_format(expected)
    target = Path(path)
    if not target.is_file():
        raise UsageError(f"{target}: conversion output does not exist")
    result = InspectionResult(path=target, source=target)
    if fmt == "raw":
        # Raw has no metadata: qemu-img info -f raw could only echo the file's size, and there is nothing
        # for check to walk. What can be wrong with raw output is its content (a format hidden in the
        # guest data), which the content stage finds.
        _content_stage(result, fmt, _View.of_file(target, None), config=config, output=True)
    else:
        _inspect_file(result, fmt, config=config, workdir=None, cancel=None, output=True)
    return _finish(result)


def assess_info(info: dict[str, Any], qemu_format: str, config: Config) -> list[Finding]:
    """Findings from ``qemu-img info`` JSON (as returned by :func:`appliance.image.qemuimg.info`).

    Checks that qemu-img read the format the inspector detected, and rejects backing files, qcow2 external
    data files, VMDK create types outside ``safety.vmdk_allowed_types``, VMDK extents other than the image
    itself, the qcow2 corrupt flag, encryption and virtual sizes above ``limits.max_virtual_size``.
    """
    findings: list[Finding] = []
    got = info.get("format")
    if got != qemu_format:
        findings.append(
            Finding.error(
                "FormatMismatch",
                f"qemu-img reads the image as {got} but its content was detected as {qemu_format}; "
                "the file is ambiguous and is not accepted",
            )
        )
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing or "backing-filename-format" in info:
        findings.append(_backing_finding(f"it has the backing file {str(backing)[:200]!r}"))
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        findings.append(_data_file_finding())
    if qemu_format == "qcow2" and data.get("corrupt"):
        findings.append(
            Finding.error(
                "CorruptImage",
                "the qcow2 image is marked corrupt by qemu; repair it at the source "
                "(`qemu-img check -r all`) and upload it again",
            )
        )
    if qemu_format == "vmdk":
        create_type = str(data.get("create-type", ""))
        if create_type not in config.safety.vmdk_allowed_types:
            findings.append(_create_type_finding(create_type, config))
        for extent in data.get("extents") or []:
            name = extent.get("filename") if isinstance(extent, dict) else None
            if name != qemuimg.LINK_NAME:
                findings.append(
                    Finding.error(
                        "UnsafeImage.VmdkDescriptor",
                        f"the VMDK refers to the separate extent file {str(name)[:200]!r}; {_VMDK_EXPORT}",
                    )
                )
                break
    if info.get("encrypted"):
        findings.append(
            Finding.error(
                "UnsupportedFormat",
                "the image is encrypted and cannot be converted; decrypt it (e.g. `qemu-img convert` "
                "with its secret) and upload the plain image",
            )
        )
    size = info.get("virtual-size")
    if isinstance(size, int) and size > config.limits.max_virtual_size:
        findings.append(_size_finding(size, config))
    return findings


# ----------------------------------------------------------------------------------------------- stages


def _inspect_file(
    result: InspectionResult,
    claimed: str | None,
    *,
    config: Config,
    workdir: Path | None,
    cancel: threading.Event | None,
    output: bool = False,
    run_check: bool = True,
) -> None:
    """Stages 2-5 on ``result.path`` (without ``qemu-img check`` unless ``run_check``); stops after the
    first stage that records an error."""
    path = result.path
    _check_cancel(cancel)
    _content_stage(result, claimed, _View.of_file(path, cancel), config=config, output=output)
    if not result.safe or result.qemu_format is None:
        return
    _check_cancel(cancel)
    try:
        info = qemuimg.info(path, result.qemu_format, config.limits, workdir=workdir, cancel=cancel)
    except ImageRejected as exc:
        result.findings.extend(exc.findings)
        return
    for finding in assess_info(info, result.qemu_format, config):
        result.add(finding)
    _record_info_details(result, info)
    if not result.safe or not run_check:
        return
    check_image(result, config=config, workdir=workdir, cancel=cancel)


def check_image(
    result: InspectionResult, *, config: Config, workdir: Path | None, cancel: threading.Event | None
) -> None:
    """The last stage: ``qemu-img check`` of an image that passed the others (where its format has a
    checker); its findings are added to ``result``."""
    if not result.safe or result.qemu_format is None:
        return
    _check_cancel(cancel)
    try:
        for finding in qemuimg.check(
            result.path, result.qemu_format, config.limits, workdir=workdir, cancel=cancel
        ):
            result.add(finding)
    except ImageRejected as exc:
        result.findings.extend(exc.findings)


def _content_stage(
    result: Verdict,
    claimed: str | None,
    view: _View,
    *,
    config: Config,
    output: bool,
    ignore_checks: frozenset[str] = frozenset(),
    partial: bool = False,
) -> None:
    """Stage 2 on what ``view`` holds of an image (a whole file, or a download's first and last bytes).

    ``ignore_checks`` names oslo safety checks left to a later stage (the footer of a VMDK stream whose
    end is not there yet); ``partial``: regions beyond the bytes in ``view`` are missing, so an inspector
    that could not see all it needs is undecided, not a truncated file."""
    inspectors = view.inspectors
    names = sorted(str(i) for i in inspectors)
    result.details["detected_formats"] = names
    chosen = _choose(inspectors, names, result, config)
    if chosen is None:
        if output:
            result.add(_unexpected_output(claimed, ",".join(names)))
        return
    name = str(chosen)
    if name == "luks":
        result.add(
            Finding.error(
                "UnsupportedFormat",
                "the image is a LUKS-encrypted container, which cannot be converted; decrypt it and "
                "upload the plain disk image",
            )
        )
        return
    # a bare FAT/NTFS volume's boot sector also ends in 55 AA: oslo's "gpt" match, but no partition table
    volume = bootsector.inspected_volume(chosen)
    if volume is not None:
        result.details["volume_boot_record"] = volume
    try:
        bootsector.safety_check(chosen)
    except fi.SafetyCheckFailed as exc:
        for check, failure in exc.failures.items():
            if check in ignore_checks:
                continue
            result.add(_safety_finding(name, check, failure, config, getattr(chosen, "vmdktype", None)))
    except fi.ImageFormatError as exc:
        if not (partial and not chosen.complete):  # partial: the rest of the file decides
            result.add(
                Finding.error(
                    "CorruptImage",
                    f"the {name} headers are incomplete or inconsistent ({exc}); the file is probably "
                    "truncated, upload it again",
                )
            )

    fmt = "raw" if name == "gpt" else name
    size: int | None = _inspector_size(chosen)
    if name == "gpt" and volume is None:
        result.details["partition_table"] = bootsector.classify(view.head[: bootsector.SECTOR]).table
    if fmt == "raw":
        footer = _read_vhd_footer(view.footer, view.size)
        if footer is not None and footer["problem"] is None:
            fmt = "vhd"
            size = footer["current_size"]
            result.details["vhd_subformat"] = "fixed"
        elif footer is not None:
            result.details["vhd_footer_problem"] = footer["problem"]
    elif fmt == "vhd":
        _check_vhd_header(view.head, result)
    if fmt in ("raw", "iso"):
        size = view.size
    result.format = fmt
    result.qemu_format = "raw" if fmt == "iso" else to_qemu(fmt)
    result.virtual_size = size

    if fmt == "vmdk":
        _check_vmdk(view.head, chosen, result, config)
    banned = set(config.safety.banned_formats)
    if fmt in banned or result.qemu_format in banned:
        result.add(_banned_finding(fmt))
    if fmt == "iso" and config.safety.iso_policy == "reject":
        result.add(
            Finding.error(
                "UnsafeImage.BannedFormat",
                "ISO images are not accepted here (safety.iso_policy is 'reject'); install the system "
                "from the ISO into a disk image and upload that",
            )
        )
    # a fixed VHD is known by its last sector: without it a vhd claim on raw-looking bytes is undecided
    undecided_vhd = fmt == "raw" and view.footer is None and claimed == "vhd"
    if claimed is not None and not undecided_vhd and not _claim_matches(claimed, fmt, output=output):
        if output:
            result.add(_unexpected_output(claimed, fmt))
        else:
            hint = result.details.get("vhd_footer_problem")
            extra = (
                f" (the file ends in a VHD footer that is not valid: {hint})"
                if hint and claimed == "vhd"
                else ""
            )
            result.add(
                Finding.error(
                    "FormatMismatch",
                    f"claimed {claimed}, detected {fmt}{extra}; give the format that matches the file's "
                    "content (the upload may be the wrong file)",
                )
            )
    if size is not None and size > config.limits.max_virtual_size:
        result.add(_size_finding(size, config))


@dataclass(frozen=True)
class _View:
    """What the content stage reads of an image: the inspectors' decision, its first bytes (at least
    the first sector, where the file has one), its last 512 bytes (fewer for a smaller file; None: not
    known) and its size (None: not known)."""

    inspectors: list[fi.FileInspector]
    head: bytes
    footer: bytes | None
    size: int | None

    @classmethod
    def of_file(cls, path: Path, cancel: threading.Event | None) -> _View:
        """Every format whose inspector matches ``path`` (``[raw]`` when none does), reading only as far
        as needed, and the file's first and last sector."""
        detector = Detector()
        with open(path, "rb") as f:
            head = f.read(_READ_CHUNK)
            chunk = head
            while chunk:
                detector.feed(chunk)
                _check_cancel(cancel)
                if detector.formats is not None:
                    break
                chunk = f.read(_READ_CHUNK)
            size = f.seek(0, 2)
            footer = b""
            if size >= _SECTOR:
                f.seek(size - _SECTOR)
                footer = f.read(_SECTOR)
        return cls(detector.finish(), head, footer, size)


def _choose(
    inspectors: list[fi.FileInspector], names: list[str], result: Verdict, config: Config
) -> fi.FileInspector | None:
    """The single inspector to trust, applying the ISO policy to multiple matches; None after a rejection."""
    if len(inspectors) == 1:
        return inspectors[0]
    if names == ["gpt", "iso"] and config.safety.iso_policy == "allow-hybrid":
        result.details["hybrid_iso"] = True
        result.add(Finding.info("Iso.Hybrid", "bootable hybrid ISO (ISO 9660 with an MBR); treated as ISO"))
        return next(i for i in inspectors if str(i) == "iso")
    policy = config.safety.iso_policy
    why = (
        f" (hybrid ISOs are not accepted: safety.iso_policy is {policy!r})" if names == ["gpt", "iso"] else ""
    )
    result.add(
        Finding.error(
            "UnsafeImage.Polyglot",
            f"the file is valid as several formats at once ({', '.join(names)}){why}; such files are used to "
            "smuggle one format past checks for another; upload a plain single-format image",
        )
    )
    return None


def _safety_finding(
    fmt: str, check: str, failure: Exception, config: Config, create_type: str | None
) -> Finding:
    reason = str(failure)
    if check == "backing_file":
        return _backing_finding("the qcow2 header names a backing file")
    if check == "data_file":
        return _data_file_finding()
    if check == "unknown_features":
        return Finding.error(
            "UnsafeImage.UnknownFeatures",
            f"the qcow2 header is not supported ({reason}); re-create the image with "
            "`qemu-img convert -O qcow2 -o compat=1.1` (without extended_l2) and upload it again",
        )
    if check == "banned":
        return _banned_finding(fmt)
    if check == "mbr":
        return Finding.error(
            "UnsafeImage.PartitionTable",
            f"the partition table is invalid ({reason}); fix or recreate the partition table and "
            "upload again",
        )
    if check == "descriptor" and reason == "Unsupported subformat":
        return _create_type_finding(create_type, config)
    if check == "descriptor":
        return Finding.error(
            "UnsafeImage.VmdkDescriptor", f"the VMDK descriptor is not acceptable ({reason}); {_VMDK_EXPORT}"
        )
    if check == "footer":
        return Finding.error(
            "UnsafeImage.VmdkFooter", f"the VMDK stream footer is inconsistent ({reason}); {_VMDK_EXPORT}"
        )
    return Finding.error(
        "UnsafeImage.SafetyCheck", f"the {fmt} image failed the {check} safety check ({reason})"
    )


def _check_vmdk(head: bytes, inspector: fi.FileInspector, result: Verdict, config: Config) -> None:
    """Close oslo.utils 10.2's VMDK gaps (text-only descriptors, delta disks); apply the create types."""
    if not head.startswith(VMDK_MAGIC):
        result.add(
            Finding.error(
                "UnsafeImage.VmdkDescriptor",
                "the file is a text-only VMDK descriptor: the disk data is in other files, which are "
                f"never read; {_VMDK_EXPORT}",
            )
        )
    create_type = getattr(inspector, "vmdktype", None)  # oslo lower-cases the descriptor
    if create_type:
        result.details["vmdk_create_type"] = create_type
        if create_type not in {t.lower() for t in config.safety.vmdk_allowed_types}:
            result.add(_create_type_finding(create_type, config))
    descriptor = getattr(inspector, "desc_text", None) or ""
    fields = _descriptor_fields(descriptor)
    parent_cid = fields.get("parentcid", _VMDK_NO_PARENT_CID).strip('"')
    if parent_cid != _VMDK_NO_PARENT_CID or "parentfilenamehint" in fields:
        hint = fields.get("parentfilenamehint", "").strip('"')[:200]
        result.add(_backing_finding(f"it is a VMDK delta disk of the parent {hint or 'CID ' + parent_cid!r}"))


def _descriptor_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and " " not in key.strip():
            fields[key.strip()] = value.strip()
    return fields


def _read_vhd_footer(footer: bytes | None, size: int | None) -> dict[str, Any] | None:
    """The fixed-VHD footer, given the last 512 bytes of a file of ``size`` bytes: None without the
    cookie (or without those bytes), else its size and any problem.

    oslo.utils only looks for ``conectix`` at offset 0 (dynamic VHDs), so a fixed VHD reads as raw there.
    """
    if footer is None or size is None or size < _SECTOR or not footer.startswith(VHD_COOKIE):
        return None
    (data_offset,) = struct.unpack_from(">Q", footer, 16)
    (current_size,) = struct.unpack_from(">Q", footer, 48)
    (disk_type, checksum) = struct.unpack_from(">II", footer, 60)
    expected = ~sum(footer[:64] + b"\0\0\0\0" + footer[68:]) & 0xFFFFFFFF
    problem = None
    if checksum != expected:
        problem = "bad checksum"
    elif disk_type != _VHD_FIXED or data_offset != 0xFFFFFFFFFFFFFFFF:
        problem = f"disk type {disk_type} is not a fixed disk"
    elif current_size > size - _SECTOR:
        problem = f"disk size {current_size} exceeds the file"
    return {"current_size": current_size, "problem": problem}


def _check_vhd_header(header: bytes, result: Verdict) -> None:
    (disk_type,) = struct.unpack_from(">I", header, 60)
    kinds = {_VHD_FIXED: "fixed", _VHD_DYNAMIC: "dynamic", _VHD_DIFFERENCING: "differencing"}
    result.details["vhd_subformat"] = kinds.get(disk_type, f"type {disk_type}")
    if disk_type == _VHD_DIFFERENCING:
        result.add(_backing_finding("it is a differencing VHD that depends on a parent disk"))


def _record_info_details(result: InspectionResult, info: dict[str, Any]) -> None:
    size = info.get("virtual-size")
    if isinstance(size, int):
        result.virtual_size = size
    if "cluster-size" in info:
        result.details["cluster_size"] = info["cluster-size"]
    if info.get("dirty-flag"):
        result.add(
            Finding.warning(
                "Integrity.DirtyFlag", "the image was not closed cleanly; its metadata was checked"
            )
        )
    data = (info.get("format-specific") or {}).get("data") or {}
    if "compat" in data:
        result.details["qcow2_compat"] = data["compat"]
    if "create-type" in data:
        result.details["vmdk_create_type"] = data["create-type"]


# ------------------------------------------------------------------------------------------------ helpers


def _claim_matches(claimed: str, fmt: str, *, output: bool) -> bool:
    # qemu reads an ISO as raw, so raw conversion output may legitimately contain one.
    return claimed == fmt or (output and claimed == "raw" and fmt == "iso")


def _inspector_size(inspector: fi.FileInspector) -> int | None:
    # Other inspectors (raw, gpt, qed, luks) inherit a "virtual size" that is only the number of bytes read.
    if str(inspector) not in _HEADER_SIZED:
        return None
    try:
        return int(inspector.virtual_size) or None
    except Exception:  # oslo's VMDK size raises for a text descriptor; size is then unknown, not fatal
        return None


def _compression_mismatch(claimed: str, claimed_fmt: str | None, compression: str | None) -> Finding:
    detected = f"{compression}-compressed" if compression else "no compression"
    return Finding.error(
        "FormatMismatch",
        f"claimed {claimed}, detected {detected}; give the format that matches the file "
        f"(e.g. {claimed_fmt}{COMPRESSION_SUFFIXES[compression] if compression else ''})",
    )


def _backing_finding(what: str) -> Finding:
    return Finding.error(
        "UnsafeImage.BackingFile",
        f"the image is not self-contained: {what}, which would be read from this host; {_FLATTEN}",
    )


def _data_file_finding() -> Finding:
    return Finding.error(
        "UnsafeImage.DataFile",
        "the qcow2 image keeps its data in an external data file, which would be read from this host; "
        "convert it into a self-contained image with `qemu-img convert -O qcow2` first",
    )


def _create_type_finding(create_type: str | None, config: Config) -> Finding:
    allowed = ", ".join(config.safety.vmdk_allowed_types) or "none"
    what = f"VMDK subformat {create_type!r}" if create_type else "this VMDK subformat"
    return Finding.error(
        "UnsafeImage.VmdkCreateType", f"{what} is not accepted (allowed: {allowed}); {_VMDK_EXPORT}"
    )


def _banned_finding(fmt: str) -> Finding:
    return Finding.error(
        "UnsafeImage.BannedFormat",
        f"{fmt} images are not accepted; convert it to qcow2 or raw with `qemu-img convert` and upload that",
    )


def _size_finding(size: int, config: Config) -> Finding:
    limit = config.limits.max_virtual_size
    return Finding.error(
        "SizeLimitExceeded",
        f"the virtual disk size {size} bytes ({size / 2**30:.1f} GiB) exceeds the limit of {limit} bytes "
        f"({limit / 2**30:.1f} GiB, limits.max_virtual_size); shrink the disk or ask for a higher limit",
    )


def _unexpected_output(expected: str | None, detected: str) -> Finding:
    return Finding.error(
        "ConversionFailed.UnexpectedFormat",
        f"the conversion output should be {expected} but its content is detected as {detected}; the "
        "output is not used (a format hidden inside another is unsafe)",
    )


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("image inspection cancelled")


def _fresh_path(workdir: Path, source: Path) -> Path:
    """A new name in ``workdir`` for the decompressed copy of ``source`` (``disk.raw.gz`` → ``disk.raw``)."""
    name = strip_compression_suffix(source.name) or source.name + ".decompressed"
    candidate = workdir / name
    n = 1
    while candidate.exists() or candidate.is_symlink():
        candidate = workdir / f"{name}.{n}"
        n += 1
    return candidate


def _finish(result: InspectionResult) -> InspectionResult:
    try:
        result.actual_size = result.path.stat().st_blocks * 512
    except OSError:
        result.actual_size = None
    return result
