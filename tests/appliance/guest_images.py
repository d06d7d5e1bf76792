"""Build small real guest disk images for the mount/run/hook tests (no mounting needed to build).

Filesystems are populated with ``mkfs.ext4 -d DIR`` and written into partition offsets of a disk
laid out by ``sfdisk``. The guest root gets a few host binaries (dash, cat, sleep, …) and their
libraries so commands can run in its chroot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

MiB = 1024 * 1024
#: host programs copied into the guest so chroot commands have something to run
GUEST_PROGRAMS = ("sh", "dash", "cat", "sleep", "touch", "ls", "id", "echo", "rm", "mkdir")

ROOT_UUID = "5a1e0b1c-0000-4000-8000-00000000a001"
BOOT_UUID = "5a1e0b1c-0000-4000-8000-00000000b002"
OS_RELEASE = 'PRETTY_NAME="Testix 1.0"\nNAME="Testix"\nID=testix\nVERSION_ID="1.0"\n'


def require_loop_root() -> None:
    """Skip (with the reason) unless this process can attach loop devices and mount."""
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices and mount")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices on this machine (/dev/loop-control missing)")
    for tool in ("losetup", "partx", "sfdisk", "mkfs.ext4", "blkid", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def _copy_program(root: Path, name: str) -> None:
    src = shutil.which(name)
    if src is None:
        return
    src = os.path.realpath(src)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, root / "bin" / name)
    out = subprocess.run(["ldd", src], capture_output=True, text=True, check=False).stdout
    for lib in re.findall(r"(/\S+)", out):
        real = os.path.realpath(lib)
        dst = root / lib.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy2(real, dst)


def make_linux_tree(root: Path, *, fstab: str | None = None, programs: bool = True) -> Path:
    """A minimal Linux root: os-release, passwd/group, fstab, /root, /home/alice, /proc /sys /dev."""
    for d in ("etc", "root", "tmp", "proc", "sys", "dev", "boot", "var/lib", "home/alice", "data"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text(OS_RELEASE)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1001:Alice:/home/alice:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nalice:x:1001:\n")
    if fstab is None:
        fstab = f"UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\nUUID={BOOT_UUID} /boot ext4 defaults 0 2\n"
    (root / "etc/fstab").write_text(fstab)
    os.chown(root / "home/alice", 1000, 1001)
    if programs:
        for name in GUEST_PROGRAMS:
            _copy_program(root, name)
    return root


def make_ext4(
    path: Path, size_mib: int, tree: Path | None, *, fs_uuid: str, label: str | None = None
) -> Path:
    """An ext4 filesystem image of ``size_mib`` MiB populated from ``tree``."""
    argv = ["mkfs.ext4", "-q", "-F", "-U", fs_uuid, "-E", "root_owner=0:0"]
    if label:
        argv += ["-L", label]
    if tree is not None:
        argv += ["-d", str(tree)]
    subprocess.run([*argv, str(path), f"{size_mib}M"], check=True, capture_output=True)
    return path


def make_disk(path: Path, filesystems: list[Path], *, label: str = "dos") -> Path:
    """A disk with one partition per filesystem image (1 MiB aligned), contents copied in."""
    sizes = [-(-f.stat().st_size // MiB) for f in filesystems]
    total = 1 + sum(sizes) + 1  # 1 MiB before the first partition, 1 MiB for the GPT backup
    with open(path, "wb") as f:
        f.truncate(total * MiB)
    script = [f"label: {label}"]
    start = 1
    for size in sizes:
        script.append(f"start={start * 2048}, size={size * 2048}, type=linux")
        start += size
    subprocess.run(["sfdisk", "-q", str(path)], input="\n".join(script) + "\n", text=True, check=True)
    start = 1
    for fs, size in zip(filesystems, sizes, strict=True):
        subprocess.run(
            ["dd", f"if={fs}", f"of={path}", "bs=1M", f"seek={start}", "conv=notrunc,sparse", "status=none"],
            check=True,
        )
        start += size
    return path


def build_linux_disk(tmp: Path, *, label: str = "dos", tree_hook=None) -> Path:
    """A two-partition disk: p1 /boot (ext4, UUID BOOT_UUID), p2 root (ext4, ROOT_UUID) with binaries."""
    tree = make_linux_tree(tmp / f"tree-{uuid.uuid4().hex[:6]}")
    (tmp / "boottree").mkdir(exist_ok=True)
    (tmp / "boottree" / "vmlinuz-test").write_text("not a kernel\n")
    if tree_hook is not None:
        tree_hook(tree)
    boot = make_ext4(tmp / "boot.ext4", 8, tmp / "boottree", fs_uuid=BOOT_UUID, label="BOOT")
    root = make_ext4(tmp / "root.ext4", 24, tree, fs_uuid=ROOT_UUID, label="ROOT")
    disk = make_disk(tmp / f"disk-{label}.raw", [boot, root], label=label)
    boot.unlink()
    root.unlink()
    return disk


def build_bare_ext4(tmp: Path, tree_hook=None) -> Path:
    """A partition image: one ext4 filesystem, no partition table."""
    tree = make_linux_tree(tmp / "bare-tree", fstab=f"UUID={ROOT_UUID} / ext4 defaults 0 1\n")
    if tree_hook is not None:
        tree_hook(tree)
    return make_ext4(tmp / "bare.ext4", 24, tree, fs_uuid=ROOT_UUID)


def debugfs_cat(fs_image: Path, guest_path: str, offset_bytes: int = 0) -> str | None:
    """Read a file from an ext4 image without mounting it (None when absent)."""
    target = f"{fs_image}?offset={offset_bytes}" if offset_bytes else str(fs_image)
    proc = subprocess.run(["debugfs", "-R", f"cat {guest_path}", target], capture_output=True, text=True)
    if proc.returncode != 0 or "File not found" in proc.stderr:
        return None
    return proc.stdout


def debugfs_stat(fs_image: Path, guest_path: str, offset_bytes: int = 0) -> str:
    target = f"{fs_image}?offset={offset_bytes}" if offset_bytes else str(fs_image)
    return subprocess.run(
        ["debugfs", "-R", f"stat {guest_path}", target], capture_output=True, text=True
    ).stdout


def partition_offset(disk: Path, number: int) -> int:
    """Byte offset of partition ``number`` (from sfdisk's dump)."""
    out = subprocess.run(["sfdisk", "-d", str(disk)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if re.match(rf"^{re.escape(str(disk))}p?{number}\s*:", line):
            return int(re.search(r"start=\s*(\d+)", line).group(1)) * 512
    raise AssertionError(f"no partition {number} in {disk}")


def loops_of(image: Path) -> str:
    """``losetup -j IMAGE`` output: empty when no loop device is attached to it."""
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.strip()


def mounts_below(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` per /proc/self/mountinfo."""
    base = os.path.realpath(directory)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == base or p.startswith(base + "/")]
