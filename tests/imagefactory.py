"""Builders of real disk images, good and hostile, for tests.

Every function writes into the directory it is given (a pytest ``tmp_path``) and returns the path of the
image. Images are made with the real ``qemu-img``, or written byte by byte with ``struct`` where qemu-img
cannot make the hostile variant. Sizes are small (a few MiB, sparse) so a test module can build dozens of
them quickly.

Good images: :func:`raw_mbr`, :func:`qcow2`, :func:`vmdk_sparse`, :func:`vmdk_stream`, :func:`vhd_dynamic`,
:func:`vhd_fixed`, :func:`vhdx`, :func:`vdi`, :func:`iso`; bare FAT and NTFS volumes (:func:`ntfs_volume`,
:func:`vfat_volume`, real mkfs); an empty partition table (:func:`empty_label`, real parted/sfdisk);
:func:`compress` wraps any file in gzip/xz/zstd/bzip2. Hostile images:
everything in the "hostile" section (see each docstring for what it exercises).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import zstandard

MiB = 1 << 20
GiB = 1 << 30
QEMU_IMG = "/usr/bin/qemu-img"
SUFFIXES = {"gzip": "gz", "xz": "xz", "zstd": "zst", "bzip2": "bz2"}


def qemu_img(*args: str | Path) -> None:
    """Run the real qemu-img (always the system binary, whatever PATH a test set)."""
    subprocess.run([QEMU_IMG, *map(str, args)], check=True, capture_output=True)


def convert(src: Path, dst: Path, qemu_format: str, options: str | None = None) -> Path:
    """``src`` (qcow2) converted with qemu-img to ``qemu_format`` at ``dst``, e.g. the disk a test uploads."""
    qemu_img("convert", "-f", "qcow2", "-O", qemu_format, *(["-o", options] if options else []), src, dst)
    return dst


def virtual_size(path: Path) -> int:
    """The virtual size qemu-img reports for ``path`` (what euca2ools sends as Image.Bytes for a VMDK)."""
    out = subprocess.run([QEMU_IMG, "info", "--output=json", str(path)], check=True, capture_output=True)
    return int(json.loads(out.stdout)["virtual-size"])


def patch(path: Path, offset: int, data: bytes) -> Path:
    """Overwrite ``data`` at ``offset`` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


# ------------------------------------------------------------------------------------------------- good


