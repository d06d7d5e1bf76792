"""Windows guests: version, edition and architecture from the SOFTWARE hive and the system binaries."""

from __future__ import annotations

import struct
from typing import Any

from .reader import registry_values
from .safefs import GuestFS
from .volumes import Analysis, Volume

_PE_MACHINES = {0x14C: "i386", 0x8664: "x86_64", 0xAA64: "arm64"}


def analyze_windows(root: Volume, fs: GuestFS, volumes: list[Volume], a: Analysis) -> None:
    """The Windows side of the report: version, edition, architecture (with findings)."""
    r = a.report
    r["os"]["family"] = "windows"
    values: dict[str, Any] = {}
    try:  # opening can fail too (damaged MFT record or data runs): the same "unreadable hive" finding
        hive = fs.open("/Windows/System32/config/SOFTWARE")
        if hive is not None:
            values = registry_values(hive, "Microsoft\\Windows NT\\CurrentVersion")
    except Exception:
        values = {}
    if values:
        build = str(values.get("CurrentBuild") or values.get("CurrentBuildNumber") or "")
        major, minor = values.get("CurrentMajorVersionNumber"), values.get("CurrentMinorVersionNumber")
        version = f"{major}.{minor}" if major is not None else str(values.get("CurrentVersion") or "")
        product = str(values.get("ProductName") or "Windows")
        if product.startswith("Windows 10") and build.isdigit() and int(build) >= 22000:
            product = "Windows 11" + product[len("Windows 10") :]  # Windows 11 still says 10 here
        display = values.get("DisplayVersion") or values.get("ReleaseId")
        r["os"].update(
            distribution="windows",
            version=f"{version}.{build}".strip("."),
            pretty_name=f"{product} {display}" if display else product,
            edition=values.get("EditionID"),
            installation_type=values.get("InstallationType"),
        )
    else:
        a.add(
            "Guest.OsVersionUnknown",
            "the Windows SOFTWARE registry hive is missing or unreadable: check "
            "the disk (chkdsk) and that Windows shut down cleanly (no hibernation, Fast Startup off)",
        )
    r["os"]["architecture"] = _pe_machine(fs.read("/Windows/System32/ntoskrnl.exe", 4096))

    configs = []
    for vol in volumes:
        if vol.fs is None:
            continue
        if vol.fs.is_file("/bootmgr"):
            configs.append(f"partition {vol.number}:/bootmgr")
        if vol.entry["esp"] and vol.fs.is_file("/EFI/Microsoft/Boot/bootmgfw.efi"):
            configs.append("esp:/EFI/Microsoft/Boot/bootmgfw.efi")
    r["bootloader"] = {"type": "bootmgr", "configs": configs} if configs else None
    if not configs:
        a.add(
            "Guest.NoBootloader",
            "no Windows boot manager (\\bootmgr or \\EFI\\Microsoft\\Boot\\bootmgfw.efi) "
            "was found: repair it in the guest (bcdboot C:\\Windows) before exporting",
        )


def _pe_machine(data: bytes | None) -> str | None:
    if not data or len(data) < 64 or data[:2] != b"MZ":
        return None
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if pe + 6 > len(data) or data[pe : pe + 4] != b"PE\0\0":
        return None
    return _PE_MACHINES.get(struct.unpack_from("<H", data, pe + 4)[0])
