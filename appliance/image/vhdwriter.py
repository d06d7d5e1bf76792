"""A one-pass writer of VHD (Microsoft's Virtual Hard Disk Image Format Specification 1.0), dynamic or
fixed, from a RAW disk: the output is written strictly forward (a file, an S3 multipart upload), so an
export streams with no scratch copy and hashes its bytes as they go, instead of ``qemu-img convert -O vpc``
into scratch followed by a second read to hash and upload it.

Dynamic (what AWS exports)::

    0       the footer copy (512 bytes; disk type 3, data offset 512)
    512     the dynamic disk header (1024 bytes; "cxsparse", table offset 1536, block size 2 MiB)
    1536    the block allocation table: one big-endian u32 per 2 MiB block, the sector of the block's
            bitmap, or 0xFFFFFFFF for a block never written; padded to a sector
    then    each allocated block in LBA order: its sector bitmap (512 bytes, every sector present) and its
            2 MiB of data (the disk's last block padded with zeros)
    end     the footer (512 bytes)

Which blocks are allocated is decided before the table is written, from the source's data map
(``SEEK_DATA``/``SEEK_HOLE``, :func:`appliance.image.vmdkwriter.data_ranges`): a block that holds any of
the file's data is stored, a block that is all hole is not (it reads as zeros). A source without a data map
(a block device) would store every block: :func:`has_data_map` tells the caller, who then keeps qemu-img.

Fixed: the disk's bytes, then the footer (disk type 2).

The footer is what ``qemu-img convert -O vpc -o force_size=on`` writes: creator ``qem2`` (which tells
qemu-img, like Hyper-V's ``win``, to take the size from the footer's current size rather than from the CHS
geometry), creator version 5.3 on ``Wi2k``, a random unique id, the one's-complement checksum; but the
geometry of the specification's algorithm (:func:`geometry`), where qemu-img with ``force_size`` writes the
largest, 65535/16/255, whatever the disk's size.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import pagecache
from ..errors import Cancelled, UsageError
from .decoding import SECTOR, zeros
from .readbuf import ReadPool, read_ahead
from .vmdkwriter import ByteSink, data_ranges

#: bytes of data per dynamic block (the specification's default, qemu-img's and Hyper-V's)
BLOCK = 2 << 20
#: sectors of a block's bitmap (one bit per data sector, padded to a sector)
BITMAP_SECTORS = -(-(BLOCK // SECTOR // 8) // SECTOR)
#: the largest disk a VHD holds (the specification's 2040 GiB)
MAX_SIZE = 2040 << 30
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_DYNAMIC = struct.Struct(">8sQQIIII16sII512s192s256s")
#: blocks announced to the kernel ahead of the one being read (:func:`_announce`): 16 MiB in flight
READ_AHEAD = 8
#: reused block buffers, at most (:class:`appliance.image.readbuf.ReadPool`): what the output's and the
#: source's chunked digests may hold queued (32 MiB per hashing thread each, two CPUs here), plus the one read
POOL = 48
_EPOCH_2000 = 946684800
_NO_BLOCK = 0xFFFFFFFF
DYNAMIC, FIXED = 3, 2


@dataclass(frozen=True)
class VhdWriteResult:
    """What was written: the disk's virtual size, the output's length, the blocks stored (dynamic)."""

    virtual_size: int
    size: int
    blocks: int


def geometry(size: int) -> tuple[int, int, int]:
    """``(cylinders, heads, sectors per track)`` of a disk of ``size`` bytes (the specification's
    CHS algorithm, capped at 65535 x 16 x 255)."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def _checksum(data: bytes) -> int:
    return ~sum(data) & 0xFFFFFFFF


