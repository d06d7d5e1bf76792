"""Independent readers of the disks the appliance exports, for tests: each reads a whole VHD or VMDK and
gives back its size and the sha256 of its bytes, to compare with the source's; and the VHD structures
checked field by field against Microsoft's Virtual Hard Disk Image Format Specification (1.0).

Readers, none of them the project's code nor qemu-img:

* ``dissect``: dissect.hypervisor's VHD reader (footer, dynamic header, block allocation table) and VMDK
  reader (the footer's grain directory and the grain tables), in the test's own interpreter;
* ``libyal``: libvhdi and libvmdk (Debian's ``python3-libvhdi`` and ``python3-libvmdk``, C libraries
  with Python bindings built for the system Python), run by ``/usr/bin/python3`` in a subprocess
  because the project's venv does not see the system's site-packages.

:func:`vhd_problems` is the check a second reader would make of a VHD's metadata, written from the
specification (its CHS algorithm included), not from the writer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dissect.hypervisor.disk.vhd import VHD
from dissect.hypervisor.disk.vmdk import VMDK

from tests import imagefactory as factory

SECTOR = 512
#: reads of this size: a few hundred MiB disk never sits in memory whole
CHUNK = 4 << 20
#: the interpreter the libyal bindings are built for (Debian's packages install into its dist-packages)
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class Read:
    """What a reader saw: the disk's size and the sha256 of all its bytes, and the disk type it named."""

    reader: str
    size: int
    sha256: str
    disk_type: str = ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def source(path: Path) -> Read:
    """The source disk as the readers should give it back."""
    return Read("source", path.stat().st_size, sha256_file(path))


def read_with_dissect(path: Path, fmt: str) -> Read:
    """The whole disk through dissect.hypervisor's reader of ``fmt`` (``vhd`` or ``vmdk``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if fmt == "vhd":
            vhd = VHD(f)
            size, kind = vhd.size, "fixed" if vhd.disk.footer.disk_type == 2 else "dynamic"
            while chunk := vhd.read(CHUNK):
                h.update(chunk)
            return Read("dissect", size, h.hexdigest(), kind)
        vmdk = VMDK(f)
        # by sector runs that end at the capacity: VMDK.read() asks for whole 8 KiB blocks and fails with
        # IndexError past its last extent when the capacity is not a multiple of 16 sectors, which the
        # format allows (the header's capacity is a count of sectors that "should" be whole grains;
        # qemu-img and VMware's open-vmdk write the disk's exact count): dissect's bug, not the disk's
        sector, total = 0, vmdk.sector_count
        while sector < total:
            count = min(CHUNK // SECTOR, total - sector)
            h.update(vmdk.read_sectors(sector, count))
            sector += count
        kind = vmdk.disks[0].descriptor.attr.get("createType", "") if vmdk.disks[0].descriptor else ""
        return Read("dissect", total * SECTOR, h.hexdigest(), kind.strip('"'))


_LIBYAL = r"""
import hashlib, json, sys
fmt, path, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
if fmt == "vhd":
    import pyvhdi as lib
    disk = lib.file()
    disk.open(path)
    types = {2: "fixed", 3: "dynamic", 4: "differential"}
else:
    import pyvmdk as lib
    disk = lib.handle()
    disk.open(path)
    # the extent by the name the embedded descriptor gives it, beside the file: a name that is not the
    # file's fails here
    disk.open_extent_data_files()
    types = {7: "monolithicSparse", 8: "streamOptimized"}
size = disk.get_media_size()
h = hashlib.sha256()
at = 0
while at < size:
    data = disk.read_buffer_at_offset(min(chunk, size - at), at)
    if not data:
        sys.exit(f"read nothing at {at} of {size}")
    h.update(data)
    at += len(data)
