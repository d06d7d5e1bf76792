"""The OVF descriptor of an exported OVA (:func:`envelope`).

The OVF 1.x namespace (``…/envelope/1``, the one every reader knows), in the element order VMware's
``ova-compose`` writes (``ova-ovf.md`` §4.4, §7): ``References`` (one ``File`` per disk with ``href``,
``id``, ``size``), ``DiskSection`` (``capacity`` in bytes, ``populatedSize``, the streamOptimized format
URI), ``NetworkSection``, and one ``VirtualSystem`` with an ``OperatingSystemSection`` and a
``VirtualHardwareSection``: CPUs (3), memory (4, MiB), a SCSI controller (6, ``lsilogic``) per 15 disks, a
disk item (17) per disk (units 0-6, 8-15: :func:`scsi_slot`), one NIC (10), and ``vmw:Config firmware``
(``efi`` when the guest validated as UEFI, else ``bios``). The ``rasd:`` children of each item are sorted
by tag, as the CIM schema's sequence requires. Reading an untrusted descriptor is
:mod:`appliance.image.ovf`'s.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from .ovf import OVF_NS, RASD_NS, VMW_NS, VSSD_NS, XSI_NS

STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
#: CIM OSType ids by the appliance's platform names (``ova-ovf.md`` §4.2)
OS_TYPES = {"linux": (101, "other4xLinux64Guest"), "windows": (112, "windows8Server64Guest")}

for _prefix, _uri in (
    ("ovf", OVF_NS),
    ("rasd", RASD_NS),
    ("vssd", VSSD_NS),
    ("vmw", VMW_NS),
    ("xsi", XSI_NS),
):
    ET.register_namespace(_prefix, _uri)


@dataclass(frozen=True)
class OvfDisk:
    """One disk of an exported OVA: its member name, size in the package, capacity and data bytes."""

    href: str
    size: int
    capacity: int
    populated: int = 0


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def _item(parent: ET.Element, fields: dict[str, str]) -> None:
    item = ET.SubElement(parent, _q(OVF_NS, "Item"))
    for tag in sorted(fields):
        ET.SubElement(item, _q(RASD_NS, tag)).text = fields[tag]


#: disks per SCSI controller: its 16 targets but 7, the controller's own
DISKS_PER_SCSI = 15


def scsi_slot(index: int) -> tuple[int, int]:
    """``(controller, unit)`` of the disk at ``index`` (0: the boot disk): 15 disks per controller on units
    0-6 and 8-15 (VMware reserves unit 7 of a SCSI bus for the controller and refuses a disk there)."""
    controller, unit = divmod(index, DISKS_PER_SCSI)
    return controller, unit if unit < 7 else unit + 1


def envelope(
    name: str,
    disks: list[OvfDisk],
    *,
    cpus: int = 1,
    memory_mib: int = 1024,
    firmware: str = "bios",
    platform: str = "linux",
    hw_version: str = "vmx-10",
) -> bytes:
    """The OVF descriptor of a VM ``name`` with ``disks`` (the first is the boot disk)."""
    if not disks:
        raise ValueError("an OVA needs at least one disk")
    if firmware not in ("bios", "efi"):
        raise ValueError(f"firmware {firmware!r}: bios or efi")
    env = ET.Element(_q(OVF_NS, "Envelope"))
    refs = ET.SubElement(env, _q(OVF_NS, "References"))
    section = ET.SubElement(env, _q(OVF_NS, "DiskSection"))
    ET.SubElement(section, _q(OVF_NS, "Info")).text = "Virtual disk information"
    for i, d in enumerate(disks, 1):
        ET.SubElement(
            refs,
            _q(OVF_NS, "File"),
            {_q(OVF_NS, "href"): d.href, _q(OVF_NS, "id"): f"file{i}", _q(OVF_NS, "size"): str(d.size)},
        )
        ET.SubElement(
            section,
            _q(OVF_NS, "Disk"),
            {
                _q(OVF_NS, "capacity"): str(d.capacity),
                _q(OVF_NS, "capacityAllocationUnits"): "byte",
                _q(OVF_NS, "diskId"): f"vmdisk{i}",
                _q(OVF_NS, "fileRef"): f"file{i}",
                _q(OVF_NS, "format"): STREAM_OPTIMIZED,
                _q(OVF_NS, "populatedSize"): str(d.populated),
            },
        )
    nets = ET.SubElement(env, _q(OVF_NS, "NetworkSection"))
    ET.SubElement(nets, _q(OVF_NS, "Info")).text = "The list of logical networks"
    net = ET.SubElement(nets, _q(OVF_NS, "Network"), {_q(OVF_NS, "name"): "VM Network"})
    ET.SubElement(net, _q(OVF_NS, "Description")).text = "The VM Network network"
    vs = ET.SubElement(env, _q(OVF_NS, "VirtualSystem"), {_q(OVF_NS, "id"): name})
    ET.SubElement(vs, _q(OVF_NS, "Info")).text = "A virtual machine"
    ET.SubElement(vs, _q(OVF_NS, "Name")).text = name
    os_id, vmw_type = OS_TYPES.get(platform, OS_TYPES["linux"])
    oss = ET.SubElement(
        vs,
        _q(OVF_NS, "OperatingSystemSection"),
        {_q(OVF_NS, "id"): str(os_id), _q(VMW_NS, "osType"): vmw_type},
    )
    ET.SubElement(oss, _q(OVF_NS, "Info")).text = "The kind of installed guest operating system"
    hw = ET.SubElement(vs, _q(OVF_NS, "VirtualHardwareSection"))
    ET.SubElement(hw, _q(OVF_NS, "Info")).text = "Virtual hardware requirements"
    system = ET.SubElement(hw, _q(OVF_NS, "System"))
    for tag, text in (
        ("ElementName", "Virtual Hardware Family"),
        ("InstanceID", "0"),
        ("VirtualSystemIdentifier", name),
        ("VirtualSystemType", hw_version),
    ):
        ET.SubElement(system, _q(VSSD_NS, tag)).text = text
    _item(
        hw,
        {
            "AllocationUnits": "hertz * 10^6",
            "ElementName": f"{cpus} virtual CPU(s)",
            "InstanceID": "1",
            "ResourceType": "3",
            "VirtualQuantity": str(cpus),
        },
    )
    _item(
        hw,
        {
            "AllocationUnits": "byte * 2^20",
            "ElementName": f"{memory_mib}MB of memory",
            "InstanceID": "2",
            "ResourceType": "4",
            "VirtualQuantity": str(memory_mib),
        },
    )
    slots = [scsi_slot(j) for j in range(len(disks))]
    controllers = slots[-1][0] + 1
    for c in range(controllers):
        _item(
            hw,
            {
                "Address": str(c),
                "ElementName": f"SCSI Controller {c}",
                "InstanceID": str(3 + c),
                "ResourceSubType": "lsilogic",
                "ResourceType": "6",
            },
        )
    for i, (c, unit) in enumerate(slots, 1):
        _item(
            hw,
            {
                "AddressOnParent": str(unit),
                "ElementName": f"Hard Disk {i}",
                "HostResource": f"ovf:/disk/vmdisk{i}",
                "InstanceID": str(2 + controllers + i),
                "Parent": str(3 + c),
                "ResourceType": "17",
            },
        )
    _item(
        hw,
        {
            "AutomaticAllocation": "true",
            "Connection": "VM Network",
            "ElementName": "Network adapter 1",
            "InstanceID": str(3 + controllers + len(disks)),
            "ResourceSubType": "VmxNet3",
            "ResourceType": "10",
        },
    )
    ET.SubElement(
        hw,
        _q(VMW_NS, "Config"),
        {_q(OVF_NS, "required"): "false", _q(VMW_NS, "key"): "firmware", _q(VMW_NS, "value"): firmware},
    )
    ET.indent(env)
    return ET.tostring(env, encoding="utf-8", xml_declaration=True) + b"\n"
