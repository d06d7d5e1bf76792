"""What is on a guest disk and whether it can boot: layout, partitions, boot mode, OS, findings.

Runs in the limited child (:mod:`appliance.guest.probe`). Works on the library-neutral view from
:mod:`.reader` through :mod:`.safefs` (confined, bounded reads; nothing walks a tree). A failure inside
one partition becomes a ``Guest.Unreadable`` warning for that partition; the rest is still analysed.
"""

from __future__ import annotations

import re
import shlex
import struct
from dataclasses import dataclass, field
from typing import Any

from ..errors import Finding, Severity
from .codes import finding
from .reader import Disk, UnsupportedFilesystem, open_filesystem, registry_values
from .safefs import GuestFS

#: partitions looked at, at most (a crafted chain of extended partitions can list thousands)
MAX_PARTITIONS = 128
#: btrfs subvolumes distributions put the root filesystem in
ROOT_SUBVOLUMES = ("@", "root", "@rootfs")
#: fstab types whose "device" is not a block device on this disk
_VIRTUAL_FS = {"proc", "sysfs", "tmpfs", "devpts", "devtmpfs", "nfs", "nfs4", "cifs", "smbfs", "9p"}
_ELF_MACHINES = {0x03: "i386", 0x3E: "x86_64", 0xB7: "arm64", 0x28: "arm", 0x16: "s390x", 0xF3: "riscv64"}
_PE_MACHINES = {0x14C: "i386", 0x8664: "x86_64", 0xAA64: "arm64"}
_UEFI_LOADERS = {"BOOTX64.EFI": "x86_64", "BOOTAA64.EFI": "arm64", "BOOTIA32.EFI": "i386"}
_KERNEL = re.compile(r"^(vmlinuz|vmlinux|kernel|bzImage)(-.+)?$")
_INITRD = re.compile(r"^(initrd|initramfs)([-.].+)?$")
_DEVNAME = re.compile(
    r"^/dev/(?:(?:[shv]d|xvd)([a-z]+)(\d*)|nvme(\d+)n(\d+)(?:p(\d+))?|mmcblk(\d+)(?:p(\d+))?)$"
)
_BY = {"by-uuid": "UUID", "by-label": "LABEL", "by-partuuid": "PARTUUID", "by-partlabel": "PARTLABEL"}


@dataclass
class Volume:
    """A partition (or the whole bare filesystem) and what it holds."""

    entry: dict[str, Any]
    fs: GuestFS | None = None
    partuuid: str | None = None
    partlabel: str | None = None

    @property
    def number(self) -> int | None:
        return self.entry["number"]


@dataclass
class Analysis:
    """Accumulates the report while the disk is examined."""

    findings: list[Finding] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def add(self, code: str, message: str, severity: Severity | str | None = None) -> None:
        self.findings.append(finding(code, message, severity))


def _where(vol: Volume) -> str:
    return f"partition {vol.number}" if vol.number is not None else "the filesystem"


def _open_volumes(disk: Disk, a: Analysis) -> list[Volume]:
    streams: list[tuple[dict[str, Any], Any, Any]] = []
    if disk.table is not None:
        parts = disk.partitions
        if len(parts) > MAX_PARTITIONS:
            a.add(
                "Guest.Unreadable",
                f"the partition table lists {len(parts)} partitions; only the first "
                f"{MAX_PARTITIONS} were examined",
                "warning",
            )
            parts = parts[:MAX_PARTITIONS]
        for p in parts:
            entry = {
                "number": p.number,
                "start": p.start,
                "size": p.size,
                "type": p.type,
                "type_name": p.type_name,
                "filesystem": None,
                "label": None,
                "uuid": None,
                "bootable": p.bootable,
                "esp": p.esp,
                "bios_boot": p.bios_boot,
            }
            streams.append((entry, p, lambda n=p.number: disk.open_partition(n)))
    else:
        entry = {
            "number": None,
            "start": 0,
            "size": disk.size,
            "type": None,
            "type_name": None,
            "filesystem": None,
            "label": None,
            "uuid": None,
            "bootable": False,
            "esp": False,
            "bios_boot": False,
        }
        streams.append((entry, None, disk.open_whole))
    volumes = []
    for entry, raw, opener in streams:
        vol = Volume(entry, partuuid=raw.partuuid if raw else None, partlabel=raw.name if raw else None)
        volumes.append(vol)
        try:
            fs = open_filesystem(opener())
        except UnsupportedFilesystem as exc:
            entry.update(filesystem=exc.name, label=exc.label, uuid=exc.uuid, supported=False)
            continue
        except Exception as exc:
            a.add(
                "Guest.Unreadable",
                f"{_where(vol)} could not be read ({type(exc).__name__}: {exc}); it was skipped",
                "warning",
            )
            continue
        if fs is not None:
            vol.fs = GuestFS(fs)
            entry.update(filesystem=fs.kind, label=fs.label, uuid=fs.uuid, supported=True)
    return volumes


