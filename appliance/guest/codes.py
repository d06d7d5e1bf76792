"""The ``Guest.*`` finding codes: a stable public contract (README, API status messages, policies).

:data:`CODES` is the table the README lists: for each code its default severity, whether it is about
*booting* (such findings are only informational for data disks: ``bootable=False``), what it means and
what to do. A finding's message is the specific remediation sentence for the image at hand; the table's
``remediation`` is the generic one. :func:`markdown_table` renders the table for the README.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Finding, Severity


@dataclass(frozen=True)
class Code:
    """One row of the code table."""

    code: str
    severity: Severity
    boot: bool
    meaning: str
    remediation: str


_ROWS = (
    Code(
        "Guest.Unreadable",
        Severity.ERROR,
        False,
        "The image (or a partition of it) could not be read as a disk: damaged, truncated, an unreadable "
        "container, or the reader hit its CPU, memory or time limit.",
        "Re-export the disk as a single self-contained file and check it with `qemu-img check`; for a "
        "genuinely huge guest raise limits.guest_probe_* in the configuration.",
    ),
    Code(
        "Guest.ExternalReference",
        Severity.ERROR,
        False,
        "The image names another file that holds part of the disk (a qcow2 backing or data file, a VMDK "
        "parent or extent file, a differencing VHD, VHDX or VDI parent); that file is never opened, so the "
        "image cannot be judged on its own. An error for data disks too.",
        "Flatten the disk into one self-contained file (e.g. `qemu-img convert` of the child image) and "
        "upload that.",
    ),
    Code(
        "Guest.NoPartitionTable",
        Severity.INFO,
        True,
        "The image is a bare filesystem without a partition table (layout `partition`).",
        "Import it with a kernel and ramdisk (hypervisor paravirtual), or import a whole-disk image "
        "with a partition table and a bootloader.",
    ),
    Code(
        "Guest.NoFilesystem",
        Severity.ERROR,
        True,
        "No partition (nor the whole image) holds a filesystem the validator recognises.",
        "Check that the right disk was exported (not an empty or encrypted one) and that it is not "
        "an LVM or RAID member of a larger set.",
    ),
    Code(
        "Guest.UnsupportedFilesystem",
        Severity.WARNING,
        True,
        "A partition holds a filesystem or volume format outside ext2/3/4, xfs, btrfs, vfat and ntfs "
        "(e.g. LVM, LUKS, squashfs); an error when no supported filesystem is left to check.",
        "Move the root and /boot filesystems to ext4, xfs, btrfs or ntfs (no LVM or encryption), or "
        "import the disk as a data volume.",
    ),
    Code(
        "Guest.NoBootablePartition",
        Severity.ERROR,
        True,
        "Neither BIOS (MBR boot code, an active partition or a GPT BIOS boot partition) nor UEFI (an "
        "EFI system partition) can start this disk.",
        "Install a bootloader (e.g. `grub-install` for BIOS) and mark the boot partition active, or add "
        "an EFI system partition with a fallback loader.",
    ),
    Code(
        "Guest.UefiNoFallbackLoader",
        Severity.ERROR,
        True,
        "There is an EFI system partition but no fallback loader \\EFI\\BOOT\\BOOTX64.EFI (BOOTAA64.EFI, "
        "BOOTIA32.EFI); firmware NVRAM entries do not travel with the disk. A warning when BIOS boot works.",
        "Install the removable-media loader (e.g. `grub-install --removable` or copy shimx64.efi to "
        "\\EFI\\BOOT\\BOOTX64.EFI) before exporting.",
    ),
    Code(
        "Guest.OsUnknown",
        Severity.ERROR,
        True,
        "No root filesystem with a Linux (/etc/os-release, /etc/fstab) or Windows (\\Windows\\System32) "
        "installation was found.",
        "Export the system disk rather than a data disk, or import this one as a data volume "
        "(ImportSnapshot/ImportVolume).",
    ),
    Code(
        "Guest.OsVersionUnknown",
        Severity.WARNING,
        True,
        "An operating system was found but not its distribution or version (no os-release, unreadable "
        "SOFTWARE hive).",
        "Restore /etc/os-release (or /usr/lib/os-release) on Linux; check the Windows registry hives "
        "are intact.",
    ),
    Code(
        "Guest.FstabMissing",
        Severity.WARNING,
        True,
        "The Linux root filesystem has no /etc/fstab.",
        "Add an /etc/fstab that mounts the root filesystem by UUID=.",
    ),
    Code(
        "Guest.FstabDeviceMissing",
        Severity.ERROR,
        True,
        "An /etc/fstab entry names a device (UUID=, LABEL=, PARTUUID=, /dev/…) that is not on this disk; "
        "the guest would stop in emergency mode. A warning for nofail/noauto entries and swap.",
        "Fix the entry to the UUID of a filesystem on this disk (`blkid`), add `nofail`, or remove it.",
    ),
    Code(
        "Guest.FstabDeviceName",
        Severity.WARNING,
        True,
        "An /etc/fstab entry names a kernel device (/dev/sda1, /dev/xvda1, …) that changes with the "
        "disk controller (virtio, NVMe).",
        "Refer to the filesystem by UUID= or LABEL= instead of the device name.",
    ),
    Code(
        "Guest.NoKernel",
        Severity.ERROR,
        True,
        "No kernel (vmlinuz-*, vmlinux-*, kernel-*) was found in /boot (or the ESP). A warning for "
        "partition images, which may boot with a kernel given at import.",
        "Install a kernel package in the guest, or import with a kernel reference.",
    ),
    Code(
        "Guest.NoInitrd",
        Severity.WARNING,
        True,
        "No initial ramdisk (initrd.img-*, initramfs-*) was found next to the kernels; most "
        "distributions need one to load virtio/NVMe drivers.",
        "Regenerate it in the guest (`update-initramfs -c -k all` or `dracut --regenerate-all`).",
    ),
    Code(
        "Guest.NoBootloader",
        Severity.ERROR,
        True,
        "No bootloader configuration (grub.cfg, menu.lst, extlinux.conf, systemd-boot entries; Windows "
        "bootmgr) was found. Informational for partition images.",
        "Install and configure the bootloader in the guest (e.g. `grub-install` then `update-grub`).",
    ),
    Code(
        "Guest.PlatformMismatch",
        Severity.ERROR,
        False,
        "The request's Platform (Linux/Windows) differs from the operating system found.",
        "Correct the Platform parameter of the import request, or import the intended disk.",
    ),
    Code(
        "Guest.ArchitectureMismatch",
        Severity.ERROR,
        False,
        "The request's architecture differs from the guest's binaries.",
        "Correct the Architecture parameter of the import request, or import the intended disk.",
    ),
    Code(
        "Guest.PartitionImageNeedsKernel",
        Severity.ERROR,
        False,
        "A partition image (a bare filesystem) has no bootloader of its own; it boots only paravirtual, "
        "with a kernel and ramdisk the cloud supplies. As hvm it cannot boot.",
        "Import it with virtualization type paravirtual and a KernelId (and RamdiskId), or import a full "
        "disk image with a partition table and a bootloader.",
    ),
    Code(
        "Guest.NoRootFilesystem",
        Severity.ERROR,
        False,
        "A kernel (paravirtual boot) was requested, but the image holds no root filesystem for it to mount "
        "(no /etc/os-release, /etc/fstab or /sbin/init on any readable filesystem).",
        "Import the partition that holds the guest's root filesystem, or drop KernelId for a data disk.",
    ),
    Code(
        "Guest.BootModeMismatch",
        Severity.ERROR,
        True,
        "The boot mode asked for (the request's BootMode, or an OVA's firmware `efi`) is one the boot disk "
        "cannot boot in: uefi for a disk with no UEFI loader on an EFI system partition, legacy-bios for a "
        "disk with no BIOS boot code.",
        "Import with the boot mode the disk has (or none, to let the disk decide), or install the missing "
        "bootloader (an ESP with /EFI/BOOT/BOOTX64.EFI for UEFI) and export the disk again.",
    ),
)

#: code → row; the README's table of guest findings is generated from this
CODES: dict[str, Code] = {row.code: row for row in _ROWS}


def finding(code: str, message: str, severity: Severity | str | None = None) -> Finding:
    """A finding of a known ``code`` (its default severity unless ``severity`` is given)."""
    row = CODES[code]
    return Finding(code, Severity(severity) if severity is not None else row.severity, message)


def for_data_disk(f: Finding) -> Finding:
    """``f`` as it matters for a data disk: boot findings become info, an unreadable disk a warning."""
    row = CODES.get(f.code)
    if row is None or f.severity is Severity.INFO:
        return f
    if row.boot:
        return Finding(f.code, Severity.INFO, f.message)
    if f.code == "Guest.Unreadable":
        return Finding(f.code, Severity.WARNING, f.message)
    return f


def markdown_table() -> str:
    """The code table as Markdown (for the README)."""
    lines = ["| code | severity | boot | meaning | remediation |", "|---|---|---|---|---|"]
    for row in _ROWS:
        boot = "yes" if row.boot else "no"
        lines.append(f"| `{row.code}` | {row.severity} | {boot} | {row.meaning} | {row.remediation} |")
    return "\n".join(lines)
