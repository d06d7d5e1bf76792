"""Safe inspection of untrusted disk images: never run qemu-img on an unchecked file.

Stages, each of which must pass before the next runs (mirroring Nova's ``fetch_to_raw``):

1. **compression** — gzip/xz/zstd/bzip2 detected by magic are decompressed, capped and sparse, into the
   caller's work directory (:mod:`appliance.image.decompress`); a claim such as ``raw.gz`` must match
   the detected compression. A claim without a suffix accepts a compressed file (the inner format is
   what is checked). A compressed OVA (the first decompressed block a tar whose first member is a
   ``.ovf``) is ``Ova.Compressed``, any other compressed archive (a GCE ``.tar.gz``)
   ``FormatMismatch.Archive``, before more is decompressed (:mod:`appliance.image.archived`).
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

Stage 2 lives in :mod:`appliance.image.content`; the verdicts and the findings the stages record in
:mod:`appliance.image.verdict`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import Finding, ImageRejected, Severity, UsageError
from ..partials import Ledger
from . import qemuimg
from .archived import refuse_archived
from .content import SECTOR, ContentView, content_stage
from .decompress import decompress, detect_compression
from .detect import END_BYTES, Detector
from .formats import (
    SIGNATURE_BYTES,
    check_output_format,
    compression_of,
    parse_claim,
    strip_compression_suffix,
)
from .verdict import (
    VMDK_EXPORT,
    InspectionResult,
    Preflight,
    backing_finding,
    check_cancel,
    compression_mismatch,
    create_type_finding,
    data_file_finding,
    size_finding,
)

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
    decoded: bool = False,
) -> InspectionResult:
    """Inspect ``path``, optionally claimed to be ``claimed`` (``qcow2``, ``raw.gz``, …), without trusting it.

    ``run_check=False`` stops before ``qemu-img check``: the caller runs :func:`check_image` on the
    result and must apply its findings before it trusts the image or anything made from it (a
    conversion runs it alongside qemu-img convert and publishes nothing unless it passes).
    ``decoded``: the file is a disk decoded out of a VMDK or VHD as it streamed, a guest's disk, whose content
    is judged as a conversion's output is (:func:`~appliance.image.content.content_stage`).

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
        result.add(compression_mismatch(claimed or "", claimed_fmt, compression))
        return _finish(result)
    if compression is None:
        _inspect_file(
            result,
            claimed_fmt,
            config=config,
            workdir=workdir,
            cancel=cancel,
            run_check=run_check,
            decoded=decoded,
        )
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
            check_head=lambda head: refuse_archived(compression, head, claimed_fmt),
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
    decoded: bool = False,
) -> Preflight:
    """The content checks of :func:`inspect_image` on an image's first bytes (``head``, ideally
    :data:`PREFLIGHT_HEAD` of them) and last bytes (``tail``, ideally :data:`PREFLIGHT_TAIL`; needs the
    image's ``size``), before the rest is downloaded: the format detected against the claim
    (compression included), polyglots, the ISO policy, the VMDK create type and descriptor, delta
    disks, differencing VHDs, banned formats and the virtual size. The same code as the file
    inspection decides, on the bytes given.

    What those bytes cannot decide is in ``pending`` (see :class:`Preflight`); qemu-img never runs
    here. A compressed head decides only the compression: preflight the decompressed head again with
    the claim's inner format. ``decoded`` as :func:`inspect_image` takes it. Never raises for an unsafe
    image; UsageError for an unknown claim or ``tail`` without ``size``.
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
        result.add(compression_mismatch(claimed or "", claimed_fmt, compression))
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
        footer: bytes | None = head[-SECTOR:]
    else:
        footer = None if tail is None else tail[-SECTOR:]
    view = ContentView(detector.finish(), head, footer, size)
    content_stage(
        result,
        claimed_fmt,
        view,
        config=config,
        output=False,
        ignore_checks=ignore,
        partial=partial,
        decoded=decoded,
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
        content_stage(result, fmt, ContentView.of_file(target, None), config=config, output=True)
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
        findings.append(backing_finding(f"it has the backing file {str(backing)[:200]!r}"))
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        findings.append(data_file_finding())
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
            findings.append(create_type_finding(create_type, config))
        for extent in data.get("extents") or []:
            name = extent.get("filename") if isinstance(extent, dict) else None
            if name != qemuimg.LINK_NAME:
                findings.append(
                    Finding.error(
                        "UnsafeImage.VmdkDescriptor",
                        f"the VMDK refers to the separate extent file {str(name)[:200]!r}; {VMDK_EXPORT}",
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
        findings.append(size_finding(size, config))
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
    decoded: bool = False,
) -> None:
    """Stages 2-5 on ``result.path`` (without ``qemu-img check`` unless ``run_check``); stops after the
    first stage that records an error."""
    path = result.path
    check_cancel(cancel)
    view = ContentView.of_file(path, cancel)
    content_stage(result, claimed, view, config=config, output=output, decoded=decoded)
    if not result.safe or result.qemu_format is None:
        return
    check_cancel(cancel)
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
    check_cancel(cancel)
    try:
        for finding in qemuimg.check(
            result.path, result.qemu_format, config.limits, workdir=workdir, cancel=cancel
        ):
            result.add(finding)
    except ImageRejected as exc:
        result.findings.extend(exc.findings)


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
