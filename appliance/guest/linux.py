"""Linux guests: os-release, architecture, kernels and initrds, the bootloader, and an ``/etc/fstab``
checked against the disk's own volumes."""

from __future__ import annotations

import re
import shlex
import struct

from .fstab import FstabEntry, parse_fstab
from .safefs import GuestFS
from .volumes import Analysis, Volume

#: fstab types whose "device" is not a block device on this disk
_VIRTUAL_FS = {"proc", "sysfs", "tmpfs", "devpts", "devtmpfs", "nfs", "nfs4", "cifs", "smbfs", "9p"}
_ELF_MACHINES = {0x03: "i386", 0x3E: "x86_64", 0xB7: "arm64", 0x28: "arm", 0x16: "s390x", 0xF3: "riscv64"}
_KERNEL = re.compile(r"^(vmlinuz|vmlinux|kernel|bzImage)(-.+)?$")
_INITRD = re.compile(r"^(initrd|initramfs)([-.].+)?$")
_DEVNAME = re.compile(
    r"^/dev/(?:(?:[shv]d|xvd)([a-z]+)(\d*)|nvme(\d+)n(\d+)(?:p(\d+))?|mmcblk(\d+)(?:p(\d+))?)$"
)
_BY = {"by-uuid": "UUID", "by-label": "LABEL", "by-partuuid": "PARTUUID", "by-partlabel": "PARTLABEL"}


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


def analyze_linux(root: Volume, fs: GuestFS, volumes: list[Volume], bare: bool, a: Analysis) -> None:
    """The Linux side of the report: OS, kernels, initrds, bootloader, fstab (with findings)."""
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
