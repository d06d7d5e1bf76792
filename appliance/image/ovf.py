"""OVF descriptors: reading an untrusted one in a confined child (writing one is
:mod:`appliance.image.ovfenvelope`'s).

Reading (:func:`parse`): defusedxml with DTDs, entities and external references forbidden, a size cap
(:data:`MAX_OVF_BYTES`), run in a confined Python child (:func:`parse_confined`, the guest probe's policy:
CPU, memory and wall-clock limits, no network, no files) that prints the facts as JSON: files (href, size,
gzip-compressed or not), disks (id, file, capacity in bytes and its unit), the disk order of the hardware
section (``Item`` of OVF 1.x of ``ResourceType`` 17, or 19 as XenCenter writes its disks, also
``StorageItem`` of OVF 2.x; the disk a VMware ``vmw:BootOrderSection`` names first, else the one disk
oVirt's ``ovf:boot="true"`` or XenCenter's ``xenovf:isBootable="true"`` marks), firmware (VMware's
``vmw:Config firmware``, else oVirt's ``BiosType``, else the ``firmware`` of XenCenter's ``HVM_boot_params``
in a ``xenovf:VirtualSystemOtherConfigurationData``), OS type, CPUs and memory (its ``AllocationUnits``
honoured: ``byte * 2^N`` and VirtualBox's ``MegaBytes``). The envelope namespaces of OVF 1.x and 2.x
(``…/envelope/1``, also ``…/envelope/1/`` as older oVirt writes it, ``…/envelope/2``) and of OVF 0.9
(``http://www.vmware.com/schema/ovf/1/envelope``: VirtualBox's legacy "OVF 0.9" export, old VMware tools) are
read, with the same checks and limits; a section is found by its name or as a generic ``Section``/``Content``
whose ``xsi:type`` is ``<Name>_Type`` (0.9 writes only that form, 1.x allows it anywhere), an item's
``InstanceID`` also as 0.9's ``InstanceId``. Elements and attributes of other namespaces (``vmw:``, ``vbox:``)
are ignored, unless such an element is a required extension this reader does not understand, as is a required
generic section of a type OVF does not define (``Ova.UnsupportedSection``:
:mod:`appliance.image.ovfrequired`). A file split into chunks or compressed other than with gzip is
``Ova.Unsupported``; anything else unusable is ``Ova.BadDescriptor``.

A descriptor whose XML declaration names UTF-16 (or UCS-2) but whose bytes are 8-bit, with no byte-order
mark, is read as UTF-8 (:func:`_declared_utf16`): XenCenter's export (XenOvf) serialises the envelope to a
UTF-16 string, declaration included, then writes that string as UTF-8. Such bytes cannot be UTF-16 (its
``<?xml`` is ``<\0?\0``), so the declaration is plainly wrong; libxml2, which virt-v2v reads OVFs with,
also reads such a document as UTF-8. Bytes that are not UTF-8 are then malformed XML, as before.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
from defusedxml.ElementTree import fromstring

from ..config import Limits
from ..errors import Finding, ImageRejected
from .confinedparse import run_parser
from .ovfrequired import OVF09_NS, check_required, section_name

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
#: OVF 1.x's namespace with a trailing slash: older oVirt/RHV, RHEV export domains, Image Factory write it
OVF_SLASH_NS = OVF_NS + "/"
OVF2_NS = "http://schemas.dmtf.org/ovf/envelope/2"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
CIM_NS = "http://schemas.dmtf.org/wbem/wscim/1/common"
#: the largest descriptor read (a real one is a few KiB)
MAX_OVF_BYTES = 1 << 20
#: the most disks one OVA may hold (AWS: 21 volumes per instance)
MAX_DISKS = 21
#: the CIM storage-allocation namespace of OVF 2.x ``StorageItem`` disks; VirtualBox writes it with ``.xsd``
SASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData"
#: Citrix XenServer's namespace (XenCenter's ``xenovf:`` extensions)
XENOVF_NS = "http://schemas.citrix.com/ovf/envelope/1"
#: the ``firmware`` of XenCenter's ``HVM_boot_params`` → the OVF firmware
_XEN_FIRMWARE = {"uefi": "efi", "bios": "bios"}
#: oVirt's ``BiosType`` in the virtual system (the numbers of oVirt 4.3, which later versions keep writing):
#: i440fx or q35 with SeaBIOS, q35 with OVMF (UEFI) without or with Secure Boot; -1 (the cluster's
#: default, which the export does not say) is none of them
_BIOS_TYPES = {"0": "bios", "1": "bios", "2": "efi", "3": "efi"}
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_UNITS = re.compile(r"^\s*byte\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?\s*$")
#: the unit names VirtualBox writes for memory (``MegaBytes``) and their kin
_NAMED_UNITS = {"bytes": 0, "kilobytes": 10, "megabytes": 20, "gigabytes": 30, "kb": 10, "mb": 20, "gb": 30}
#: an XML declaration of 8-bit bytes (no byte-order mark) naming a 16-bit encoding: group 1 is its name
_UTF16_DECLARED = re.compile(
    rb"""^<\?xml\s[^>]{0,200}?\bencoding\s*=\s*["'](utf-16(?:le|be)?|ucs-2|unicode)["']""", re.IGNORECASE
)