def _filesystem_findings(volumes: list[Volume], a: Analysis) -> bool:
    """Findings about filesystems; whether any supported filesystem exists."""
    supported = [v for v in volumes if v.fs is not None]
    unsupported = [
        v for v in volumes if v.entry.get("supported") is False and v.entry["filesystem"] != "swap"
    ]
    for v in unsupported:
        name = v.entry["filesystem"]
        a.add(
            "Guest.UnsupportedFilesystem",
            f"{_where(v)} holds {name}, which the validator cannot read; "
            + ("nothing on this disk could be checked: " if not supported else "it was not checked: ")
            + "move the root and /boot filesystems to ext4, xfs, btrfs or ntfs (no LVM or encryption), or "
            "import the disk as a data volume",
            "error" if not supported else "warning",
        )
    if not supported and not unsupported:
        a.add(
            "Guest.NoFilesystem",
            "no partition holds a recognisable filesystem (ext2/3/4, xfs, btrfs, vfat, ntfs); check that the "
            "system disk was exported, not an empty, encrypted or LVM/RAID member disk",
        )
    return bool(supported)


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


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value pairs of an os-release file (shell-style quoting)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            parts = shlex.split(raw, posix=True)
            value = parts[0] if parts else ""
        except ValueError:
            value = raw.strip("\"'")
        values[key.strip()] = value
    return values


def _elf_machine(data: bytes | None) -> str | None:
    if not data or len(data) < 20 or data[:4] != b"\x7fELF":
        return None
    endian = "<" if data[5] == 1 else ">"
    machine = struct.unpack_from(endian + "H", data, 18)[0]
    if machine == 0x15:  # PowerPC 64
        return "ppc64le" if endian == "<" else "ppc64"
    return _ELF_MACHINES.get(machine)


def _arch_from_names(names: list[str]) -> str | None:
    for name in names:
        low = name.lower()
        if "amd64" in low or "x86_64" in low:
            return "x86_64"
        if "arm64" in low or "aarch64" in low:
            return "arm64"
        if re.search(r"i[3-6]86|\b686\b", low):
            return "i386"
    return None


@dataclass
class FstabEntry:
    spec: str
    mountpoint: str
    fstype: str
    options: list[str]


