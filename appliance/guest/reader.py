"""The one module that reads guest disks: an adapter over the dissect libraries.

Everything that knows about dissect lives here, so the library can be swapped (e.g. for libguestfs) by
rewriting this file alone. The rest of :mod:`appliance.guest` sees only:

* :func:`open_disk` → :class:`Disk` (partition table, partitions, MBR boot code, a stream per partition);
* :func:`open_filesystem` → :class:`Filesystem` with *non-following* primitives (``kind``, ``readlink``,
  ``read``, ``listdir``) on paths that contain no symlinks; symlink resolution confined to the guest and
  byte/entry bounds are applied by :mod:`appliance.guest.safefs`;
* :func:`registry_values` for one key of a Windows registry hive.

This runs only inside the resource-limited child (:mod:`appliance.guest.probe`): the image is untrusted,
and a parser bug may raise anything, loop or allocate; the parent turns that into ``Guest.Unreadable``.

An image that names another file it needs (a qcow2 backing or data file, a VMDK parent or extent file, a
differencing VHD, VHDX or VDI) is refused by :func:`.references.external_reference` before dissect sees it
(:class:`ExternalReference`). As a second line, dissect gets the image through :class:`_Nameless`, a
stream without a ``name``: dissect's VMDK and VHDX code look a parent up next to ``fh.name`` or at an
absolute path the image gives, and with no name there is no place to look from (it raises instead).
"""

from __future__ import annotations

import io
import struct
import uuid as uuid_mod
from dataclasses import dataclass
from typing import Any, BinaryIO

from dissect.target import filesystem as dt_filesystem
from dissect.target.containers.qcow2 import QCow2Container
from dissect.target.containers.raw import RawContainer
from dissect.target.containers.vdi import VdiContainer
from dissect.target.containers.vhd import VhdContainer
from dissect.target.containers.vhdx import VhdxContainer
from dissect.target.containers.vmdk import VmdkContainer
from dissect.volume.disk import Disk as DissectDisk
from dissect.volume.disk.schemes import GPT, MBR

from ..image import bootsector
from .references import external_reference

#: format name (:data:`appliance.image.formats.GUEST_FORMATS`, the names
#: :func:`appliance.image.formats.guest_format` gives) → dissect container class
_CONTAINERS: dict[str, Any] = {
    "raw": RawContainer,
    "qcow2": QCow2Container,
    "vmdk": VmdkContainer,
    "vhd": VhdContainer,
    "vhdx": VhdxContainer,
    "vdi": VdiContainer,
}
READABLE_FORMATS = frozenset(_CONTAINERS)

ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BIOS_BOOT_GUID = "21686148-6449-6e6f-744e-656564454649"
_MBR_ESP = 0xEF
_MBR_EXTENDED = (0x05, 0x0F, 0x85)

#: dissect filesystem type → what the report calls it (ext is refined to ext2/3/4 from the superblock)
_SUPPORTED = {"ext": "ext4", "xfs": "xfs", "btrfs": "btrfs", "fat": "vfat", "ntfs": "ntfs"}
#: (offset, magic, name) of formats we recognise but do not read; checked when dissect finds nothing
_OTHER_MAGICS = (
    (0, b"hsqs", "squashfs"),
    (0, b"LUKS\xba\xbe", "crypto_LUKS"),
    (0x218, b"LVM2 001", "LVM2_member"),
    (0x1018, b"LVM2 001", "LVM2_member"),
    (4086, b"SWAPSPACE2", "swap"),
    (4086, b"SWAP-SPACE", "swap"),
    (0x8001, b"CD001", "iso9660"),
    (0x10040, b"_BHRfS_M", "btrfs"),  # only reached when dissect failed on it
    (0, b"\x45\x3d\xcd\x28", "cramfs"),
    (3, b"EXFAT   ", "exfat"),
    (0x400, b"H+", "hfsplus"),
    (0x20, b"NXSB", "apfs"),
    (0x10034, b"ReIsEr", "reiserfs"),
)