def _bad(message: str) -> ImageRejected:
    return ImageRejected(
        [
            Finding.error(
                "Ova.BadDescriptor", f"the OVF descriptor is not usable: {message}; nothing was imported"
            )
        ]
    )


def _unsupported(message: str) -> ImageRejected:
    return ImageRejected(
        [Finding.error("Ova.Unsupported", f"the OVA uses what is not imported: {message}; nothing imported")]
    )


# ------------------------------------------------------------------------------------------- reading


@dataclass
class OvfInfo:
    """The facts of a descriptor the importer uses."""

    #: ``File`` id → href, size (or None)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: disks in the order of the hardware section (then any others): ``{id, file, capacity}``
    disks: list[dict[str, Any]] = field(default_factory=list)
    firmware: str | None = None
    os_type: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def _attr(el: ET.Element, name: str, ns: str) -> str | None:
    return el.get(_q(ns, name))


def _units(text: str | None) -> int:
    if not text:
        return 1
    named = _NAMED_UNITS.get(text.strip().lower())
    if named is not None:
        return 1 << named
    m = _UNITS.match(text)
    if not m:
        raise _bad(f"capacityAllocationUnits {text[:40]!r} (expected 'byte * 2^N')")
    if m.group(1) is None:
        return 1
    base, exp = int(m.group(1)), int(m.group(2))
    if base != 2 or exp > 60:
        raise _bad(f"capacityAllocationUnits {text[:40]!r}")
    return 1 << exp


def _int(text: str | None, what: str) -> int:
    if text is None or not text.strip().isdigit() or len(text.strip()) > 20:
        raise _bad(f"{what} {str(text)[:40]!r} is not a number")
    return int(text.strip())