def footer(
    size: int, disk_type: int, *, unique_id: bytes | None = None, timestamp: int | None = None
) -> bytes:
    """The 512-byte footer of a ``size``-byte disk of ``disk_type`` (:data:`DYNAMIC` or :data:`FIXED`)."""
    cyl, heads, spt = geometry(size)
    stamp = (int(time.time()) if timestamp is None else timestamp) - _EPOCH_2000
    fields = [
        b"conectix",
        2,  # features: reserved bit, always set
        0x00010000,
        SECTOR if disk_type == DYNAMIC else 0xFFFFFFFFFFFFFFFF,
        max(0, stamp) & 0xFFFFFFFF,
        b"qem2",
        0x00050003,
        b"Wi2k",
        size,
        size,
        cyl,
        heads,
        spt,
        disk_type,
        0,
        unique_id or uuid.uuid4().bytes,
        0,
        bytes(427),
    ]
    blank = _FOOTER.pack(*fields)
    fields[14] = _checksum(blank)
    return _FOOTER.pack(*fields)


def set_geometry(path: Path, size: int) -> None:
    """Give the VHD at ``path`` (qemu-img's, already inspected as a VHD of ``size`` bytes) the
    specification's geometry for ``size`` in its footer, and in the footer's copy at the start of a
    dynamic disk, checksums recomputed: ``qemu-img convert -o force_size=on`` writes 65535/16/255 for
    any disk, which a reader that sizes a disk by its geometry takes for 127 GiB. Nothing else changes."""
    cyl, heads, spt = geometry(size)
    with open(path, "r+b", buffering=0) as f:
        end = f.seek(0, os.SEEK_END) - SECTOR
        places = [end]
        while places:
            at = places.pop()
            f.seek(at)
            fields = list(_FOOTER.unpack(f.read(SECTOR)))
            if end < 0 or fields[0] != b"conectix" or fields[9] != size:
                raise UsageError(f"{path} has no footer of a {size}-byte VHD at byte {at}")
            if at == end and fields[13] == DYNAMIC:
                places.append(0)  # its copy (a fixed disk has the guest's first sector there: untouched)
            fields[10:13], fields[14] = [cyl, heads, spt], 0
            fields[14] = _checksum(_FOOTER.pack(*fields))
            f.seek(at)
            f.write(_FOOTER.pack(*fields))


def dynamic_header(blocks: int) -> bytes:
    """The 1024-byte dynamic disk header of a disk of ``blocks`` blocks, its table at sector 3."""
    fields = [
        b"cxsparse",
        0xFFFFFFFFFFFFFFFF,
        3 * SECTOR,
        0x00010000,
        blocks,
        BLOCK,
        0,
        bytes(16),
        0,
        0,
        bytes(512),
        bytes(192),
        bytes(256),
    ]
    blank = _DYNAMIC.pack(*fields)
    fields[6] = _checksum(blank)
    return _DYNAMIC.pack(*fields)


def has_data_map(fd: int) -> bool:
    """Whether ``fd`` is a regular file (whose holes ``SEEK_DATA`` finds); a block device is not."""
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _check(size: int) -> None:
    if size <= 0 or size % SECTOR:
        raise UsageError(f"a VHD holds whole sectors: {size} bytes is not a positive multiple of {SECTOR}")
    if size > MAX_SIZE:
        raise UsageError(f"a VHD holds at most 2040 GiB, not {size} bytes")


def _announce(fd: int, block: int, size: int) -> None:
    """Ask the kernel to read ``block`` of the source now, in the background (the blocks read skip the
    holes, so its sequential read-ahead does not see a sequential read): the disk reads it while this
    thread hashes and writes the blocks before it, as qemu-img keeps several reads in flight."""
    pos = block * BLOCK
    with contextlib.suppress(OSError):  # only a hint
        os.posix_fadvise(fd, pos, min(BLOCK, size - pos), os.POSIX_FADV_WILLNEED)


def allocated_blocks(fd: int, size: int) -> list[int]:
    """The indexes of the blocks of the disk that hold any of ``fd``'s data, in order."""
    found: list[int] = []
    for start, end in data_ranges(fd, size):
        first, last = start // BLOCK, (end - 1) // BLOCK
        if found and found[-1] >= first:
            first = found[-1] + 1
        found.extend(range(first, last + 1))
    return found


