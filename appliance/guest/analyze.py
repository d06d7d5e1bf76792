"""What is on a guest disk and whether it can boot: layout, partitions, boot mode, OS, findings.

Runs in the limited child (:mod:`appliance.guest.probe`). Works on the library-neutral view from
:mod:`.reader` through :mod:`.safefs` (confined, bounded reads; nothing walks a tree). A failure inside
one partition becomes a ``Guest.Unreadable`` warning for that partition; the rest is still analysed.

The volumes and the accumulating report are :mod:`.volumes`; the operating systems' own parts
:mod:`.linux` and :mod:`.windows`.
"""

from __future__ import annotations

from typing import Any

from .linux import analyze_linux
from .reader import Disk
from .safefs import GuestFS
from .volumes import Analysis, Volume, filesystem_findings, open_volumes
from .windows import analyze_windows

#: btrfs subvolumes distributions put the root filesystem in
ROOT_SUBVOLUMES = ("@", "root", "@rootfs")
_UEFI_LOADERS = {"BOOTX64.EFI": "x86_64", "BOOTAA64.EFI": "arm64", "BOOTIA32.EFI": "i386"}


# --- boot mode ------------------------------------------------------------------------------------


def _boot_mode(disk: Disk, volumes: list[Volume], a: Analysis) -> dict[str, Any]:
    """BIOS and UEFI bootability of a partitioned disk, with findings."""
    bios = disk.boot_code or any(v.entry["bootable"] or v.entry["bios_boot"] for v in volumes)
    esps = [v for v in volumes if v.entry["esp"]]
    loaders: list[str] = []
    for v in esps:
        if v.fs is None:
            continue
        for name in v.fs.listdir("/EFI/BOOT", 64):
            if name.upper() in _UEFI_LOADERS and v.fs.is_file(f"/EFI/BOOT/{name}"):
                loaders.append(f"\\EFI\\BOOT\\{name.upper()}")
    uefi = bool(loaders)
    mode = "bios+uefi" if bios and uefi else "bios" if bios else "uefi" if uefi else None
    if esps and not uefi:
        # Windows Boot Manager on the ESP: the grub/shim advice would be wrong for this guest
        windows = any(v.fs is not None and v.fs.is_file("/EFI/Microsoft/Boot/bootmgfw.efi") for v in esps)
        a.add(
            "Guest.UefiNoFallbackLoader",
            "the EFI system partition has no fallback loader \\EFI\\BOOT\\BOOTX64.EFI (BOOTAA64.EFI on arm64)"
            + ("; UEFI boot will fail, BIOS boot may still work" if bios else "; the disk will not boot")
            + (
                ": copy \\EFI\\Microsoft\\Boot\\bootmgfw.efi to \\EFI\\BOOT\\BOOTX64.EFI (in the guest, "
                "`bcdboot C:\\Windows /f UEFI` does this)"
                if windows
                else ": install it (e.g. `grub-install --removable`, or copy shimx64.efi to "
                "\\EFI\\BOOT\\BOOTX64.EFI)"
            ),
            "warning" if bios else "error",
        )
    if not bios and not esps:
        a.add(
            "Guest.NoBootablePartition",
            "no partition is marked bootable, the MBR has no boot code and there is no EFI system partition: "
            "install a bootloader (grub-install on Linux, `bcdboot C:\\Windows /f ALL` on Windows) and mark "
            "the boot partition active, or import this disk as a data volume",
        )
    return {"boot_mode": mode, "uefi_loaders": loaders}


# --- roots ----------------------------------------------------------------------------------------


def _find_root(volumes: list[Volume]) -> tuple[str, Volume, GuestFS, str | None] | None:
    """(family, volume, filesystem, btrfs subvolume) of the first Linux or Windows root."""
    for vol in volumes:
        if vol.fs is None:
            continue
        candidates: list[tuple[str | None, GuestFS]] = [(None, vol.fs)]
        if vol.fs.kind == "btrfs":
            candidates += [(n, GuestFS(f)) for n, f in vol.fs.fs.subvolumes(ROOT_SUBVOLUMES)]
        for sub, fs in candidates:
            if fs.is_dir("/etc") and any(
                fs.is_file(p) for p in ("/etc/os-release", "/usr/lib/os-release", "/etc/fstab")
            ):
                return "linux", vol, fs, sub
            if fs.kind == "ntfs" and fs.is_dir("/Windows/System32"):
                return "windows", vol, fs, sub
    return None


def analyze(disk: Disk) -> dict[str, Any]:
    """The guest report (plain JSON, findings as dicts) of an opened disk."""
    a = Analysis()
    r = a.report
    r.update(
        layout="unknown",
        partition_table=disk.table,
        partitions=[],
        boot_mode=None,
        uefi_loaders=[],
        os={"family": None, "distribution": None, "version": None, "pretty_name": None, "architecture": None},
        root=None,
        kernels=[],
        initrds=[],
        bootloader=None,
        fstab=[],
    )
    volumes = open_volumes(disk, a)
    bare = disk.table is None
    r["partitions"] = [{k: v for k, v in vol.entry.items() if k != "supported"} for vol in volumes]
    if bare:
        recognised = volumes and volumes[0].entry["filesystem"] is not None
        r["layout"] = "partition" if recognised else "unknown"
        if recognised:
            a.add(
                "Guest.NoPartitionTable",
                "the image is a bare filesystem (layout partition): import it with "
                "a kernel and ramdisk (hypervisor paravirtual) or as a data volume",
            )
        else:
            r["partitions"] = []
    else:
        r["layout"] = "disk"
    has_fs = filesystem_findings(volumes, a)
    if not bare:
        r.update(_boot_mode(disk, volumes, a))
    root = _find_root(volumes) if has_fs else None
    if root is None:
        if has_fs:
            a.add(
                "Guest.OsUnknown",
                "no Linux (/etc/os-release, /etc/fstab) or Windows (\\Windows\\System32) "
                "installation was found: export the system disk, or import this one as a data volume",
            )
    else:
        family, vol, fs, sub = root
        r["root"] = {"partition": vol.number, "filesystem": fs.kind}
        if sub:
            r["root"]["subvolume"] = sub
        try:
            if family == "linux":
                analyze_linux(vol, fs, volumes, bare, a)
            else:
                analyze_windows(vol, fs, volumes, a)
        except Exception as exc:  # a damaged structure deep in the root: report what we have
            a.add(
                "Guest.Unreadable",
                f"the root filesystem could not be read completely ({type(exc).__name__}: "
                f"{exc}); the results are incomplete",
                "warning",
            )
    r["findings"] = [f.to_dict() for f in a.findings]
    return r