class ReaderError(Exception):
    """The image cannot be read as a disk at all (bad container, truncated, refers to other files)."""


class ExternalReference(ReaderError):
    """The image names another file (backing file, parent disk, extent, data file) holding part of it."""


@dataclass
class RawPartition:
    """One partition-table entry, independent of the library."""

    number: int
    start: int
    size: int
    type: str  # "0x83" for MBR, the type GUID (lower case) for GPT
    type_name: str | None
    bootable: bool
    esp: bool
    bios_boot: bool
    partuuid: str | None
    name: str | None


class Disk:
    """An opened image: its table (``mbr``/``gpt``/``None``) and partitions."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self.stream = stream
        self.size = size
        self.table: str | None = None
        self.partitions: list[RawPartition] = []
        self.boot_code = False
        self._offsets: dict[int, tuple[int, int]] = {}
        stream.seek(0)
        sector0 = stream.read(512)
        self.boot_code = len(sector0) == 512 and any(sector0[: bootsector.BOOT_CODE_SIZE])
        if bootsector.classify(sector0).volume is not None:
            # a bare FAT/NTFS filesystem also ends its first sector with 0x55AA; dissect's own test for
            # that misses mkfs.fat's "mkfs.fat" OEM name, and its "partitions" would be boot-code bytes
            self.boot_code = False
            return
        try:
            stream.seek(0)
            disk = DissectDisk(stream)
        except Exception:  # no recognisable table: maybe a bare filesystem (layout "partition")
            return
        scheme = disk.scheme
        if isinstance(scheme, GPT):
            self.table = "gpt"
        elif isinstance(scheme, MBR):
            self.table = "mbr"
        else:  # APM/BSD labels: not something a cloud guest boots from
            self.table = type(scheme).__name__.lower()
        signature = struct.unpack_from("<I", sector0, 440)[0] if len(sector0) == 512 else 0
        for p in disk.partitions:
            self._add(p, signature)

    def _add(self, p: Any, signature: int) -> None:
        if isinstance(p.type, int):
            if p.type in _MBR_EXTENDED or p.type == 0xEE:
                return
            type_str = f"0x{p.type:02x}"
            esp, bios_boot = p.type == _MBR_ESP, False
            bootable = bool((p.flags or 0) & 0x80)
            partuuid: str | None = f"{signature:08x}-{p.number:02x}"
            size = p.size
        else:
            type_str = str(p.type).lower()
            esp, bios_boot = type_str == ESP_GUID, type_str == BIOS_BOOT_GUID
            # GPT attribute bit 2: "legacy BIOS bootable"
            bootable = bool((p.flags or 0) & 0x4)
            partuuid = str(p.guid).lower() if p.guid else None
            raw = p.raw
            # dissect computes last-first; a GPT range is inclusive
            size = (raw.last_lba - raw.first_lba + 1) * 512
        end = min(p.offset + size, self.size)
        if p.offset >= self.size or end <= p.offset:
            return  # an entry pointing outside the image: reported by its absence
        self._offsets[p.number] = (p.offset, end - p.offset)
        self.partitions.append(
            RawPartition(
                number=p.number,
                start=p.offset,
                size=size,
                type=type_str,
                type_name=_type_name(p),
                bootable=bootable,
                esp=esp,
                bios_boot=bios_boot,
                partuuid=partuuid,
                name=p.name or None,
            )
        )

    def open_partition(self, number: int) -> io.RawIOBase:
        """A read-only stream of partition ``number`` (clipped to the image)."""
        offset, size = self._offsets[number]
        return _Window(self.stream, offset, size)

    def open_whole(self) -> io.RawIOBase:
        """The whole disk as a stream (for a bare filesystem)."""
        return _Window(self.stream, 0, self.size)


def _type_name(p: Any) -> str | None:
    name = getattr(p, "type_name", None)
    return str(name) if name else None


class _Window(io.RawIOBase):
    """A bounded view of a seekable stream (reads never leave [offset, offset+size))."""

    def __init__(self, stream: BinaryIO, offset: int, size: int) -> None:
        self._s, self._off, self.size, self._pos = stream, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self._pos
        n = max(0, min(n, self.size - self._pos))
        if n == 0:
            return b""
        self._s.seek(self._off + self._pos)
        data = self._s.read(n)
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Nameless(io.RawIOBase):
    """``fh`` with read/seek/tell only: no ``name`` (nor ``fileno``) to find sibling files by."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(pos, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def read(self, n: int = -1) -> bytes:
        return self._fh.read(n)

    def readinto(self, b: Any) -> int:
        data = self._fh.read(len(b))
        b[: len(data)] = data
        return len(data)


