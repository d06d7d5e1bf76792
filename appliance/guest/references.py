"""The other files a container image says it needs (a qcow2 backing or data file, a VMDK parent or
extent file, a differencing VHD, VHDX or VDI), read from the container headers alone.

Read here rather than from dissect's objects, because dissect tries to open such files while it
constructs them; :func:`appliance.guest.reader.open_disk` refuses such an image before dissect sees it.
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

from ..image.formats import QCOW2_MAGIC, VHD_COOKIE, VMDK_MAGIC

#: bytes of a VMDK embedded descriptor looked at (qemu-img and VMware write one 10 KiB sector run)
_VMDK_DESCRIPTOR_MAX = 1 << 20


def _show(name: str) -> str:
    return repr(name[:200])


def _qcow2_reference(fh: BinaryIO) -> str | None:
    fh.seek(0)
    header = fh.read(80)
    if len(header) < 20 or not header.startswith(QCOW2_MAGIC):
        return None
    version, backing_offset, backing_size = struct.unpack_from(">IQI", header, 4)
    if backing_offset:
        fh.seek(backing_offset)
        name = fh.read(min(backing_size, 1023)).decode("utf-8", "replace")
        return f"a qcow2 image with the backing file {_show(name)}"
    # version 3 incompatible feature bit 2: the guest data lives in an external data file
    if version >= 3 and len(header) >= 80 and struct.unpack_from(">Q", header, 72)[0] & 0x4:
        return "a qcow2 image whose data is in an external data file"
    return None


def _vmdk_descriptor_reference(text: str, embedded: bool) -> str | None:
    fields = {}
    extents = 0
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("RW ", "RDONLY ", "NOACCESS ")):
            extents += 1
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip('"')
    parent_cid = fields.get("parentCID", "ffffffff").lower()
    if parent_cid != "ffffffff" or fields.get("parentFileNameHint"):
        return f"a VMDK child disk of the parent {_show(fields.get('parentFileNameHint', '(unnamed)'))}"
    if not embedded and extents:
        # a descriptor file's extents are other files by construction
        return "a VMDK descriptor whose data is in separate extent files"
    return None


def _vmdk_reference(fh: BinaryIO) -> str | None:
    fh.seek(0)
    header = fh.read(512)
    if header.startswith(b"# Di"):
        fh.seek(0)
        return _vmdk_descriptor_reference(fh.read(_VMDK_DESCRIPTOR_MAX).decode("utf-8", "replace"), False)
    if not header.startswith(VMDK_MAGIC) or len(header) < 64:
        return None
    gd_offset = struct.unpack_from("<Q", header, 56)[0]
    if gd_offset == 0xFFFFFFFFFFFFFFFF:  # streamOptimized: the footer is the real header (dissect reads it)
        fh.seek(0, io.SEEK_END)
        fh.seek(max(0, fh.tell() - 1024))
        footer = fh.read(512)
        if footer.startswith(VMDK_MAGIC):
            header = footer
    desc_offset, desc_size = struct.unpack_from("<QQ", header, 28)
    if not desc_size:
        return None
    fh.seek(desc_offset * 512)
    raw = fh.read(min(desc_size * 512, _VMDK_DESCRIPTOR_MAX)).split(b"\0", 1)[0]
    return _vmdk_descriptor_reference(raw.decode("utf-8", "replace"), True)


def _vhd_reference(fh: BinaryIO) -> str | None:
    # the footer (last 512 bytes, or 511 for old Virtual PC) and its copy at offset 0 for dynamic disks;
    # disk type 4 is "differencing": the unallocated blocks are in a parent file
    fh.seek(0, io.SEEK_END)
    size = fh.tell()
    for offset in (size - 512, size - 511, 0):
        if offset < 0:
            continue
        fh.seek(offset)
        footer = fh.read(64)
        if (
            len(footer) == 64
            and footer.startswith(VHD_COOKIE)
            and struct.unpack_from(">I", footer, 60)[0] == 4
        ):
            return "a differencing VHD (a child of a parent disk)"
    return None


def _vhdx_reference(fh: BinaryIO) -> str | None:
    # dissect.hypervisor's VHDX parser is only needed for .vhdx images (heavy; dissect's own lazy style)
    from dissect.hypervisor.disk import vhdx as dvhdx

    try:
        region = dvhdx.RegionTable(fh, 3 * dvhdx.ALIGNMENT).get(dvhdx.METADATA_REGION_GUID)
        metadata = dvhdx.MetadataTable(fh, region.file_offset, region.length)
    except Exception:  # not a readable VHDX at all: opening it says so
        return None
    params = metadata.get(dvhdx.FILE_PARAMETERS_GUID, required=False)
    locator = metadata.get(dvhdx.PARENT_LOCATOR_GUID, required=False)
    if (params is not None and params.has_parent) or locator is not None:
        entries = getattr(locator, "entries", {}) or {}
        name = entries.get("absolute_win32_path") or entries.get("relative_path") or "(unnamed)"
        return f"a differencing VHDX (a child of the parent {_show(name)})"
    return None


#: offset of the VirtualBox image type (after the 72-byte pre-header and cbHeader) and its differencing value
_VDI_TYPE_OFFSET, _VDI_DIFF = 76, 4


def _vdi_reference(fh: BinaryIO) -> str | None:
    # dissect reads a differencing VDI's missing blocks from a parent only when handed one, but the image is
    # still not self-contained
    fh.seek(_VDI_TYPE_OFFSET)
    raw = fh.read(4)
    if len(raw) == 4 and struct.unpack("<I", raw)[0] == _VDI_DIFF:
        return "a differencing VDI (a child of a parent disk)"
    return None


_REFERENCE_CHECKS = {
    "qcow2": _qcow2_reference,
    "vmdk": _vmdk_reference,
    "vhd": _vhd_reference,
    "vhdx": _vhdx_reference,
    "vdi": _vdi_reference,
}


def external_reference(fh: BinaryIO, fmt: str) -> str | None:
    """What other file the ``fmt`` image in ``fh`` says it needs (``None``: it is self-contained).

    Read from the container headers here rather than from dissect's objects, because dissect tries to
    open such files while it constructs them.
    """
    check = _REFERENCE_CHECKS.get(fmt)
    return check(fh) if check is not None else None
