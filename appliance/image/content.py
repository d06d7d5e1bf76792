"""Stage 2 of the inspection, the content inspector: what the bytes of an image are, by oslo.utils'
``format_inspector`` over the file (every inspector, so polyglots are seen), then the checks oslo.utils
lacks (fixed VHD footers, text-only VMDK descriptors, VMDK delta disks, differencing VHDs, a bare
FAT/NTFS boot sector, an archive that would pass for a RAW disk), the claim and the virtual size. Byte
offsets are those of the formats' specifications (:mod:`appliance.image.formats`)."""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from oslo_utils.imageutils import format_inspector as fi

from ..config import Config
from ..errors import Finding
from . import bootsector
from .archived import archive_finding
from .detect import Detector
from .formats import (
    VHD_COOKIE,
    VMDK_MAGIC,
    to_qemu,
)
from .verdict import (
    VMDK_EXPORT,
    Verdict,
    backing_finding,
    banned_finding,
    check_cancel,
    create_type_finding,
    data_file_finding,
    size_finding,
    unexpected_output,
)

_READ_CHUNK = 64 * 1024
SECTOR = 512
_VHD_FIXED, _VHD_DYNAMIC, _VHD_DIFFERENCING = 2, 3, 4
_VMDK_NO_PARENT_CID = "ffffffff"
#: inspectors that read the virtual size from a header
_HEADER_SIZED = frozenset({"qcow2", "vhd", "vhdx", "vmdk", "vdi"})


def content_stage(
    result: Verdict,
    claimed: str | None,
    view: ContentView,
    *,
    config: Config,
    output: bool,
    ignore_checks: frozenset[str] = frozenset(),
    partial: bool = False,
    decoded: bool = False,
) -> None:
    """Stage 2 on what ``view`` holds of an image (a whole file, or a download's first and last bytes).

    ``ignore_checks`` names oslo safety checks left to a later stage (the footer of a VMDK stream whose
    end is not there yet); ``partial``: regions beyond the bytes in ``view`` are missing, so an inspector
    that could not see all it needs is undecided, not a truncated file; ``decoded``: the bytes are a disk the
    appliance decoded out of a VMDK or VHD (or wrote itself), a guest's disk judged as a conversion's output
    is: an archive at its start is not refused (``tar -cf /dev/sdX``), and an ISO (a live image written to
    the disk) is what a RAW disk may hold, as qemu-img's RAW output of the same VMDK may."""
    inspectors = view.inspectors
    names = sorted(str(i) for i in inspectors)
    result.details["detected_formats"] = names
    chosen = _choose(inspectors, names, result, config)
    if chosen is None:
        if output:
            result.add(unexpected_output(claimed, ",".join(names)))
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
    if fmt in ("raw", "iso"):
        # a fixed VHD is its guest's disk and a footer: the guest's disk may be an ISO (a live image written
        # to the disk), which the ISO policy judges once decoded, as it judges a conversion's output
        footer = _read_vhd_footer(view.footer, view.size)
        if footer is not None and footer["problem"] is None:
            fmt = "vhd"
            size = footer["current_size"]
            result.details["vhd_subformat"] = "fixed"
            result.findings = [f for f in result.findings if f.code != "Iso.Hybrid"]
            result.details.pop("hybrid_iso", None)
        elif footer is not None:
            result.details["vhd_footer_problem"] = footer["problem"]
    elif fmt == "vhd":
        _check_vhd_header(view.head, result)
    # a fixed VHD is known by its last sector: without it a vhd claim on raw-looking bytes is undecided
    undecided_vhd = fmt in ("raw", "iso") and view.footer is None and claimed == "vhd"
    if fmt == "raw" and not output and not undecided_vhd and not decoded:
        # an archive holding a disk (a GCE .tar.gz, a zip) is raw to every inspector: refused, not imported
        # (asked only now: a fixed VHD's data is a guest's disk, which may begin with what `tar -cf /dev/sdX`
        # wrote there)
        archived = archive_finding(view.head)
        if archived is not None:
            result.add(archived)
            return
    if fmt in ("raw", "iso"):
        size = view.size
    result.format = fmt
    result.qemu_format = "raw" if fmt == "iso" else to_qemu(fmt)
    result.virtual_size = size

    if fmt == "vmdk":
        _check_vmdk(view.head, chosen, result, config)
    banned = set(config.safety.banned_formats)
    if fmt in banned or result.qemu_format in banned:
        result.add(banned_finding(fmt))
    if fmt == "iso" and config.safety.iso_policy == "reject":
        result.add(
            Finding.error(
                "UnsafeImage.BannedFormat",
                "ISO images are not accepted here (safety.iso_policy is 'reject'); install the system "
                "from the ISO into a disk image and upload that",
            )
        )
    as_output = output or decoded
    if claimed is not None and not undecided_vhd and not _claim_matches(claimed, fmt, output=as_output):
        if output:
            result.add(unexpected_output(claimed, fmt))
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
        result.add(size_finding(size, config))