def parse(data: bytes) -> OvfInfo:
    """Parse a descriptor (defusedxml: no DTD, entities or external references); ``Ova.BadDescriptor``."""
    if len(data) > MAX_OVF_BYTES:
        raise _bad(f"{len(data)} bytes (at most {MAX_OVF_BYTES})")
    data = _declared_utf16(data)
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden) as exc:
        raise _bad(f"it declares a DTD or entities ({type(exc).__name__}), which are refused") from None
    except ET.ParseError as exc:
        raise _bad(f"malformed XML ({exc})") from None
    envelopes = (OVF_NS, OVF_SLASH_NS, OVF2_NS, OVF09_NS)
    ns = next((uri for uri in envelopes if root.tag == _q(uri, "Envelope")), None)
    if ns is None:
        raise _bad(f"the root element is {root.tag[:80]!r}, not an OVF Envelope")
    check_required(root, ns, data)
    info = OvfInfo()
    for f in root.findall(f"{{{ns}}}References/{{{ns}}}File"):
        fid, href = _attr(f, "id", ns), _attr(f, "href", ns)
        if not fid or not _ID.match(fid) or href is None:
            raise _bad("a References/File without a valid id and href")
        if fid in info.files:
            raise _bad(f"File id {fid!r} appears twice")
        comp = _attr(f, "compression", ns)
        if comp not in (None, "identity", "gzip"):
            raise _unsupported(
                f"File {fid!r} is compressed with {comp[:20]!r}; only gzip (or none) is read: write the "
                "OVA with uncompressed or gzip-compressed disks"
            )
        if _attr(f, "chunkSize", ns) is not None:
            raise _unsupported(
                f"File {fid!r} is split into chunks (ovf:chunkSize), which no importer here joins: write "
                "the OVA without chunking (one member per disk)"
            )
        size = _attr(f, "size", ns)
        info.files[fid] = {
            "href": href,
            "size": _int(size, "File size") if size is not None else None,
            "gzip": comp == "gzip",
        }
    disks: dict[str, dict[str, Any]] = {}
    booted: list[str] = []
    for d in (d for s in _sections(root, ns, "DiskSection") for d in s.findall(f"{{{ns}}}Disk")):
        did, ref = _attr(d, "diskId", ns), _attr(d, "fileRef", ns)
        if not did or not _ID.match(did):
            raise _bad("a Disk without a valid diskId")
        if did in disks:
            raise _bad(f"diskId {did!r} appears twice")
        if ref is None:
            raise _bad(f"disk {did!r} has no fileRef (empty disks are not imported)")
        if ref not in info.files:
            raise _bad(f"disk {did!r} refers to file {ref[:80]!r}, which References does not list")
        scale = _units(_attr(d, "capacityAllocationUnits", ns))
        capacity = _int(_attr(d, "capacity", ns), "Disk capacity") * scale
        disks[did] = {"id": did, "file": ref, "capacity": capacity, "unit": scale}
        # oVirt's mark of the VM's boot disk, and XenCenter's (the VBD's bootable flag)
        marks = (_attr(d, "boot", ns), _attr(d, "isBootable", XENOVF_NS))
        if "true" in ((mark or "").strip() for mark in marks):
            booted.append(did)
    if not disks:
        raise _bad("it lists no disk")
    if len(disks) > MAX_DISKS:
        raise _bad(f"{len(disks)} disks (at most {MAX_DISKS})")
    order: list[str] = []
    instances: dict[str, str | None] = {}  # disk items' InstanceID → the disk they hold
    vs = next(iter(_sections(root, ns, "VirtualSystem")), None)
    if vs is None:
        raise _bad("it has no VirtualSystem (collections of several VMs are not imported)")
    oss = next(iter(_sections(vs, ns, "OperatingSystemSection")), None)
    if oss is not None:
        info.os_type = _attr(oss, "osType", VMW_NS) or _attr(oss, "id", ns)
    hw = next(iter(_sections(vs, ns, "VirtualHardwareSection")), None)
    if hw is not None:
        for item in hw.findall(f"{{{ns}}}Item"):
            kind = (item.findtext(_q(RASD_NS, "ResourceType")) or "").strip()
            qty = item.findtext(_q(RASD_NS, "VirtualQuantity"))
            if kind == "3" and qty is not None:
                info.cpus = _int(qty, "CPU count")
            elif kind == "4" and qty is not None:
                unit = item.findtext(_q(RASD_NS, "AllocationUnits")) or "byte * 2^20"
                info.memory_mib = _int(qty, "memory") * _units(unit) >> 20
            elif kind in ("17", "19"):  # a disk drive; XenCenter's "Hard Disk Image" is a storage extent
                did = _disk_item(item.findtext(_q(RASD_NS, "HostResource")), disks, order)
                # OVF 0.9 spells it InstanceId
                iid = item.findtext(_q(RASD_NS, "InstanceID")) or item.findtext(_q(RASD_NS, "InstanceId"))
                instances[(iid or "").strip()] = did
        # OVF 2.x puts disks in StorageItem elements of the CIM storage namespace (VirtualBox 2.0 export)
        for sasd in (SASD_NS, SASD_NS + ".xsd"):
            for item in hw.findall(f"{{{ns}}}StorageItem"):
                if (item.findtext(_q(sasd, "ResourceType")) or "").strip() == "17":
                    _disk_item(item.findtext(_q(sasd, "HostResource")), disks, order)
        for cfg in hw.findall(f"{{{VMW_NS}}}Config"):
            if _attr(cfg, "key", VMW_NS) == "firmware":
                info.firmware = (_attr(cfg, "value", VMW_NS) or "").lower() or None
    if info.firmware is None:
        info.firmware = _BIOS_TYPES.get((vs.findtext(_q(ns, "BiosType")) or "").strip())
    if info.firmware is None and hw is not None:
        info.firmware = _xen_firmware(hw)
    # VMware marks the boot device: the first disk-type vmw:BootOrderSection names its disk item
    for boot in vs.findall(f"{{{VMW_NS}}}BootOrderSection"):
        if _attr(boot, "type", VMW_NS) == "disk":
            did = instances.get((_attr(boot, "instanceId", VMW_NS) or "").strip())
            if did is not None:
                order.remove(did)
                order.insert(0, did)
                booted = []
            break
    order += [d for d in disks if d not in order]
    if len(booted) == 1:  # else VMware's mark, or no single disk marked: the hardware section's order
        order.remove(booted[0])
        order.insert(0, booted[0])
    info.disks = [disks[d] for d in order]
    return info