kind = types.get(disk.get_disk_type(), str(disk.get_disk_type()))
print(json.dumps({"size": size, "sha256": h.hexdigest(), "type": kind, "version": lib.get_version()}))
"""


def read_with_libyal(path: Path, fmt: str) -> Read:
    """The whole disk through libvhdi (``vhd``) or libvmdk (``vmdk``), in the system Python."""
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", _LIBYAL, fmt, str(path), str(CHUNK)], capture_output=True, text=True
    )
    if done.returncode != 0:
        if "ModuleNotFoundError" in done.stderr:
            raise AssertionError(f"libyal's Python bindings are missing (make system-deps): {done.stderr}")
        raise AssertionError(f"libyal refused {path.name}: {done.stderr.strip()}")
    answer = json.loads(done.stdout)
    return Read("libyal", answer["size"], answer["sha256"], answer["type"])


Reader = Callable[[Path, str], Read]
#: every independent reader, by name
READERS: dict[str, Reader] = {"dissect": read_with_dissect, "libyal": read_with_libyal}


def read_by_each(path: Path, fmt: str) -> dict[str, Read]:
    """The disk at ``path`` (``vhd`` or ``vmdk``) read whole by every reader."""
    return {name: read(path, fmt) for name, read in READERS.items()}


# ------------------------------------------------------------------------------- the disks they read

MiB = factory.MiB
#: the source disks every export is read back from: one sector; a size that is a multiple of neither the
#: 2 MiB VHD block nor the 64 KiB grain, data in its partial last block; data only in the first sector and
#: the last block of 66 MiB (empty BAT entries, an empty 32 MiB grain-table span); a 300 MiB (and 33 KiB)
#: FAT filesystem holding real files
CASES = ("one-sector", "odd-size", "data-in-last-block", "filesystem")
#: what the filesystem case holds besides the project's code: binaries, firmware and libraries of the
#: system packages the tests need anyway (about 75 MiB in all)
_FILES = (factory.QEMU_IMG, "/usr/bin/qemu-system-x86_64", "/usr/share/qemu", "/usr/lib/postgresql")


def case_disk(directory: Path, case: str) -> Path:
    """The source disk of ``case`` (:data:`CASES`) in ``directory``."""
    rnd = random.Random(case)
    path = directory / f"{case}.raw"
    if case == "filesystem":
        factory.vfat_volume(directory, path.name, size_kib=300 * 1024 + 33)
        code = Path(__file__).resolve().parents[1] / "appliance"
        subprocess.run(
            ["mcopy", "-i", str(path), "-s", *_FILES, str(code), "::"], check=True, capture_output=True
        )
        return path
    size = {"one-sector": SECTOR, "odd-size": 5 * MiB + 3 * SECTOR, "data-in-last-block": 66 * MiB}[case]
    with open(path, "wb") as f:
        f.truncate(size)
        if case == "one-sector":
            f.write(rnd.randbytes(SECTOR))
        elif case == "odd-size":  # text in the second block, random bytes across the last, partial one
            f.seek(MiB + 100)
            f.write(b"a line of a log file\n" * 20000)
            f.seek(4 * MiB - 4096)
            f.write(rnd.randbytes(size - f.tell()))
        else:
            f.write(rnd.randbytes(SECTOR))
            f.seek(size - 4096)
            f.write(rnd.randbytes(4096))
    assert os.path.getsize(path) == size
    return path


# -------------------------------------------------------------------------------- the VHD specification

#: seconds from the Unix epoch to the specification's, 2000-01-01 00:00:00 UTC
EPOCH_2000 = 946684800
FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
DYNAMIC_HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
#: the block size the writer uses (the specification's default; Hyper-V's and qemu-img's)
BLOCK = 2 << 20
UNUSED = 0xFFFFFFFF


def chs(size: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors per track of a ``size``-byte disk: the specification's appendix
    ("CHS Calculation"), step by step."""
    total_sectors = size // SECTOR
    if total_sectors > 65535 * 16 * 255:
        total_sectors = 65535 * 16 * 255
    if total_sectors >= 65535 * 16 * 63:
        sectors_per_track = 255
        heads = 16
        cylinder_times_heads = total_sectors // sectors_per_track
    else:
        sectors_per_track = 17
        cylinder_times_heads = total_sectors // sectors_per_track
        heads = (cylinder_times_heads + 1023) // 1024
        if heads < 4:
            heads = 4
        if cylinder_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track = 31
            heads = 16
            cylinder_times_heads = total_sectors // sectors_per_track
        if cylinder_times_heads >= heads * 1024:
            sectors_per_track = 63
            heads = 16
            cylinder_times_heads = total_sectors // sectors_per_track
    return cylinder_times_heads // heads, heads, sectors_per_track


def _ones_complement(data: bytes, at: int) -> int:
    """The checksum of a structure: the one's complement of the sum of its bytes, its own 4 taken as 0."""
    return ~sum(data[:at] + bytes(4) + data[at + 4 :]) & 0xFFFFFFFF