def parse_fstab(text: str) -> list[FstabEntry]:
    """The entries of an fstab (octal escapes such as ``\\040`` decoded; malformed lines skipped)."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [_unescape(f) for f in line.split()]
        if len(fields) < 2:
            continue
        fstype = fields[2] if len(fields) > 2 else "auto"
        options = fields[3].split(",") if len(fields) > 3 else ["defaults"]
        entries.append(FstabEntry(fields[0], fields[1], fstype, options))
    return entries


def _unescape(value: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)


def _resolve_spec(spec: str, volumes: list[Volume], bare: bool) -> tuple[Volume | None, bool, bool]:
    """(volume, checkable, by_kernel_name) for an fstab device spec."""
    tag, _, value = spec.partition("=")
    if spec.startswith("/dev/disk/"):
        kind, _, name = spec[len("/dev/disk/") :].partition("/")
        if kind not in _BY:
            return None, False, True  # by-id, by-path: controller-specific, cannot be checked here
        tag, value = _BY[kind], name
    if tag in ("UUID", "LABEL", "PARTUUID", "PARTLABEL") and value:
        value = value.strip("\"'")
        for vol in volumes:
            e = vol.entry
            have = {
                "UUID": e["uuid"],
                "LABEL": e["label"],
                "PARTUUID": vol.partuuid,
                "PARTLABEL": vol.partlabel,
            }
            got = have[tag]
            if got is not None and (
                got == value if tag in ("LABEL", "PARTLABEL") else got.lower() == value.lower()
            ):
                return vol, True, False
        return None, True, False
    m = _DEVNAME.match(spec)
    if m:
        letters, num, nvme_ctl, nvme_ns, nvme_part, mmc, mmc_part = m.groups()
        first_disk = letters == "a" or (nvme_ctl == "0" and nvme_ns == "1") or mmc == "0"
        number = num or nvme_part or mmc_part
        if not first_disk:
            return None, True, True
        if bare:  # a partition image is attached as a whole device or as its first partition
            return (volumes[0] if volumes else None), True, True
        if number:
            for vol in volumes:
                if vol.number == int(number):
                    return vol, True, True
        return None, True, True
    if spec.startswith("/dev/"):
        return None, True, False  # /dev/mapper, /dev/md, LVM names: not on a plain disk
    return None, False, False


def _check_fstab(entries: list[FstabEntry], volumes: list[Volume], bare: bool, a: Analysis) -> list[dict]:
    out = []
    for e in entries:
        if e.fstype in _VIRTUAL_FS or e.fstype.startswith("fuse") or "bind" in e.options:
            continue
        vol, checkable, by_name = _resolve_spec(e.spec, volumes, bare)
        out.append(
            {
                "spec": e.spec,
                "mountpoint": e.mountpoint,
                "type": e.fstype,
                "partition": vol.number if vol else None,
                "found": vol is not None,
            }
        )
        if not checkable:
            continue
        where = f"/etc/fstab mounts {e.spec} on {e.mountpoint}"
        if by_name:
            a.add(
                "Guest.FstabDeviceName",
                f"{where} by kernel device name, which changes with the disk "
                "controller (virtio, NVMe): use UUID= or LABEL= instead",
            )
        if vol is None:
            optional = "nofail" in e.options or "noauto" in e.options or e.fstype == "swap"
            a.add(
                "Guest.FstabDeviceMissing",
                f"{where} but no such device is on this disk"
                + (" (optional entry)" if optional else "; the guest would stop in emergency mode")
                + ": change it to the UUID of a filesystem on this disk, add nofail, or remove it",
                "warning" if optional else "error",
            )
    return out


def _linux(root: Volume, fs: GuestFS, volumes: list[Volume], bare: bool, a: Analysis) -> None:
    r = a.report
    text = fs.read_text("/etc/os-release") or fs.read_text("/usr/lib/os-release")
    osr = parse_os_release(text) if text else {}
    r["os"].update(
        family="linux",
        distribution=osr.get("ID"),
        version=osr.get("VERSION_ID"),
        pretty_name=osr.get("PRETTY_NAME") or osr.get("NAME"),
    )
    if not osr:
        a.add(
            "Guest.OsVersionUnknown",
            "the Linux root filesystem has no readable /etc/os-release or "
            "/usr/lib/os-release: restore it (package base-files, system-release or similar)",
        )
    fstab_text = fs.read_text("/etc/fstab")
    entries = parse_fstab(fstab_text) if fstab_text is not None else []
    if fstab_text is None:
        a.add(
            "Guest.FstabMissing",
            "the Linux root filesystem has no /etc/fstab: add one that mounts / by UUID=",
        )
    r["fstab"] = _check_fstab(entries, volumes, bare, a)

    boot_fs, prefix = fs, "/boot"
    for e in entries:
        if e.mountpoint.rstrip("/") == "/boot":
            vol, _, _ = _resolve_spec(e.spec, volumes, bare)
            if vol is not None and vol.fs is not None:
                boot_fs, prefix = vol.fs, ""
    names = boot_fs.listdir(prefix or "/")
    kernels = sorted(n for n in names if _KERNEL.match(n) and boot_fs.is_file(f"{prefix}/{n}"))
    initrds = sorted(n for n in names if _INITRD.match(n) and boot_fs.is_file(f"{prefix}/{n}"))
    r["kernels"] = [f"/boot/{n}" for n in kernels]
    r["initrds"] = [f"/boot/{n}" for n in initrds]
    esps = [v.fs for v in volumes if v.entry["esp"] and v.fs is not None]
    for esp in esps:  # unified kernel images and systemd-boot kernels live on the ESP
        r["kernels"] += [
            f"esp:/EFI/Linux/{n}" for n in esp.listdir("/EFI/Linux", 64) if n.lower().endswith(".efi")
        ]

    configs = []
    for rel, kind in (
        ("/grub/grub.cfg", "grub2"),
        ("/grub2/grub.cfg", "grub2"),
        ("/grub/menu.lst", "grub"),
        ("/grub/grub.conf", "grub"),
        ("/extlinux/extlinux.conf", "extlinux"),
        ("/extlinux.conf", "extlinux"),
        ("/syslinux/syslinux.cfg", "syslinux"),
    ):
        if boot_fs.is_file(prefix + rel):
            configs.append((kind, "/boot" + rel))
    if [n for n in boot_fs.listdir(prefix + "/loader/entries", 256) if n.endswith(".conf")]:
        configs.append(("bls", "/boot/loader/entries"))
    for esp in esps:
        for d in esp.listdir("/EFI", 64):
            if esp.is_file(f"/EFI/{d}/grub.cfg"):
                configs.append(("grub2", f"esp:/EFI/{d}/grub.cfg"))
        if esp.is_file("/loader/loader.conf") or esp.listdir("/loader/entries", 1):
            configs.append(("systemd-boot", "esp:/loader"))
    r["bootloader"] = {"type": configs[0][0], "configs": [c for _, c in configs]} if configs else None

    if not r["kernels"]:
        a.add(
            "Guest.NoKernel",
            "no kernel (vmlinuz-*) was found in /boot"
            + (
                ": import with a kernel reference (hypervisor paravirtual) or install a kernel package"
                if bare
                else ": install a kernel package in the guest before exporting"
            ),
            "warning" if bare else "error",
        )
    elif not r["initrds"]:
        a.add(
            "Guest.NoInitrd",
            "no initial ramdisk (initrd.img-*, initramfs-*) was found next to the kernels: "
            "regenerate it (update-initramfs -c -k all, or dracut --regenerate-all)",
        )
    if not configs:
        a.add(
            "Guest.NoBootloader",
            "no bootloader configuration (grub.cfg, menu.lst, extlinux.conf, loader entries) was found"
            + (
                "; a partition image boots with the kernel and ramdisk given at import"
                if bare
                else ": install and configure a bootloader (grub-install, then update-grub or grub2-mkconfig)"
            ),
            "info" if bare else "error",
        )

    arch = None
    for path in ("/bin/sh", "/usr/bin/env", "/bin/busybox", "/sbin/init", "/usr/lib/systemd/systemd"):
        arch = _elf_machine(fs.read(path, 64))
        if arch:
            break
    r["os"]["architecture"] = arch or _arch_from_names(kernels)


def _windows(root: Volume, fs: GuestFS, volumes: list[Volume], a: Analysis) -> None:
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
    volumes = _open_volumes(disk, a)
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
    has_fs = _filesystem_findings(volumes, a)
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
                _linux(vol, fs, volumes, bare, a)
            else:
                _windows(vol, fs, volumes, a)
        except Exception as exc:  # a damaged structure deep in the root: report what we have
            a.add(
                "Guest.Unreadable",
                f"the root filesystem could not be read completely ({type(exc).__name__}: "
                f"{exc}); the results are incomplete",
                "warning",
            )
    r["findings"] = [f.to_dict() for f in a.findings]
    return r