class SeekableInput(Protocol):
    """What :meth:`ContentView.of_stream` reads: a binary file that can seek."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...


@dataclass(frozen=True)
class ContentView:
    """What the content stage reads of an image: the inspectors' decision, its first bytes (at least
    the first sector, where the file has one), its last 512 bytes (fewer for a smaller file; None: not
    known) and its size (None: not known)."""

    inspectors: list[fi.FileInspector]
    head: bytes
    footer: bytes | None
    size: int | None

    @classmethod
    def of_file(cls, path: Path, cancel: threading.Event | None) -> ContentView:
        """Every format whose inspector matches ``path`` (``[raw]`` when none does), reading only as far
        as needed, and the file's first and last sector."""
        with open(path, "rb") as f:
            return cls.of_stream(f, cancel)

    @classmethod
    def of_stream(cls, f: SeekableInput, cancel: threading.Event | None) -> ContentView:
        """:meth:`of_file` of an open, seekable binary file (a local file, or an object read back in
        ranges: :class:`appliance.targets.s3read.ObjectRangeReader`)."""
        detector = Detector()
        f.seek(0)
        head = f.read(_READ_CHUNK)
        chunk = head
        while chunk:
            detector.feed(chunk)
            check_cancel(cancel)
            if detector.formats is not None:
                break
            chunk = f.read(_READ_CHUNK)
        size = f.seek(0, 2)
        footer = b""
        if size >= SECTOR:
            f.seek(size - SECTOR)
            footer = f.read(SECTOR)
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
        return backing_finding("the qcow2 header names a backing file")
    if check == "data_file":
        return data_file_finding()
    if check == "unknown_features":
        return Finding.error(
            "UnsafeImage.UnknownFeatures",
            f"the qcow2 header is not supported ({reason}); re-create the image with "
            "`qemu-img convert -O qcow2 -o compat=1.1` (without extended_l2) and upload it again",
        )
    if check == "banned":
        return banned_finding(fmt)
    if check == "mbr":
        return Finding.error(
            "UnsafeImage.PartitionTable",
            f"the partition table is invalid ({reason}); fix or recreate the partition table and "
            "upload again",
        )
    if check == "descriptor" and reason == "Unsupported subformat":
        return create_type_finding(create_type, config)
    if check == "descriptor":
        return Finding.error(
            "UnsafeImage.VmdkDescriptor", f"the VMDK descriptor is not acceptable ({reason}); {VMDK_EXPORT}"
        )
    if check == "footer":
        return Finding.error(
            "UnsafeImage.VmdkFooter", f"the VMDK stream footer is inconsistent ({reason}); {VMDK_EXPORT}"
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
                f"never read; {VMDK_EXPORT}",
            )
        )
    create_type = getattr(inspector, "vmdktype", None)  # oslo lower-cases the descriptor
    if create_type:
        result.details["vmdk_create_type"] = create_type
        if create_type not in {t.lower() for t in config.safety.vmdk_allowed_types}:
            result.add(create_type_finding(create_type, config))
    descriptor = getattr(inspector, "desc_text", None) or ""
    fields = _descriptor_fields(descriptor)
    parent_cid = fields.get("parentcid", _VMDK_NO_PARENT_CID).strip('"')
    if parent_cid != _VMDK_NO_PARENT_CID or "parentfilenamehint" in fields:
        hint = fields.get("parentfilenamehint", "").strip('"')[:200]
        result.add(backing_finding(f"it is a VMDK delta disk of the parent {hint or 'CID ' + parent_cid!r}"))


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
    if footer is None or size is None or size < SECTOR or not footer.startswith(VHD_COOKIE):
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
    elif current_size > size - SECTOR:
        problem = f"disk size {current_size} exceeds the file"
    return {"current_size": current_size, "problem": problem}


def _check_vhd_header(header: bytes, result: Verdict) -> None:
    (disk_type,) = struct.unpack_from(">I", header, 60)
    kinds = {_VHD_FIXED: "fixed", _VHD_DYNAMIC: "dynamic", _VHD_DIFFERENCING: "differencing"}
    result.details["vhd_subformat"] = kinds.get(disk_type, f"type {disk_type}")
    if disk_type == _VHD_DIFFERENCING:
        result.add(backing_finding("it is a differencing VHD that depends on a parent disk"))


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