def vhd_problems(
    path: Path, size: int, disk_type: str, written: tuple[float, float] | None = None
) -> list[str]:
    """Where the VHD at ``path`` departs from the specification, or from what the writer's docstring says
    it writes, for a disk of ``size`` bytes of ``disk_type`` (``dynamic`` or ``fixed``) written between
    the Unix times ``written`` (when given): an empty list for a good one."""
    problems: list[str] = []

    def want(name: str, got: object, expected: object) -> None:
        if got != expected:
            problems.append(f"{name}: {got!r}, not {expected!r}")

    data_length = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(data_length - SECTOR)
        tail = f.read(SECTOR)
        f.seek(0)
        head = f.read(3 * SECTOR)
    (cookie, features, version, data_offset, stamp, app, app_version, host, original, current,
     cylinders, heads, spt, kind, checksum, unique_id, saved, reserved) = FOOTER.unpack(tail)  # fmt: skip
    want("footer cookie", cookie, b"conectix")
    want("features (the reserved bit 1, not temporary)", features, 2)
    want("file format version", version, 0x00010000)
    want("data offset", data_offset, SECTOR if disk_type == "dynamic" else 0xFFFFFFFFFFFFFFFF)
    if written is not None:
        first, last = int(written[0]) - EPOCH_2000, int(written[1]) + 1 - EPOCH_2000
        if not first <= stamp <= last:
            problems.append(f"time stamp: {stamp}, not seconds since 2000 between {first} and {last}")
    want("creator application", app, b"qem2")
    want("creator version", app_version, 0x00050003)
    want("creator host OS", host, b"Wi2k")
    want("original size", original, size)
    want("current size", current, size)
    want("disk geometry", (cylinders, heads, spt), chs(size))
    if cylinders * heads * spt * SECTOR > size:
        problems.append(f"the geometry {cylinders}/{heads}/{spt} holds more than the disk's {size} bytes")
    want("disk type", kind, {"fixed": 2, "dynamic": 3}[disk_type])
    want("footer checksum", checksum, _ones_complement(tail, 64))
    if unique_id == bytes(16):
        problems.append("unique id: all zeros")
    want("saved state", saved, 0)
    want("footer reserved bytes", reserved, bytes(427))
    if disk_type == "fixed":
        want("file length (the disk, then the footer)", data_length, size + SECTOR)
        return problems
    want("footer copy at offset 0", head[:SECTOR], tail)
    blocks = -(-size // BLOCK)
    problems += _dynamic_problems(path, head[SECTOR:], blocks, data_length)
    return problems


def _dynamic_problems(path: Path, header: bytes, blocks: int, data_length: int) -> list[str]:
    """The dynamic disk header and the block allocation table of a disk of ``blocks`` blocks."""
    problems: list[str] = []

    def want(name: str, got: object, expected: object) -> None:
        if got != expected:
            problems.append(f"{name}: {got!r}, not {expected!r}")

    (cookie, data_offset, table_offset, version, entries, block_size, checksum, parent_id, parent_stamp,
     reserved, parent_name, locators, reserved2) = DYNAMIC_HEADER.unpack(header)  # fmt: skip
    want("dynamic header cookie", cookie, b"cxsparse")
    want("dynamic header data offset (unused)", data_offset, 0xFFFFFFFFFFFFFFFF)
    want("table offset", table_offset, 3 * SECTOR)
    want("header version", version, 0x00010000)
    want("max table entries", entries, blocks)
    want("block size", block_size, BLOCK)
    want("dynamic header checksum", checksum, _ones_complement(header, 36))
    want("parent unique id", parent_id, bytes(16))
    want("parent time stamp", parent_stamp, 0)
    want("parent unicode name and locators", parent_name + locators, bytes(512 + 192))
    want("dynamic header reserved fields", (reserved, reserved2), (0, bytes(256)))
    table_bytes = -(-blocks * 4 // SECTOR) * SECTOR
    with open(path, "rb") as f:
        f.seek(table_offset)
        table = struct.unpack(f">{blocks}I", f.read(blocks * 4))
    stride = SECTOR + BLOCK  # a block's bitmap (one bit per sector, padded to a sector), then its data
    first = table_offset + table_bytes
    stored = sorted(sector * SECTOR for sector in table if sector != UNUSED)
    for at in stored:
        if at < first or at + stride > data_length - SECTOR or (at - first) % SECTOR:
            problems.append(f"a block at byte {at}: outside {first}..{data_length - SECTOR} or misaligned")
    if any(b - a < stride for a, b in itertools.pairwise(stored)):
        problems.append("two blocks of the allocation table overlap")
    want(
        "file length (tables, the stored blocks, the footer)",
        data_length,
        first + len(stored) * stride + SECTOR,
    )
    return problems
