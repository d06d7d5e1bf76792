"""What an OVF descriptor says about its guest, in the terms of an import request.

An OVA's ``OperatingSystemSection`` (``vmw:osType``, else the CIM ``OSType`` number ``ovf:id``) and its
``vmw:Config firmware`` (``ova-ovf.md`` §4.1-4.2) are the VM's own description: an ImportImage of an OVA
checks them against the boot disk as it checks a request's ``Platform`` and ``BootMode``
(:func:`appliance.guest.validate.check_request`). Anything not recognised says nothing (None).
"""

from __future__ import annotations

#: CIM ``OSType`` ids (``ova-ovf.md`` §4.2): Linux distributions and Windows releases
_CIM_LINUX = frozenset({36, 79, 80, 93, 94, 95, 96, 99, 100, 101, 106, 107, 108, 109})
_CIM_WINDOWS = frozenset({103, 105, 112, 115, 116, 119, 120, 121, 122, 123})
#: substrings of VMware guest ids (``other4xLinux64Guest``, ``windows9Server64Guest``, ``ubuntu64Guest``)
_VMW_LINUX = (
    "linux", "ubuntu", "debian", "centos", "rhel", "sles", "suse", "fedora", "oracle", "photon",
    "coreos", "almalinux", "rocky", "amazonlinux", "asianux", "mandriva", "opensuse",
)  # fmt: skip
_VMW_WINDOWS = ("windows", "win2000", "winnet", "winxp", "winvista", "win7", "win8", "winlonghorn")


def platform_of(os_type: str | None) -> str | None:
    """``Linux`` or ``Windows`` for an OVF OS type (a VMware guest id or a CIM number), else None."""
    text = (os_type or "").strip().lower()
    if not text:
        return None
    if text.isdigit():
        number = int(text)
        return "Linux" if number in _CIM_LINUX else "Windows" if number in _CIM_WINDOWS else None
    if text.startswith(_VMW_WINDOWS):
        return "Windows"
    if any(name in text for name in _VMW_LINUX):
        return "Linux"
    return None


def boot_mode_of(firmware: str | None) -> str | None:
    """The ImportImage ``BootMode`` an OVF firmware asks for: ``efi`` → ``uefi``. ``bios`` (or no
    firmware) asks for nothing: it is what an OVF without a firmware entry means, so writers put it
    without deciding anything, and the disk's own boot mode is taken, as AWS does for an import
    without BootMode."""
    return "uefi" if (firmware or "").strip().lower() == "efi" else None