def _declared_utf16(data: bytes) -> bytes:
    """``data`` with a UTF-16 encoding declaration its 8-bit bytes belie renamed ``utf-8`` (module
    docstring); any other document as it is. Renamed in place, so offsets in a parse error still hold."""
    m = _UTF16_DECLARED.match(data)
    if m is None:
        return data
    quote, pad = data[m.end(1) : m.end(1) + 1], b" " * (len(m.group(1)) - 5)  # spaces after the quote
    return data[: m.start(1)] + b"utf-8" + quote + pad + data[m.end(1) + 1 :]


def _xen_firmware(hw: ET.Element) -> str | None:
    """The firmware XenCenter's ``HVM_boot_params`` setting names (``order=cd;firmware=uefi``): ``efi``
    for ``uefi``, ``bios`` for ``bios``; None without one."""
    for data in hw.findall(_q(XENOVF_NS, "VirtualSystemOtherConfigurationData")):
        if (data.get("Name") or "").strip() != "HVM_boot_params":
            continue
        params = dict(p.partition("=")[::2] for p in (data.findtext(_q(XENOVF_NS, "Value")) or "").split(";"))
        return _XEN_FIRMWARE.get(params.get("firmware", "").strip().lower())
    return None


def _sections(parent: ET.Element, ns: str, name: str) -> list[ET.Element]:
    """The children of ``parent`` that are the section ``name``, named (``<DiskSection>``) or generic
    (``<Section xsi:type="ovf:DiskSection_Type">``, OVF 0.9's form, which 1.x also allows)."""
    return [el for el in parent if section_name(el, ns) == name]


def _disk_item(resource: str | None, disks: dict[str, dict[str, Any]], order: list[str]) -> str | None:
    """Append the disk a disk item's ``HostResource`` names (``ovf:/disk/ID``, ``/disk/ID``) to ``order``;
    that disk's id (None when it names none)."""
    did = (resource or "").strip().removeprefix("ovf:").removeprefix("/disk/")
    if did not in disks:
        return None
    if did not in order:
        order.append(did)
    return did


# ----------------------------------------------------------------------------------- the confined child


def main() -> int:
    """The parser child: the descriptor on stdin, one JSON line on stdout (``{"ovf": …}`` or ``{"error":
    code, "message": …}``)."""
    data = sys.stdin.buffer.read(MAX_OVF_BYTES + 1)
    try:
        out: dict[str, Any] = {"ovf": parse(data).to_dict()}
    except ImageRejected as exc:
        out = {"error": exc.code, "message": exc.message}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def parse_confined(data: bytes, limits: Limits, *, workdir: Path | None = None) -> OvfInfo:
    """:func:`parse` in a confined child (module docstring); ``UnsafeImage.ResourceLimit`` when a limit
    stopped it (an entity bomb a parser let through, a huge document)."""
    if len(data) > MAX_OVF_BYTES:
        raise _bad(f"{len(data)} bytes (at most {MAX_OVF_BYTES})")
    result = run_parser(__name__, data, limits, what="OVF parser", failed=_bad, workdir=workdir)
    return OvfInfo(**result["ovf"])
