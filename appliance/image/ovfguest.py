"""What an OVF descriptor says about its guest, in the terms of an import request.

An OVA's ``OperatingSystemSection`` (``vmw:osType``, else the CIM ``OSType`` number ``ovf:id``) and its
``vmw:Config firmware`` (``ova-ovf.md`` §4.1-4.2) are the VM's own description: an ImportImage of an OVA
checks them against the boot disk as it checks a request's ``Platform`` and ``BootMode``
(:func:`appliance.guest.validate.check_request`). Anything not recognised says nothing (None).
"""

from __future__ import annotations

#: CIM ``OSType`` ids (``ova-ovf.md`` §4.2, the ``CIM_OperatingSystem`` ValueMap): Linux distributions
#: (36 LINUX, 79-80 RHEL, 82-85 SUSE and SLES, 87 Novell Linux Desktop, 89-90 Mandriva, 91-92 TurboLinux,
#: 93-96 Ubuntu and Debian, 97-101 Linux 2.4/2.6/64-bit, 106-109 CentOS and Oracle Linux) and Windows
#: releases (16-18 95/98/NT, 58 2000, 63 Me, 67 XP, 69-70 Server 2003, 71-72 XP 64-bit and Embedded, 73-74
#: Vista, 75 Embedded for Point of Service, 76-77 Server 2008, 103 2008 R2, 105 7, 111-123 Server 2011 to
#: 2022 and 8 to 11: oVirt's export labels some of these with another Windows release than CIM does, still
#: Windows). Others (1 Other, 42/78 FreeBSD, 102 Other 64-bit, …) and numbers CIM lacks say nothing
_CIM_LINUX = frozenset({36, 79, 80, 82, 83, 84, 85, 87, *range(89, 102), 106, 107, 108, 109})
_CIM_WINDOWS = frozenset({16, 17, 18, 58, 63, 67, *range(69, 78), 103, 105, *range(111, 124)})
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
