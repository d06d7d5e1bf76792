"""Sector 0 of a disk image: a partition table (MBR, or the protective MBR of a GPT disk) or the volume
boot record of a bare FAT, NTFS or exFAT filesystem.

Both end in the boot signature ``55 AA``, so oslo.utils' ``gpt`` inspector takes any such sector for an
MBR and checks its four partition entries. A volume boot record keeps boot code (or zeros) where an MBR
keeps those entries, so a bare NTFS or FAT volume fails that check ("MBR PTE 0 has invalid boot flag",
"GPT MBR has no partitions defined") although it holds no partition table at all. This module is the one
place that tells the two apart; image inspection (:mod:`appliance.image.inspect`, also for conversion output),
the streaming check of RAW volume uploads (:mod:`appliance.steps.volume_import`) and the guest reader
(:mod:`appliance.guest.reader`) all ask it.

The rule: a sector that starts with an x86 jump and a consistent BIOS parameter block of FAT, NTFS or exFAT
is that filesystem's boot record, unless its partition entries form a table pointing at other sectors,
that is every boot indicator is 0x00 or 0x80 and some used entry starts after LBA 0. Entries that are all
zero, hold boot code (an invalid boot indicator) or only describe the volume itself (start LBA 0, as
``mkfs.fat --mbr`` writes) are not a partition table; Linux's msdos partition parser
(``block/partitions/msdos.c``) likewise reads a sector with an invalid boot indicator as a FAT boot sector
or as no table, never as partitions. A ``55 AA`` sector without a parameter block is always checked as a
partition table, and so is one with a parameter block and a table: a boot sector never exempts a table
from the MBR checks. A signature alone (the OEM name "NTFS") is not enough: the parameter block must be
consistent.

An MBR whose four entries are all zero is a valid, empty partition table: what ``parted mklabel msdos`` or
``sfdisk`` write on a freshly labelled data disk before any partition exists. oslo's check rejects it ("GPT
MBR has no partitions defined"), a rule meant for GPT's protective MBR; :func:`safety_check` accepts it.
Anything else in the entries (a bad boot flag, a protective entry with extras) is still checked by oslo.

Layout of sector 0 (byte offsets; integers little-endian)::

    MBR                                   0x000  boot code (440 bytes)
                                          0x1B8  disk signature (u32)
                                          0x1BE  4 partition entries of 16 bytes:
                                                   +0  boot indicator (0x00, or 0x80 = active)
                                                   +1  start CHS (3)   +4  type (0 = unused; 0xEE = GPT)
                                                   +5  end CHS (3)     +8  start LBA (u32)  +12 sectors (u32)
                                          0x1FE  boot signature 55 AA

    volume boot record, common            0x000  x86 jump: EB xx 90 or E9 xx xx
                                          0x003  OEM name (8): "NTFS    ", "EXFAT   "; any text on FAT
    FAT12/16/32 BIOS parameter block      0x00B  bytes per sector (u16): 512, 1024, 2048 or 4096
                                          0x00D  sectors per cluster (u8): 1, 2, 4 ... 128
                                          0x00E  reserved sectors (u16) >= 1
                                          0x010  number of FATs (u8) >= 1
                                          0x011  root directory entries (u16; 0 on FAT32), 32 bytes each,
                                                 filling whole sectors
                                          0x013  total sectors (u16; 0: see 0x020)
                                          0x015  media descriptor: 0xF0 or 0xF8-0xFF
                                          0x016  sectors per FAT (u16; 0 on FAT32: see 0x024)
                                          0x020  total sectors (u32)
                                          0x024  FAT32 sectors per FAT (u32)
    NTFS (BPB as ntfs-3g checks it)       0x00B  bytes per sector (u16): 256 ... 4096, a power of two
                                          0x00D  sectors per cluster (u8): 1 ... 128, or 0xF4-0xFF for
                                                 2**(256 - n) (clusters above 64 KiB)
                                          0x00E  reserved sectors (u16), 0x010 FATs (u8), 0x011 root
                                                 entries (u16), 0x013 sectors (u16), 0x016 sectors per
                                                 FAT (u16), 0x020 sectors (u32): all 0 on NTFS
                                          0x028  total sectors (u64) > 0
    exFAT main boot sector                0x00B  53 bytes that must be zero (where FAT has its BPB)
                                          0x048  volume length in sectors (u64) > 0
                                          0x06C  bytes-per-sector shift (u8): 9 ... 12
                                          0x06D  sectors-per-cluster shift (u8): <= 25 - the above
                                          0x06E  number of FATs (u8): 1 or 2

This module reads bytes only (no oslo.utils, no dissect), so the guest reader's limited child can use it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Protocol

SECTOR = 512
#: the boot signature at bytes 510-511 of an MBR and of a volume boot record
BOOT_SIGNATURE = b"\x55\xaa"
SIGNATURE_OFFSET = 0x1FE
#: bytes of MBR boot code before the disk signature
BOOT_CODE_SIZE = 0x1B8
PARTITION_ENTRIES = 0x1BE
PARTITION_ENTRY_SIZE = 16
GPT_PROTECTIVE = 0xEE
_ACTIVE_FLAGS = (0x00, 0x80)
_FAT_MEDIA = frozenset({0xF0, *range(0xF8, 0x100)})


@dataclass(frozen=True)
class PartitionEntry:
    """One of the four MBR partition entries, as stored (nothing validated)."""

    boot: int
    type: int
    start_lba: int
    sectors: int

    @property
    def used(self) -> bool:
        return self.type != 0


@dataclass(frozen=True)
class BootSector:
    """What sector 0 is.

    ``table``: ``"mbr"`` or ``"gpt"`` (a protective MBR) when the sector is a partition table, else None.
    ``filesystem``: ``"vfat"``, ``"ntfs"`` or ``"exfat"`` (blkid's names) when it carries that filesystem's
    BIOS parameter block, whether or not it is also a partition table.
    """

    table: str | None
    filesystem: str | None

    @property
    def volume(self) -> str | None:
        """The filesystem when the sector is its volume boot record and no partition table."""
        return self.filesystem if self.table is None else None


def partition_entries(sector: bytes) -> list[PartitionEntry]:
    """The four MBR partition entries of ``sector`` (empty when it is shorter than 512 bytes)."""
    if len(sector) < SECTOR:
        return []
    entries = []
    for i in range(4):
        boot, ptype, start, count = struct.unpack_from(
            "<B3xB3xII", sector, PARTITION_ENTRIES + PARTITION_ENTRY_SIZE * i
        )
        entries.append(PartitionEntry(boot, ptype, start, count))
    return entries


def _power_of_two(n: int, low: int, high: int) -> bool:
    return low <= n <= high and n & (n - 1) == 0


def _jump(sector: bytes) -> bool:
    return (sector[0] == 0xEB and sector[2] == 0x90) or sector[0] == 0xE9


def _is_ntfs(sector: bytes) -> bool:
    if sector[3:11] != b"NTFS    ":
        return False
    bytes_per_sector, per_cluster, reserved, fats, root_entries, sectors16 = struct.unpack_from(
        "<HBHBHH", sector, 0x0B
    )
    (sectors_per_fat,) = struct.unpack_from("<H", sector, 0x16)
    (sectors32,) = struct.unpack_from("<I", sector, 0x20)
    (total,) = struct.unpack_from("<Q", sector, 0x28)
    return (
        _power_of_two(bytes_per_sector, 256, 4096)
        and (_power_of_two(per_cluster, 1, 128) or per_cluster >= 0xF4)
        and not (reserved or fats or root_entries or sectors16 or sectors_per_fat or sectors32)
        and total > 0
    )


def _is_exfat(sector: bytes) -> bool:
    if sector[3:11] != b"EXFAT   " or any(sector[0x0B:0x40]):
        return False
    (length,) = struct.unpack_from("<Q", sector, 0x48)
    sector_shift, cluster_shift, fats = sector[0x6C], sector[0x6D], sector[0x6E]
    return length > 0 and 9 <= sector_shift <= 12 and cluster_shift <= 25 - sector_shift and fats in (1, 2)


def _is_fat(sector: bytes) -> bool:
    bytes_per_sector, per_cluster, reserved, fats, root_entries, sectors16, media, per_fat16 = (
        struct.unpack_from("<HBHBHHBH", sector, 0x0B)
    )
    sectors32, per_fat32 = struct.unpack_from("<II", sector, 0x20)
    return (
        _power_of_two(bytes_per_sector, 512, 4096)
        and _power_of_two(per_cluster, 1, 128)
        and reserved >= 1
        and fats >= 1
        and (root_entries * 32) % bytes_per_sector == 0
        and media in _FAT_MEDIA
        and (sectors16 or sectors32) > 0
        and (per_fat16 or per_fat32) > 0
    )


def boot_record_filesystem(sector: bytes) -> str | None:
    """``"ntfs"``, ``"exfat"`` or ``"vfat"`` when ``sector`` holds that filesystem's BIOS parameter block."""
    if len(sector) < SECTOR or not _jump(sector):
        return None
    if _is_ntfs(sector):
        return "ntfs"
    if _is_exfat(sector):
        return "exfat"
    if sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return None  # claims NTFS/exFAT but is not consistent: not read as FAT either
    return "vfat" if _is_fat(sector) else None


def _points_elsewhere(entries: list[PartitionEntry]) -> bool:
    """Whether ``entries`` form a partition table of other sectors (not boot code, not the volume itself)."""
    return all(e.boot in _ACTIVE_FLAGS for e in entries) and any(e.used and e.start_lba > 0 for e in entries)


def classify(sector: bytes) -> BootSector:
    """What the first 512 bytes of an image are (see the module docstring for the rule)."""
    filesystem = boot_record_filesystem(sector)
    if len(sector) < SECTOR or sector[SIGNATURE_OFFSET : SIGNATURE_OFFSET + 2] != BOOT_SIGNATURE:
        return BootSector(None, filesystem)
    entries = partition_entries(sector)
    if filesystem is not None and not _points_elsewhere(entries):
        return BootSector(None, filesystem)
    table = "gpt" if any(e.type == GPT_PROTECTIVE for e in entries) else "mbr"
    return BootSector(table, filesystem)


def empty_table(sector: bytes) -> bool:
    """Whether ``sector`` is an MBR with no partitions: the boot signature and four all-zero entries.

    All zero, not merely no used type: an entry with a zero type but a boot flag, an address or a size
    is something else than a fresh label, and stays for oslo's check to judge.
    """
    return (
        len(sector) >= SECTOR
        and sector[SIGNATURE_OFFSET : SIGNATURE_OFFSET + 2] == BOOT_SIGNATURE
        and not any(sector[PARTITION_ENTRIES:SIGNATURE_OFFSET])
    )


class _Inspector(Protocol):
    """The part of an oslo.utils ``FileInspector`` used here."""

    def region(self, name: str) -> Any: ...

    def safety_check(self) -> None: ...


def inspected_volume(inspector: _Inspector) -> str | None:
    """The filesystem when oslo's ``gpt`` inspector matched a volume boot record rather than a table.

    That inspector captures sector 0 as its region ``mbr`` and matches any ``55 AA`` sector except a FAT
    boot sector with 2 FATs and media 0xF8; every other inspector: None.
    """
    if str(inspector) != "gpt":
        return None
    return classify(bytes(inspector.region("mbr").data)).volume


def safety_check(inspector: _Inspector) -> None:
    """``inspector.safety_check()``, except that a volume boot record is not checked as an MBR and an
    empty partition table (:func:`empty_table`) is valid.

    The ``gpt`` inspector's only safety check is its MBR check, so for a volume boot record or an empty
    table nothing is left to run. Raises what ``safety_check`` raises (oslo's ``SafetyCheckFailed``).
    """
    if inspected_volume(inspector) is not None:
        return
    if str(inspector) == "gpt" and empty_table(bytes(inspector.region("mbr").data)):
        return
    inspector.safety_check()
