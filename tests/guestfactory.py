"""Builds real guest disk images for the guest tests (validation, mounting, chroot steps, hooks, imports).

Filesystems are made as separate files (``mkfs.ext4 -d DIR`` populates ext4; ``mkfs.vfat`` + ``mmd``/
``mcopy`` populate an ESP), partition tables are written with ``sfdisk`` and the filesystems are copied
to their partition offsets (sparsely). Nothing is mounted to build a Linux guest. Needs e2fsprogs,
dosfstools, mtools, fdisk (util-linux). With ``programs=True`` the guest root gets a few host binaries
(dash, cat, sleep, ...) and their libraries so that commands can run in its chroot.

NTFS has no populate-from-directory tool, so :func:`ntfs` FUSE-mounts the filesystem *file* with
``ntfs-3g`` (no loop device; needs /dev/fuse and ntfs-3g) just long enough to copy a tree in, and always
unmounts it again. Registry hives come from :mod:`tests.winhive` (needs hivex's ``hivexsh``).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from tests import winhive

MiB = 1 << 20
ROOT_UUID = "0e4f5c1a-3b2d-4c6e-8f70-9a1b2c3d4e5f"
BOOT_UUID = "5d6e7f80-1a2b-4c3d-9e8f-a0b1c2d3e4f5"
ESP_VOLID = "1234ABCD"  # blkid shows it as 1234-ABCD
OS_RELEASE = (
    'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
)
LINUX_TYPE_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ESP_TYPE_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
MSR_TYPE_GUID = "E3C9E316-0B5C-4DB8-817D-F92DF00215AE"  # Microsoft reserved (no filesystem)
BASIC_DATA_TYPE_GUID = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"  # Windows data (NTFS)
PE_AMD64, PE_ARM64, PE_I386 = 0x8664, 0xAA64, 0x14C
KERNEL, INITRD = "vmlinuz-6.1.0-18-amd64", "initrd.img-6.1.0-18-amd64"
#: host programs copied into the guest (``programs=True``) so chroot commands have something to run
GUEST_PROGRAMS = ("dash", "cat", "sleep", "touch", "ls", "id", "echo", "rm", "mkdir")


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def host_elf() -> Path:
    """A small real ELF executable of the host's architecture (for /bin/sh in the guest)."""
    return Path(shutil.which("true") or "/bin/true").resolve()