def write_dynamic_vhd(
    fd: int,
    size: int,
    sink: ByteSink,
    *,
    on_progress: Callable[[int], object] | None = None,
    cancel: threading.Event | None = None,
    on_read: Callable[[int, bytes | bytearray | memoryview], object] | None = None,
    direct: int | None = None,
) -> VhdWriteResult:
    """Write the RAW disk of ``size`` bytes open as ``fd`` to ``sink`` as a dynamic VHD (module
    docstring). ``on_progress(done)`` gets the disk bytes covered so far, ``on_read(offset, data)``
    every block read, in ascending order (blocks holding no data are not read). ``direct``: the source
    opened with O_DIRECT (:func:`appliance.image.readbuf.open_direct`): the blocks are read around the page
    cache and not announced (that would fill the cache). Raises :class:`Cancelled` when
    ``cancel`` is set (the sink then holds a partial stream: the caller removes it or aborts the upload)."""
    _check(size)
    total = -(-size // BLOCK)
    blocks = allocated_blocks(fd, size)
    table_bytes = -(-total * 4 // SECTOR) * SECTOR
    first = 3 * SECTOR + table_bytes
    stride = BITMAP_SECTORS * SECTOR + BLOCK
    table = [_NO_BLOCK] * total
    for i, b in enumerate(blocks):
        table[b] = (first + i * stride) // SECTOR
    tail = footer(size, DYNAMIC)
    written = 0

    def out(data: bytes | bytearray | memoryview) -> None:
        nonlocal written
        sink.write(data)
        written += len(data)

    out(tail)
    out(dynamic_header(total))
    bat = struct.pack(f">{total}I", *table)
    out(bat + bytes(table_bytes - len(bat)))
    pool = ReadPool(BLOCK, POOL, direct=direct)
    for b in blocks[:READ_AHEAD] if direct is None else ():
        _announce(fd, b, size)
    pieces = ((b * BLOCK, min(BLOCK, size - b * BLOCK)) for b in blocks)
    # O_DIRECT reads are synchronous: a thread reads READ_AHEAD blocks ahead into the pool instead
    reads = read_ahead(pool, fd, pieces, READ_AHEAD) if direct is not None else None
    try:
        _write_blocks(fd, size, blocks, pool, reads, out, on_progress, cancel, on_read)
    finally:
        if reads is not None:
            reads.close()
    out(tail)
    if on_progress is not None:
        on_progress(size)
    return VhdWriteResult(size, written, len(blocks))


def _write_blocks(
    fd: int,
    size: int,
    blocks: list[int],
    pool: ReadPool,
    reads: Iterator[bytes | bytearray | memoryview] | None,
    out: Callable[[bytes | bytearray | memoryview], None],
    on_progress: Callable[[int], object] | None,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes | bytearray | memoryview], object] | None,
) -> None:
    """Each allocated block: its bitmap, then its data read from the source (padded to a whole block)."""
    bitmap = b"\xff" * (BITMAP_SECTORS * SECTOR)
    for i, b in enumerate(blocks):
        if cancel is not None and cancel.is_set():
            raise Cancelled("VHD export cancelled")
        if i + READ_AHEAD < len(blocks) and reads is None:
            _announce(fd, blocks[i + READ_AHEAD], size)
        pos = b * BLOCK
        n = min(BLOCK, size - pos)
        data = next(reads) if reads is not None else pool.read(fd, n, pos)
        if len(data) != n:
            raise UsageError(f"the source disk ended at byte {pos + len(data)}, not {size}")
        if on_read is not None:
            on_read(pos, data)
        # the bitmap and the data as two writes, not one joined copy: joining allocated and copied a
        # fresh 2 MiB buffer per block (page faults and munmap included, the largest cost of the writer
        # after the reads and writes themselves)
        out(bitmap)
        out(data)
        if n < BLOCK:  # the disk's last, partial block: padded to a whole block
            out(zeros(BLOCK - n))
        # read once: cached, the source would grow the page cache by its size (fresh pages, dear here)
        if reads is None:  # (a read with O_DIRECT cached nothing)
            pagecache.drop_range(fd, pos, n)
        del data  # the pool's buffer is free for the next read once the sink's consumers are done
        if on_progress is not None:
            on_progress(pos + n)
