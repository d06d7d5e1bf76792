"""What an OVF's OS type and firmware ask of guest validation (appliance/image/ovfguest.py)."""

from __future__ import annotations

import pytest

from appliance.image.ovfenvelope import OS_TYPES
from appliance.image.ovfguest import boot_mode_of, platform_of


@pytest.mark.parametrize(
    ("os_type", "platform"),
    [
        ("other4xLinux64Guest", "Linux"),
        ("ubuntu64Guest", "Linux"),
        ("rhel8_64Guest", "Linux"),
        ("windows9Server64Guest", "Windows"),
        ("winNetStandardGuest", "Windows"),
        ("101", "Linux"),
        ("36", "Linux"),
        ("112", "Windows"),
        ("123", "Windows"),
        ("1", None),
        ("otherGuest64", None),
        ("freebsd12_64Guest", None),
        ("", None),
        (None, None),
    ],
)
def test_an_ovf_os_type_names_the_platform_it_is_checked_as(
    os_type: str | None, platform: str | None
) -> None:
    assert platform_of(os_type) == platform


#: the CIM numbers oVirt's OVA export maps its OS ids to (``OvfOvaWriter.mapOsId``)
OVIRT_LINUX = [36, 79, 80, 83, 94, 96]
OVIRT_WINDOWS = [67, 69, 70, 76, 77, 103, 105, 113, 114, 115, 116, 117, 120, 121, 122]


@pytest.mark.parametrize("cim", OVIRT_LINUX + OVIRT_WINDOWS)
def test_every_os_type_ovirt_writes_names_its_platform(cim: int) -> None:
    assert platform_of(str(cim)) == ("Linux" if cim in OVIRT_LINUX else "Windows")


@pytest.mark.parametrize("cim", ["1", "42", "78", "102", "104", "110", "125", "999"])
def test_an_os_type_of_neither_platform_or_unknown_names_none(cim: str) -> None:
    # Other, FreeBSD (32/64-bit), Other 64-bit, VMware ESXi, eComStation, numbers CIM does not define
    assert platform_of(cim) is None


def test_the_os_types_the_project_writes_read_back_as_their_platform() -> None:
    for name, (cim, vmw) in OS_TYPES.items():
        assert platform_of(vmw) == platform_of(str(cim)) == name.capitalize()


def test_only_efi_firmware_asks_for_a_boot_mode() -> None:
    assert boot_mode_of("efi") == boot_mode_of(" EFI ") == "uefi"
    assert boot_mode_of("bios") is boot_mode_of(None) is boot_mode_of("ovmf") is None