def open_disk(fh: BinaryIO, fmt: str) -> Disk:
    """Open the image in ``fh`` (an open binary file) as ``fmt``; raise :class:`ReaderError` if impossible.

    :class:`ExternalReference` when the image needs another file: that file is never opened.
    """
    cls = _CONTAINERS.get(fmt)
    if cls is None:
        raise ReaderError(f"guest validation cannot read {fmt} images")
    try:
        reference = external_reference(fh, fmt)
    except Exception as exc:
        raise ReaderError(f"cannot open the image as {fmt}: {type(exc).__name__}: {exc}") from exc
    if reference is not None:
        raise ExternalReference(f"the image is {reference}")
    fh.seek(0)  # some containers (VHDX) parse from the current position
    try:
        container = cls(_Nameless(fh))
        size = int(container.size)
    except Exception as exc:
        raise ReaderError(f"cannot open the image as {fmt}: {type(exc).__name__}: {exc}") from exc
    return Disk(container, size)


class UnsupportedFilesystem(Exception):
    """The stream holds a filesystem (or volume format) we recognise but do not read.

    ``name`` is its blkid-style name; ``label``/``uuid`` are known for swap (fstab refers to it).
    """

    def __init__(self, name: str, label: str | None = None, uuid: str | None = None) -> None:
        super().__init__(name)
        self.name, self.label, self.uuid = name, label, uuid


class Filesystem:
    """A guest filesystem with primitive, non-following operations on symlink-free absolute paths."""

    def __init__(self, fs: Any, kind: str, label: str | None, uuid: str | None) -> None:
        self._fs = fs
        self.kind = kind
        self.label = label
        self.uuid = uuid
        self.case_sensitive = kind not in ("vfat", "ntfs")

    def _get(self, path: str) -> Any | None:
        try:
            return self._fs.get(path)
        except Exception:  # not found, not a directory, or a damaged structure: all "absent"
            return None

    def kind_of(self, path: str) -> str | None:
        """``file``, ``dir``, ``symlink``, ``other`` or ``None`` (absent) for ``path``, not following it."""
        entry = self._get(path)
        if entry is None:
            return None
        if entry.is_symlink():
            return "symlink"
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if entry.is_file(follow_symlinks=False):
            return "file"
        return "other"

    def readlink(self, path: str) -> str:
        """The target of the symlink at ``path``."""
        return str(self._fs.get(path).readlink())

    def read(self, path: str, limit: int) -> bytes:
        """At most ``limit`` bytes from the start of the regular file at ``path``."""
        with self._fs.get(path).open() as fh:
            return fh.read(limit)

    def open(self, path: str) -> BinaryIO:
        """A lazy stream of the regular file at ``path`` (for hives, which are parsed on demand)."""
        return self._fs.get(path).open()

    def listdir(self, path: str, limit: int) -> list[str]:
        """Up to ``limit`` names in the directory at ``path``."""
        names = []
        for name in self._fs.get(path).iterdir():
            if name in (".", ".."):
                continue
            names.append(str(name))
            if len(names) >= limit:
                break
        return names

    def subvolumes(self, names: tuple[str, ...]) -> list[tuple[str, Filesystem]]:
        """btrfs only: the named subvolumes (e.g. ``@``, ``root``) as filesystems of their own."""
        if self.kind != "btrfs":
            return []
        found = []
        for name in names:
            try:
                sub = self._fs.open_subvolume(subvol=name)
            except Exception:
                continue
            if getattr(sub, "subvolume", None) is not None:
                found.append((name, Filesystem(sub, self.kind, self.label, self.uuid)))
        return found