def linux_tree(
    root: Path,
    *,
    fstab: str | None,
    os_release: bool = True,
    kernel: bool = True,
    initrd: bool = True,
    grub: bool = True,
    boot_in_root: bool = True,
    programs: bool = False,
) -> Path:
    """A minimal merged-/usr Linux root directory: os-release (as Debian's symlink into /usr/lib), fstab,
    users root and alice (uid 1000, gid 1001, home owned by her), /bin/sh (a symlink to a real ELF binary),
    empty /proc /sys /dev /tmp, and /boot with kernel, initrd and grub.cfg (empty with ``boot_in_root=False``,
    for a separate boot filesystem). ``programs`` copies real host programs and their libraries in."""
    for d in ("etc", "usr/lib", "usr/bin", "root", "tmp", "proc", "sys", "dev", "var/lib", "home/alice"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64"):
        (root / link).symlink_to(f"usr/{link}")
    (root / "usr/lib64").mkdir()
    if programs:
        for name in GUEST_PROGRAMS:
            _copy_program(root, name)
    else:
        shutil.copy(host_elf(), root / "usr/bin/dash")
    (root / "usr/bin/sh").symlink_to("dash")
    if os_release:
        (root / "usr/lib/os-release").write_text(OS_RELEASE)
        (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    if fstab is not None:
        (root / "etc/fstab").write_text(fstab)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1001:Alice:/home/alice:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nalice:x:1001:\n")
    if os.geteuid() == 0:
        os.chown(root / "home/alice", 1000, 1001)
    (root / "boot").mkdir()
    if boot_in_root:
        boot_tree(root / "boot", kernel=kernel, initrd=initrd, grub=grub)
    return root


def _copy_program(root: Path, name: str) -> None:
    """Copy host program ``name`` to the guest's /usr/bin with the shared libraries ``ldd`` lists."""
    src = shutil.which(name)
    if src is None:
        return
    src = os.path.realpath(src)
    shutil.copy2(src, root / "usr/bin" / name)
    out = subprocess.run(["ldd", src], capture_output=True, text=True, check=False).stdout
    for lib in re.findall(r"(/\S+)", out):
        dst = root / lib.lstrip("/")  # /lib... lands in usr/lib through the guest's merged-/usr links
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy2(os.path.realpath(lib), dst)


def boot_tree(boot: Path, *, kernel: bool = True, initrd: bool = True, grub: bool = True) -> Path:
    """Contents of /boot (or of a separate boot filesystem)."""
    boot.mkdir(parents=True, exist_ok=True)
    if kernel:
        (boot / KERNEL).write_bytes(b"MZ" + b"\0" * 510)
    if initrd:
        (boot / INITRD).write_bytes(b"\x1f\x8b" + b"\0" * 62)
    if grub:
        (boot / "grub").mkdir()
        (boot / "grub/grub.cfg").write_text(f"menuentry 'Debian' {{\n linux /boot/{KERNEL}\n}}\n")
    return boot


def ext4(
    path: Path, size_mib: int, tree: Path | None = None, *, uuid: str = ROOT_UUID, label: str = ""
) -> Path:
    """An ext4 filesystem image populated from ``tree``."""
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    argv: list[str | Path] = ["mkfs.ext4", "-q", "-F", "-U", uuid, "-E", "root_owner=0:0"]
    if label:
        argv += ["-L", label]
    if tree is not None:
        argv += ["-d", tree]
    run(*argv, path)
    return path


def vfat(path: Path, size_mib: int, files: dict[str, bytes], *, volid: str = ESP_VOLID) -> Path:
    """A FAT filesystem image holding ``files`` (``"EFI/BOOT/BOOTX64.EFI": b"..."``)."""
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    run("mkfs.vfat", "-i", volid, "-n", "ESP", path)
    made: set[str] = set()
    for name, data in files.items():
        parts = name.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                run("mmd", "-i", path, f"::/{d}")
                made.add(d)
        src = path.with_name(path.name + ".tmp")
        src.write_bytes(data)
        run("mcopy", "-i", path, src, f"::/{name}")
        src.unlink()
    return path


@dataclass
class Part:
    """One partition: size, type (MBR hex like ``83`` or a GPT type GUID), flags and content."""

    size_mib: int
    type: str
    content: Path | bytes | None = None
    bootable: bool = False


def disk(path: Path, table: str, parts: list[Part]) -> Path:
    """A disk image with an ``mbr``/``gpt`` table, partitions aligned at 1 MiB, contents copied in."""
    total = 1 + sum(p.size_mib for p in parts) + (1 if table == "gpt" else 0)
    with open(path, "wb") as f:
        f.truncate(total * MiB)
    lines = [f"label: {'dos' if table == 'mbr' else 'gpt'}"]
    start = 1
    for p in parts:
        line = f"start={start * 2048}, size={p.size_mib * 2048}, type={p.type}"
        if p.bootable:
            line += ", bootable" if table == "mbr" else ", attrs=LegacyBIOSBootable"
        lines.append(line)
        start += p.size_mib
    subprocess.run(
        ["sfdisk", "-q", str(path)], input="\n".join(lines) + "\n", text=True, check=True, capture_output=True
    )
    start = 1
    with open(path, "r+b") as f:
        for p in parts:
            data = p.content.read_bytes() if isinstance(p.content, Path) else p.content
            if data:
                assert len(data) <= p.size_mib * MiB, "content larger than its partition"
                _write_sparse(f, start * MiB, data)
            start += p.size_mib
    return path


def _write_sparse(f: BinaryIO, offset: int, data: bytes, block: int = 64 * 1024) -> None:
    """Write ``data`` at ``offset`` leaving all-zero blocks as holes (the disk file stays sparse)."""
    for i in range(0, len(data), block):
        chunk = data[i : i + block]
        if chunk.count(0) != len(chunk):
            f.seek(offset + i)
            f.write(chunk)


def fstab_by_uuid(root_uuid: str = ROOT_UUID, extra: str = "") -> str:
    return (
        f"# /etc/fstab\nUUID={root_uuid} / ext4 errors=remount-ro 0 1\nproc /proc proc defaults 0 0\n{extra}"
    )


def linux_disk(
    tmp: Path,
    name: str = "linux.img",
    *,
    table: str = "mbr",
    separate_boot: bool = False,
    programs: bool = False,
    fstab: str | None = None,
    tree_hook: Callable[[Path], None] | None = None,
    **tree_args: bool,
) -> Path:
    """A BIOS-bootable Linux disk (``mbr`` or ``gpt`` table) with a Debian-like ext4 root (label ``rootfs``,
    :data:`ROOT_UUID`).

    One root partition by default; with ``separate_boot`` partition 1 is /boot (ext4, :data:`BOOT_UUID`,
    label ``boot``, in fstab) and partition 2 the root. ``programs`` puts runnable host programs in the root
    (for chroot steps); ``tree_hook(root_dir)`` changes the root tree before the filesystem is made.
    """
    work = tmp / f"{name}.d"
    if fstab is None:
        fstab = fstab_by_uuid(extra=f"UUID={BOOT_UUID} /boot ext4 defaults 0 2\n" if separate_boot else "")
    tree = linux_tree(
        work / "root", fstab=fstab, programs=programs, boot_in_root=not separate_boot, **tree_args
    )
    if tree_hook is not None:
        tree_hook(tree)
    linux = "83" if table == "mbr" else LINUX_TYPE_GUID
    parts = []
    if separate_boot:
        boot = boot_tree(
            work / "boot", **{k: v for k, v in tree_args.items() if k in ("kernel", "initrd", "grub")}
        )
        parts.append(
            Part(8, linux, ext4(work / "boot.ext4", 8, boot, uuid=BOOT_UUID, label="boot"), bootable=True)
        )
    root = ext4(work / "root.ext4", 24, tree, label="rootfs")
    parts.append(Part(24, linux, root, bootable=not separate_boot))
    return disk(tmp / name, table, parts)


def uefi_disk(tmp: Path, name: str = "uefi.img", *, fallback: bool = True) -> Path:
    """A GPT disk: an ESP (with or without \\EFI\\BOOT\\BOOTX64.EFI) and an ext4 Linux root."""
    work = tmp / f"{name}.d"
    fstab = fstab_by_uuid(extra="UUID=1234-ABCD /boot/efi vfat umask=0077 0 1\n")
    tree = linux_tree(work / "root", fstab=fstab)
    files = {"EFI/debian/grubx64.efi": b"MZ-grub", "EFI/debian/grub.cfg": b"configfile /boot/grub/grub.cfg\n"}
    if fallback:
        files["EFI/BOOT/BOOTX64.EFI"] = b"MZ-shim"
    esp = vfat(work / "esp.vfat", 16, files)
    root = ext4(work / "root.ext4", 24, tree)
    return disk(tmp / name, "gpt", [Part(16, ESP_TYPE_GUID, esp), Part(24, LINUX_TYPE_GUID, root)])


def data_disk(tmp: Path, name: str = "data.img") -> Path:
    """An MBR disk with one non-bootable ext4 partition holding plain files and no OS."""
    work = tmp / f"{name}.d"
    (work / "files/projects").mkdir(parents=True)
    (work / "files/projects/notes.txt").write_text("quarterly numbers\n")
    fs = ext4(work / "data.ext4", 16, work / "files", label="data")
    return disk(tmp / name, "mbr", [Part(16, "83", fs)])


def partition_image(
    tmp: Path,
    name: str = "root.ext4",
    *,
    fstab: str | None = None,
    programs: bool = False,
    tree_hook: Callable[[Path], None] | None = None,
) -> Path:
    """A bare ext4 filesystem (no partition table, :data:`ROOT_UUID`) holding a Linux root with kernel and
    initrd but no bootloader, as Eucalyptus-era paravirtual images were."""
    work = tmp / f"{name}.d"
    tree = linux_tree(
        work / "root", fstab=fstab if fstab is not None else fstab_by_uuid(), grub=False, programs=programs
    )
    if tree_hook is not None:
        tree_hook(tree)
    return ext4(tmp / name, 24, tree)


#: the filesystems the validator reads, with the size each is made at (the smallest btrfs and xfs allow)
FILESYSTEM_MIB = {"ext2": 16, "ext3": 16, "ext4": 16, "xfs": 300, "btrfs": 128, "vfat": 16, "ntfs": 16}
#: MBR partition type of each filesystem in :func:`filesystem_disk`
_MBR_TYPES = {"ext2": "83", "ext3": "83", "ext4": "83", "xfs": "83", "btrfs": "83", "vfat": "c", "ntfs": "7"}
GUEST_LABEL = "GUEST"


def portable_root(root: Path) -> Path:
    """A Linux root that any filesystem can hold (regular files and directories only): os-release, an fstab
    mounting ``LABEL=GUEST`` on /, and a kernel and initrd in /boot (no bootloader)."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text(OS_RELEASE)
    (root / "etc/fstab").write_text(f"LABEL={GUEST_LABEL} / auto defaults 0 1\n")
    boot_tree(root / "boot", grub=False)
    return root


def _xfs_protofile(tree: Path, proto: Path) -> Path:
    """An ``mkfs.xfs -p`` prototype file copying ``tree`` (mkfs.xfs 6.1 cannot take a directory)."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(directory: Path) -> None:
        for child in sorted(directory.iterdir()):
            if child.is_dir():
                lines.append(f"{child.name} d--755 0 0")
                walk(child)
                lines.append("$")
            else:
                lines.append(f"{child.name} ---644 0 0 {child.resolve()}")

    walk(tree)
    lines.append("$")
    proto.write_text("\n".join(lines) + "\n")
    return proto


def filesystem(kind: str, path: Path, tree: Path) -> Path:
    """A real ``kind`` filesystem (:data:`FILESYSTEM_MIB`) labelled :data:`GUEST_LABEL` holding ``tree``,
    made by its mkfs (ext2/3/4 ``-d``, btrfs ``--rootdir``, xfs with a prototype file) or filled by mtools
    (vfat) or ntfs-3g (ntfs, see :func:`ntfs`)."""
    size = FILESYSTEM_MIB[kind]
    if kind == "ntfs":
        return ntfs(path, size, tree, label=GUEST_LABEL)
    with open(path, "wb") as f:
        f.truncate(size * MiB)
    if kind.startswith("ext"):
        run(f"mkfs.{kind}", "-q", "-F", "-L", GUEST_LABEL, "-E", "root_owner=0:0", "-d", tree, path)
    elif kind == "xfs":
        run(
            "mkfs.xfs",
            "-q",
            "-f",
            "-L",
            GUEST_LABEL,
            "-p",
            _xfs_protofile(tree, path.with_suffix(".proto")),
            path,
        )
    elif kind == "btrfs":
        run("mkfs.btrfs", "-q", "-f", "-L", GUEST_LABEL, "--rootdir", tree, path)
    elif kind == "vfat":
        run("mkfs.vfat", "-n", GUEST_LABEL, path)
        run("mcopy", "-s", "-i", path, *sorted(tree.iterdir()), "::/")
    else:
        raise ValueError(kind)
    return path


def filesystem_disk(kind: str, fs: Path, path: Path) -> Path:
    """An MBR disk whose one active partition (at 1 MiB) holds the filesystem image ``fs``."""
    return disk(path, "mbr", [Part(FILESYSTEM_MIB[kind], _MBR_TYPES[kind], fs, bootable=True)])


def qcow2_of(raw: Path, dst: Path) -> Path:
    """``raw`` converted to qcow2 at ``dst``."""
    return convert(raw, dst, "qcow2")


def convert(raw: Path, dst: Path, qemu_format: str, options: str | None = None) -> Path:
    """``raw`` converted with qemu-img to ``qemu_format`` (e.g. ``vmdk`` with ``subformat=streamOptimized``,
    ``vpc`` with ``force_size=on``) at ``dst``."""
    run(
        "qemu-img", "convert", "-f", "raw", "-O", qemu_format, *(["-o", options] if options else []), raw, dst
    )
    return dst


# --- inspecting what tests built, without mounting it ------------------------------------------------


def require_loop_root() -> None:
    """Skip (with the reason) unless this process can attach loop devices and mount."""
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices and mount")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices on this machine (/dev/loop-control missing)")
    for tool in ("losetup", "partx", "sfdisk", "mkfs.ext4", "blkid", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def _debugfs(request: str, fs_image: Path, offset_bytes: int) -> subprocess.CompletedProcess[str]:
    target = f"{fs_image}?offset={offset_bytes}" if offset_bytes else str(fs_image)
    return subprocess.run(["debugfs", "-R", request, target], capture_output=True, text=True)


def debugfs_cat(fs_image: Path, guest_path: str, offset_bytes: int = 0) -> str | None:
    """Read a file from an ext4 image (at ``offset_bytes`` in it) without mounting it (None when absent)."""
    proc = _debugfs(f"cat {guest_path}", fs_image, offset_bytes)
    if proc.returncode != 0 or "File not found" in proc.stderr:
        return None
    return proc.stdout


def debugfs_stat(fs_image: Path, guest_path: str, offset_bytes: int = 0) -> str:
    """``debugfs stat`` of a path in an ext4 image (mode, uid, gid, ...)."""
    return _debugfs(f"stat {guest_path}", fs_image, offset_bytes).stdout


def partition_offset(image: Path, number: int) -> int:
    """Byte offset of partition ``number`` (from sfdisk's dump)."""
    out = subprocess.run(["sfdisk", "-d", str(image)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if re.match(rf"^{re.escape(str(image))}p?{number}\s*:", line):
            found = re.search(r"start=\s*(\d+)", line)
            assert found is not None
            return int(found.group(1)) * 512
    raise AssertionError(f"no partition {number} in {image}")


def loops_of(image: Path) -> str:
    """``losetup -j IMAGE`` output: empty when no loop device is attached to it."""
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.strip()


def mounts_below(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` per /proc/self/mountinfo."""
    base = os.path.realpath(directory)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == base or p.startswith(base + "/")]


# --- Windows ---------------------------------------------------------------------------------------


def pe_image(machine: int = PE_AMD64) -> bytes:
    """The first 4 KiB of a PE executable: an MZ header whose ``e_lfanew`` points at ``PE\\0\\0`` and the
    COFF header's Machine field (all the validator reads of ntoskrnl.exe)."""
    data = bytearray(4096)
    data[:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, 0x80)
    struct.pack_into("<4sHH", data, 0x80, b"PE\0\0", machine, 1)
    return bytes(data)


def windows_tree(
    root: Path,
    *,
    software: bool | bytes = True,
    machine: int = PE_AMD64,
    bootmgr: bool = True,
) -> Path:
    """A Windows system volume: ``Windows/System32`` with ntoskrnl.exe and the SOFTWARE/SYSTEM hives and,
    with ``bootmgr``, the BIOS boot files ``bootmgr`` and ``Boot/BCD`` at its root.

    ``software``: True for a real Windows Server 2022 hive, False for none, bytes for that content.
    """
    config = root / "Windows/System32/config"
    config.mkdir(parents=True)
    if software is True:
        winhive.software_hive(config / "SOFTWARE")
    elif software is not False:
        (config / "SOFTWARE").write_bytes(software)
    winhive.system_hive(config / "SYSTEM")
    (root / "Windows/System32/ntoskrnl.exe").write_bytes(pe_image(machine))
    (root / "Windows/System32/drivers").mkdir()
    (root / "Windows/System32/drivers/disk.sys").write_bytes(pe_image(machine))
    if bootmgr:
        (root / "bootmgr").write_bytes(b"BOOTMGR" + b"\0" * 505)
        (root / "Boot").mkdir()
        winhive.empty_hive(root / "Boot/BCD", "BCD00000000")
    return root


def _mounted(mountpoint: Path) -> bool:
    target = str(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def ntfs(path: Path, size_mib: int, tree: Path, *, label: str = "Windows", start_sector: int = 2048) -> Path:
    """An NTFS filesystem image populated from ``tree`` (made by mkntfs, filled through ntfs-3g).

    ntfs-3g runs in the foreground (``no_detach``) so that after ``fusermount -u`` we can wait for it to
    finish writing the volume; the mount is removed whatever happens while copying.
    """
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    # geometry and start sector as a partition would have them (mkntfs cannot ask a file for them)
    run("mkntfs", "-Q", "-F", "-q", "-p", start_sector, "-H", 255, "-S", 63, "-s", 512, "-L", label, path)
    mnt = Path(tempfile.mkdtemp(prefix="ntfs-mnt.", dir=path.parent))
    log = path.with_name(path.name + ".ntfs-3g.log")  # a file, not a pipe: no_detach prints as it works
    with open(log, "wb") as err:
        proc = subprocess.Popen(["ntfs-3g", "-o", "no_detach", path, mnt], stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not _mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ntfs-3g did not mount {path}: {log.read_text(errors='replace')}")
            time.sleep(0.02)
        shutil.copytree(tree, mnt, dirs_exist_ok=True, symlinks=True)
    finally:
        if _mounted(mnt):
            subprocess.run(["fusermount", "-u", mnt], capture_output=True)
            if _mounted(mnt):  # still busy: detach it lazily rather than leave it behind
                subprocess.run(["fusermount", "-u", "-z", mnt], capture_output=True)
        elif proc.poll() is None:
            proc.terminate()  # it never mounted: nothing to write out
        try:
            proc.wait(timeout=30)  # after the unmount the daemon writes the volume out, then exits
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        mnt.rmdir()
    if proc.returncode != 0:
        raise RuntimeError(f"ntfs-3g failed on {path} (exit {proc.returncode})")
    return path


def windows_disk(
    tmp: Path,
    name: str = "windows.img",
    *,
    uefi: bool = False,
    fallback: bool = True,
    software: bool | bytes = True,
    machine: int = PE_AMD64,
    bootmgr: bool = True,
) -> Path:
    """A Windows Server 2022 system disk.

    BIOS (default): MBR, one active NTFS partition (type 0x07) holding bootmgr, Boot/BCD and Windows
    (no boot manager with ``bootmgr=False``).
    UEFI: GPT with an ESP (EFI/Microsoft/Boot/bootmgfw.efi and BCD, plus the fallback loader
    EFI/BOOT/BOOTX64.EFI, BOOTAA64.EFI for arm64, unless ``fallback=False``), a Microsoft reserved
    partition and the NTFS Windows partition.
    """
    work = tmp / f"{name}.d"
    tree = windows_tree(work / "c", software=software, machine=machine, bootmgr=bootmgr and not uefi)
    if not uefi:
        c = ntfs(work / "c.ntfs", 24, tree)
        return disk(tmp / name, "mbr", [Part(24, "7", c, bootable=True)])
    bcd = winhive.empty_hive(work / "BCD", "BCD00000000").read_bytes()
    files = {
        "EFI/Microsoft/Boot/bootmgfw.efi": pe_image(machine),
        "EFI/Microsoft/Boot/BCD": bcd,
    }
    if fallback:
        loader = {PE_AMD64: "BOOTX64.EFI", PE_ARM64: "BOOTAA64.EFI", PE_I386: "BOOTIA32.EFI"}[machine]
        files[f"EFI/BOOT/{loader}"] = pe_image(machine)
    esp = vfat(work / "esp.vfat", 16, files)
    # the Windows partition starts after 1 MiB + ESP + MSR
    c = ntfs(work / "c.ntfs", 24, tree, start_sector=(1 + 16 + 1) * 2048)
    return disk(
        tmp / name,
        "gpt",
        [Part(16, ESP_TYPE_GUID, esp), Part(1, MSR_TYPE_GUID), Part(24, BASIC_DATA_TYPE_GUID, c)],
    )