def mbr(partitions: list[tuple[int, int, int, int]]) -> bytes:
    """A 512-byte MBR with up to four ``(boot_flag, type, start_lba, sectors)`` entries and the 55AA mark."""
    sector = bytearray(512)
    for i, (boot, ptype, start, count) in enumerate(partitions):
        # CHS fields are legacy; (0, 2, 0) is what fdisk writes for LBA 1 and what oslo checks for 0xEE.
        struct.pack_into(
            "<B3BB3BII", sector, 446 + 16 * i, boot, 0, 2, 0, ptype, 0xFE, 0xFF, 0xFF, start, count
        )
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def raw_mbr(directory: Path, name: str = "disk.raw", size: int = 16 * MiB, boot_flag: int = 0x80) -> Path:
    """Raw disk with one Linux partition in an MBR and some non-zero data in it (the rest is sparse)."""
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(mbr([(boot_flag, 0x83, 2048, size // 512 - 2048)]))
        f.seek(MiB)
        rng = random.Random(7)
        f.write(b"imaging-appliance test data\n" * 4096 + rng.randbytes(128 * 1024))
    return path


def qcow2(
    directory: Path, name: str = "disk.qcow2", *, virtual_size: str = "64M", source: Path | None = None
) -> Path:
    """qcow2 v3 (compat 1.1): empty with ``virtual_size``, or converted from a raw ``source``."""
    path = directory / name
    if source is None:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=1.1", path, virtual_size)
    else:
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", source, path)
    return path


def _converted(directory: Path, name: str, fmt: str, options: str | None = None) -> Path:
    source = raw_mbr(directory, f".src-{name}.raw")
    path = directory / name
    qemu_img("convert", "-f", "raw", "-O", fmt, *(["-o", options] if options else []), source, path)
    source.unlink()
    return path


def vmdk_sparse(directory: Path, name: str = "disk.vmdk") -> Path:
    """Single-file VMDK, create type monolithicSparse, with data."""
    return _converted(directory, name, "vmdk", "subformat=monolithicSparse")


def vmdk_stream(directory: Path, name: str = "stream.vmdk") -> Path:
    """Single-file VMDK, create type streamOptimized (header, compressed grains, footer), with data."""
    return _converted(directory, name, "vmdk", "subformat=streamOptimized")


def vhd_dynamic(directory: Path, name: str = "dynamic.vhd") -> Path:
    """Dynamic VHD (``conectix`` footer copy at offset 0), with data."""
    return _converted(directory, name, "vpc", "subformat=dynamic")


def vhd_fixed(directory: Path, name: str = "fixed.vhd") -> Path:
    """Fixed VHD: the raw disk (starting with an MBR) followed by a 512-byte footer only."""
    return _converted(directory, name, "vpc", "subformat=fixed")


def vhdx(directory: Path, name: str = "disk.vhdx") -> Path:
    """Dynamic VHDX with data."""
    return _converted(directory, name, "vhdx")


def vdi(directory: Path, name: str = "disk.vdi") -> Path:
    """VirtualBox VDI with data."""
    return _converted(directory, name, "vdi")


def _iso_bytes(blocks: int = 512) -> bytearray:
    """An ISO 9660 image: 32 KiB system area, primary volume descriptor, set terminator; 2 KiB blocks."""
    image = bytearray(blocks * 2048)
    pvd = bytearray(2048)
    pvd[0:7] = b"\x01CD001\x01"
    pvd[8:40] = b"LINUX".ljust(32)
    pvd[40:72] = b"TEST_ISO".ljust(32)
    struct.pack_into("<I", pvd, 80, blocks)
    struct.pack_into(">I", pvd, 84, blocks)
    struct.pack_into("<HHHHHH", pvd, 120, 1, 0, 1, 0, 2048, 0)
    struct.pack_into(">H", pvd, 122, 1)
    struct.pack_into(">H", pvd, 126, 1)
    struct.pack_into(">H", pvd, 130, 2048)
    pvd[881] = 1  # file structure version
    image[32768 : 32768 + 2048] = pvd
    image[34816 : 34816 + 7] = b"\xffCD001\x01"  # volume descriptor set terminator
    return image


def iso(directory: Path, name: str = "cd.iso") -> Path:
    """Plain ISO 9660 image (handcrafted volume descriptors; no genisoimage needed)."""
    path = directory / name
    path.write_bytes(_iso_bytes())
    return path


def compress(path: Path, kind: str, *, name: str | None = None) -> Path:
    """``path`` compressed in-process with ``kind`` (gzip, xz, zstd, bzip2) into a new file next to it."""
    out = path.parent / (name or f"{path.name}.{SUFFIXES[kind]}")
    data = path.read_bytes()
    if kind == "gzip":
        out.write_bytes(gzip.compress(data, compresslevel=1))
    elif kind == "xz":
        out.write_bytes(lzma.compress(data, preset=0))
    elif kind == "bzip2":
        out.write_bytes(bz2.compress(data, compresslevel=1))
    elif kind == "zstd":
        out.write_bytes(zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data))
    else:
        raise ValueError(kind)
    return out


# ----------------------------------------------------------------------------------------- bare volumes
# A partition image: one filesystem, no partition table. FAT and NTFS start with a volume boot record,
# which ends in 55 AA like an MBR; appliance/image/bootsector.py tells the two apart.

#: the messages at the end of Windows' NTFS boot code, which run through bytes 0x1BE-0x1FD (where an MBR
#: keeps its partition entries) up to the boot signature
WINDOWS_BOOT_MESSAGES = (
    b"\r\nA disk read error occurred\0\r\nBOOTMGR is missing\0\r\nBOOTMGR is compressed\0"
    b"\r\nPress Ctrl+Alt+Del to restart\r\n\0"
)
#: a boot message for ``mkfs.fat -m`` long enough to fill the FAT boot code area, as Windows' does
LONG_BOOT_MESSAGE = (
    "This is a data volume without an operating system. Remove disks or other media and press any key "
    "to restart. If this message appears after a restart, check the boot order in the firmware setup "
    "and make sure the system disk is the first one. Disk error: the volume boot record was read, but "
    "no loader was found on this volume. Press any key to restart the computer now.\r\n"
)


def ntfs_volume(
    directory: Path, name: str = "volume.ntfs", size_mib: int = 16, *, windows_boot_code: bool = False
) -> Path:
    """A bare NTFS filesystem made by ``mkfs.ntfs`` (label ``DATA``).

    mkfs.ntfs leaves bytes 0x1BE-0x1FD zero, so oslo's MBR check says "GPT MBR has no partitions defined".
    ``windows_boot_code`` ends the boot code area with Windows' boot messages, in the boot sector and its
    backup in the last sector, so the check says "MBR PTE 0 has invalid boot flag" as it does for a volume
    Windows formatted.
    """
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["mkfs.ntfs", "-q", "-F", "-f", "-L", "DATA", str(path)], check=True, capture_output=True)
    if windows_boot_code:
        with open(path, "r+b") as f:
            sector = bytearray(f.read(512))
            f.seek(-512, 2)
            backup = f.read(512) == sector
            sector[0x1FE - len(WINDOWS_BOOT_MESSAGES) : 0x1FE] = WINDOWS_BOOT_MESSAGES
            for offset in (0, path.stat().st_size - 512) if backup else (0,):
                f.seek(offset)
                f.write(sector)
    return path


def vfat_volume(
    directory: Path,
    name: str = "volume.vfat",
    size_kib: int = 16 * 1024,
    *,
    fats: int = 2,
    boot_message: bool = False,
    fake_mbr: bool = False,
) -> Path:
    """A bare FAT filesystem made by ``mkfs.fat`` (label ``DATA``, volume id ``1234-ABCD``).

    oslo's inspector passes over a FAT boot sector only when it has 2 FATs and media 0xF8; with a floppy
    size (1440 KiB: media 0xF0) or ``fats=1`` it checks the sector as an MBR. ``boot_message`` replaces
    the boot message with :data:`LONG_BOOT_MESSAGE` (``mkfs.fat -m``), which runs through the
    partition-entry bytes; ``fake_mbr`` (``mkfs.fat --mbr=y``) writes one partition entry that starts at
    LBA 0 and describes the volume itself.
    """
    path = directory / name
    argv: list[str | Path] = ["mkfs.fat", "-C", "-f", str(fats), "-n", "DATA", "-i", "1234ABCD"]
    if boot_message:
        message = directory / f".{name}.message"
        message.write_text(LONG_BOOT_MESSAGE)
        argv += ["-m", message]
    if fake_mbr:
        argv.append("--mbr=y")
    subprocess.run([*map(str, argv), str(path), str(size_kib)], check=True, capture_output=True)
    return path


def empty_label(directory: Path, tool: str = "parted", name: str | None = None, size_mib: int = 16) -> Path:
    """A raw disk with an empty MBR partition table, as ``parted mklabel msdos`` or ``sfdisk`` (``tool``)
    label a fresh data disk: boot signature and disk identifier, four all-zero partition entries."""
    path = directory / (name or f"empty-{tool}.raw")
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    if tool == "parted":
        subprocess.run(["parted", "-s", str(path), "mklabel", "msdos"], check=True, capture_output=True)
    elif tool == "sfdisk":
        subprocess.run(["sfdisk", "-q", str(path)], input=b"label: dos\n", check=True, capture_output=True)
    else:
        raise ValueError(f"unknown partitioning tool {tool!r}")
    return path


# ---------------------------------------------------------------------------------------------- hostile


def qcow2_backing(directory: Path, target: str = "/etc/passwd", name: str = "backing.qcow2") -> Path:
    """qcow2 whose backing file is a host file (CVE-2022-47951 family; matrix Q2)."""
    path = directory / name
    # -u: do not open the backing file while creating (it need not exist; inspection must never open it)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", target, "-F", "raw", path, "1M")
    return path


def qcow2_data_file(directory: Path, name: str = "datafile.qcow2") -> Path:
    """qcow2 with an external data file (CVE-2024-32498; matrix Q3), a file in ``directory``."""
    path = directory / name
    host_file = directory / "host-data.bin"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={host_file},data_file_raw=on", path, "1M")
    return path


def qcow2_feature_bit(
    directory: Path, byte: int = 0x4F, bit: int = 0x80, name: str = "feature.qcow2"
) -> Path:
    """qcow2 v3 with an unknown incompatible-feature bit set (matrix Q5); byte 0x4F bit 0x02 is "corrupt"."""
    path = qcow2(directory, name, virtual_size="1M")
    with open(path, "r+b") as f:
        f.seek(byte)
        value = f.read(1)[0]
        f.seek(byte)
        f.write(bytes([value | bit]))
    return path


def qcow2_version(directory: Path, version: int, name: str | None = None) -> Path:
    """qcow2 whose header version field says ``version`` (1 and 4 are unsupported; matrix Q4)."""
    path = qcow2(directory, name or f"v{version}.qcow2", virtual_size="1M")
    return patch(path, 4, struct.pack(">I", version))


def qcow2_with_data(directory: Path, name: str = "data.qcow2") -> Path:
    """qcow2 converted from :func:`raw_mbr`, so it has L1/L2 tables and allocated clusters."""
    source = raw_mbr(directory, f".src-{name}.raw")
    path = qcow2(directory, name, source=source)
    source.unlink()
    return path


def _qcow2_header(path: Path) -> dict[str, int]:
    with open(path, "rb") as f:
        head = f.read(72)
    (cluster_bits,) = struct.unpack_from(">I", head, 20)
    l1_offset, refcount_offset = struct.unpack_from(">QQ", head, 40)
    return {"cluster_bits": cluster_bits, "l1": l1_offset, "refcount_table": refcount_offset}


def qcow2_truncated(directory: Path, name: str = "truncated.qcow2") -> Path:
    """qcow2 cut off after its header and tables: the inspector passes it, qemu-img check fails it."""
    path = qcow2_with_data(directory, name)
    with open(path, "r+b") as f:
        f.truncate(0x40000)  # header, refcount table and block, L1 survive; L2 and data clusters do not
    return path


def qcow2_corrupt_l1(directory: Path, name: str = "badl1.qcow2") -> Path:
    """qcow2 whose first L1 entry points at an unaligned offset outside the file (check: corruption)."""
    path = qcow2_with_data(directory, name)
    return patch(path, _qcow2_header(path)["l1"], struct.pack(">Q", (1 << 63) | 0x7777000))


def qcow2_corrupt_refcount(directory: Path, name: str = "badrefcount.qcow2") -> Path:
    """qcow2 whose refcount table entry has reserved bits set (qemu-img check: corruption)."""
    path = qcow2_with_data(directory, name)
    return patch(path, _qcow2_header(path)["refcount_table"], struct.pack(">Q", 0x123))


def qcow2_unreferenced_clusters(directory: Path, name: str = "unreferenced.qcow2", data_mib: int = 8) -> Path:
    """qcow2 of 512-byte clusters holding ``data_mib`` MiB of random data whose refcount table is zeroed:
    ``qemu-img check`` prints a line for every one of its clusters (about 230 bytes per KiB of image)."""
    src = directory / f".src-{name}.raw"
    src.write_bytes(random.Random(name).randbytes(data_mib * MiB))
    path = directory / name
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", src, path)
    src.unlink()
    header = _qcow2_header(path)
    with open(path, "rb") as f:
        f.seek(56)
        (table_clusters,) = struct.unpack(">I", f.read(4))
    return patch(path, header["refcount_table"], bytes(table_clusters << header["cluster_bits"]))


def qcow2_leaked_cluster(directory: Path, name: str = "leak.qcow2") -> Path:
    """qcow2 with one leaked cluster (refcount 1, no reference): qemu-img check exits 3, leaks only."""
    path = qcow2_with_data(directory, name)
    header = _qcow2_header(path)
    cluster = 1 << header["cluster_bits"]
    with open(path, "rb") as f:
        f.seek(header["refcount_table"])
        (block,) = struct.unpack(">Q", f.read(8))
    clusters = path.stat().st_size // cluster
    with open(path, "r+b") as f:
        f.truncate((clusters + 1) * cluster)  # one more, unreferenced cluster …
        f.seek(block + 2 * clusters)
        f.write(struct.pack(">H", 1))  # … that the refcount block says is in use
    return path


def qcow2_corrupt_flag(directory: Path, name: str = "corruptflag.qcow2") -> Path:
    """qcow2 v3 with the "corrupt" bit (0x02) set: the inspector allows it, qemu-img reports it."""
    return qcow2_feature_bit(directory, bit=0x02, name=name)


def qcow2_huge(directory: Path, virtual_size: str = "3T", name: str = "huge.qcow2") -> Path:
    """Sparse qcow2 with a very large virtual size (a few hundred KiB on disk)."""
    return qcow2(directory, name, virtual_size=virtual_size)


def mbr_claiming_ntfs(directory: Path, name: str = "claims-ntfs.raw") -> Path:
    """:func:`raw_mbr` with an invalid boot flag whose sector 0 starts with an x86 jump and the NTFS OEM name
    but holds no NTFS parameter block: a name alone does not make a sector a volume boot record."""
    return patch(raw_mbr(directory, name, boot_flag=0x12), 0, b"\xeb\x52\x90NTFS    ")


def fat_volume_with_partition_table(directory: Path, name: str = "fat-with-table.raw") -> Path:
    """A real FAT volume (one FAT, so oslo checks it) whose partition entries point at other sectors: a GPT
    protective entry starting at LBA 2 instead of 1. A real boot sector does not exempt a partition
    table from the MBR checks ("GPT MBR has invalid start LBA")."""
    path = vfat_volume(directory, name, fats=1)
    return patch(path, 0x1BE, mbr([(0x00, 0xEE, 2, 1000)])[0x1BE:0x1FE])


def vmdk_flat(directory: Path, name: str = "flat.vmdk") -> Path:
    """monolithicFlat VMDK: a text descriptor plus ``<name>-flat.vmdk`` (CVE-2022-47951; matrix V1)."""
    path = directory / name
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", path, "1M")
    return path


def vmdk_descriptor(
    directory: Path,
    extent: str,
    *,
    create_type: str = "monolithicSparse",
    name: str = "descriptor.vmdk",
) -> Path:
    """Text-only VMDK descriptor whose single extent is ``extent`` (names a sibling file)."""
    path = directory / name
    path.write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        f'createType="{create_type}"\n'
        "\n"
        "# Extent description\n"
        f'RW 2048 SPARSE "{extent}"\n'
        "\n"
        'ddb.virtualHWVersion = "4"\n'
    )
    return path


def vmdk_sibling_extent(directory: Path, name: str = "descriptor.vmdk") -> Path:
    """Descriptor naming the bare sibling ``other.vmdk`` (which exists, as a real sparse VMDK).

    oslo.utils 10.2 passes this one: its only extent check is for ``/``.
    """
    qemu_img("create", "-q", "-f", "vmdk", directory / "other.vmdk", "1M")
    return vmdk_descriptor(directory, "other.vmdk", name=name)


def vmdk_delta(directory: Path, name: str = "delta.vmdk") -> Path:
    """VMDK delta disk whose parent is ``base.vmdk`` next to it (binary KDMV; oslo.utils 10.2 passes it)."""
    base = directory / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, "1M")
    path = directory / name
    qemu_img("create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", path)
    return path