def preload() -> None:
    """Import every filesystem module dissect may try, ahead of :func:`open_filesystem` (a probe
    started before its disk is written does it while it waits). Detection is unchanged: dissect tries
    the same filesystems in the same order, it only finds them imported (a module that fails to import
    fails the same way later: dissect keeps the failure and skips it then as it would have)."""
    for filesystem in dt_filesystem.FILESYSTEMS:
        try:
            _ = filesystem.__type__  # the lazy attribute imports its module
        except Exception:
            continue


def open_filesystem(stream: BinaryIO) -> Filesystem | None:
    """The filesystem in ``stream``; ``None`` when nothing is recognised.

    Raises :class:`UnsupportedFilesystem` for a recognised format outside ext2/3/4, xfs, btrfs, vfat, ntfs.
    """
    try:
        stream.seek(0)
        fs = dt_filesystem.open(stream)
    except Exception:
        fs = None
    if fs is not None:
        kind = _SUPPORTED.get(fs.__type__)
        if kind is None:
            raise UnsupportedFilesystem(fs.__type__)
        label, uuid = _identity(fs)
        if fs.__type__ == "ext":
            kind = _ext_version(fs)
        return Filesystem(fs, kind, label, uuid)
    for offset, magic, name in _OTHER_MAGICS:
        stream.seek(offset)
        if stream.read(len(magic)) == magic:
            if name == "swap":
                raise UnsupportedFilesystem(name, *_swap_identity(stream))
            raise UnsupportedFilesystem(name)
    return None


def _swap_identity(stream: BinaryIO) -> tuple[str | None, str | None]:
    # swap header v1 (after 1 KiB of boot space): version, last_page, nr_badpages, uuid[16], volume_name[16]
    stream.seek(1024 + 12)
    raw = stream.read(32)
    if len(raw) < 32:
        return None, None
    label = raw[16:].split(b"\0")[0].decode("utf-8", "replace") or None
    return label, str(uuid_mod.UUID(bytes=raw[:16]))


def _ext_version(fs: Any) -> str:
    sb = fs.extfs.sb
    # incompat: extents 0x40, 64bit 0x80, flex_bg 0x200; ro_compat huge_file 0x8, dir_nlink 0x20
    if sb.s_feature_incompat & 0x2C0 or sb.s_feature_ro_compat & 0x28:
        return "ext4"
    return "ext3" if sb.s_feature_compat & 0x4 else "ext2"


def _identity(fs: Any) -> tuple[str | None, str | None]:
    """(label, uuid) spelled the way ``blkid`` (and so fstab ``LABEL=``/``UUID=``) spells them."""
    t = fs.__type__
    if t == "ext":
        return fs.extfs.volume_name or None, str(fs.extfs.uuid)
    if t == "xfs":
        return fs.xfs.name or None, str(fs.xfs.uuid)
    if t == "btrfs":
        return fs.btrfs.label or None, str(fs.btrfs.uuid)
    if t == "fat":
        vid = int(fs.fatfs.volume_id, 16)
        label = fs.fatfs.volume_label
        return (label if label and label != "NO NAME" else None), f"{vid >> 16:04X}-{vid & 0xFFFF:04X}"
    if t == "ntfs":
        serial = fs.ntfs.serial
        return fs.ntfs.volume_name or None, (f"{serial:016X}" if serial is not None else None)
    return None, None


def registry_values(stream: BinaryIO, key: str) -> dict[str, Any]:
    """The values of ``key`` (backslash path) in the registry hive read lazily from ``stream``."""
    # dissect.regf (registry hives) is heavy and only Windows guests need it
    from dissect.regf import RegistryHive

    hive = RegistryHive(stream)
    result: dict[str, Any] = {}
    for value in hive.open(key).values():
        try:
            result[value.name] = value.value
        except Exception:  # one damaged value must not hide the others
            continue
    return result