def qed(directory: Path, name: str = "disk.qed") -> Path:
    """QED image (banned format; matrix D1)."""
    path = directory / name
    qemu_img("create", "-q", "-f", "qed", path, "1M")
    return path


def iso_hybrid(directory: Path, name: str = "hybrid.iso") -> Path:
    """Bootable "hybrid" ISO: ISO 9660 plus an MBR with one bootable partition over the image (matrix I2)."""
    image = _iso_bytes()
    image[0:512] = mbr([(0x80, 0x17, 0, len(image) // 512)])
    path = directory / name
    path.write_bytes(image)
    return path


def iso_qcow2_polyglot(directory: Path, name: str = "polyglot.iso") -> Path:
    """ISO whose 32 KiB system area starts with a real qcow2 header (matrix I1)."""
    header = qcow2(directory, ".polyglot-src.qcow2", virtual_size="1M")
    image = _iso_bytes()
    image[0:512] = header.read_bytes()[:512]
    header.unlink()
    path = directory / name
    path.write_bytes(image)
    return path


def vhd_fixed_with_qcow2(directory: Path, name: str = "nested.vhd") -> Path:
    """A fixed-VHD footer appended to a qcow2: qemu-img would read it as vpc, the content is qcow2."""
    inner = qcow2(directory, ".nested-src.qcow2", virtual_size="1M")
    fixed = vhd_fixed(directory, ".nested-src.vhd")
    path = directory / name
    path.write_bytes(inner.read_bytes() + fixed.read_bytes()[-512:])
    inner.unlink()
    fixed.unlink()
    return path


def raw_hiding_qcow2(directory: Path, name: str = "hidden.raw") -> Path:
    """ "Raw" file that is really a qcow2 (format confusion; also the shape of a bad conversion output)."""
    return qcow2(directory, name, virtual_size="1M")


def zeros(total: int, chunk: int = 16 * MiB) -> Iterator[bytes]:
    """``total`` zero bytes in chunks, without ever holding ``total`` in memory."""
    block = bytes(chunk)
    remaining = total
    while remaining > 0:
        n = min(chunk, remaining)
        yield block if n == chunk else bytes(n)
        remaining -= n


def _compress_stream(kind: str, chunks: Iterator[bytes]) -> bytes:
    """One complete gzip member / xz stream / bzip2 stream / zstd frame of ``chunks``, streamed."""
    if kind == "gzip":
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        return b"".join(c.compress(chunk) for chunk in chunks) + c.flush()
    if kind == "xz":
        c = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=0)
        return b"".join(c.compress(chunk) for chunk in chunks) + c.flush()
    if kind == "bzip2":
        c = bz2.BZ2Compressor(1)
        return b"".join(c.compress(chunk) for chunk in chunks) + c.flush()
    if kind == "zstd":
        z = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj()
        return b"".join(z.compress(chunk) for chunk in chunks) + z.flush()
    raise ValueError(kind)


def bomb(directory: Path, kind: str = "gzip", total: int = 2 * GiB, name: str | None = None) -> Path:
    """Decompression bomb: a ``kind`` stream of ``total`` zero bytes, compressed in-process from a generator.

    Compressing 64 MiB once and repeating that member/stream/frame keeps this fast (a 2 GiB gzip bomb takes
    ~0.2 s and is ~2 MiB); concatenated members decode as one stream, as the command-line tools do.
    """
    unit = min(total, 64 * MiB)
    member = _compress_stream(kind, zeros(unit))
    path = directory / (name or f"bomb.raw.{SUFFIXES[kind]}")
    with open(path, "wb") as f:
        for _ in range(total // unit):
            f.write(member)
    return path


def gzip_bomb(directory: Path, total: int = 2 * GiB, name: str = "bomb.raw.gz") -> Path:
    """gzip bomb of ``total`` zero bytes (see :func:`bomb`)."""
    return bomb(directory, "gzip", total, name)
