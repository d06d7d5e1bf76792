"""A one-pass writer of streamOptimized VMDK (the mirror of :mod:`appliance.image.vmdkstream`): a RAW disk
read front to back, grains deflated in a thread pool, the output written strictly forward (a file, a pipe,
an S3 multipart upload: it never seeks back).

The layout is the VMware "Virtual Disk Format 5.0" stream layout, the one VMware's own tools write and the
one qemu-img and the project's decoder read (``vmdk-stream-and-streaming.md`` §1.11)::

    sector 0      SparseExtentHeader: version 3, flags 0x30001 (newline detector, compressed grains,
                  markers), gdOffset = GD_AT_END, grainSize 128 (64 KiB), 512 GTEs per GT, overHead 128
    sector 1..20  the embedded descriptor: createType="streamOptimized", one RW SPARSE extent,
                  ddb.virtualHWVersion, ddb.adapterType, ddb.geometry.*, ddb.toolsVersion
    sector 128    {grain marker (LBA, compressed size) + zlib data, zero-padded to a sector}...
                  in LBA order; after the last grain of each grain table's span (512 grains, 32 MiB),
                  if any of them was written: a GT marker + the grain table (4 sectors; each entry the
                  sector of a grain's marker, 0 for a grain never written)
    then          a GD marker + the grain directory (one entry per grain table: the sector of the
                  table, 0 for a table never written), a footer marker + a header copy whose gdOffset
                  is the directory's sector, and the end-of-stream marker (a zero sector)

Only the current grain table (2 KiB) and the directory (4 bytes per 32 MiB of disk: 128 KiB per TiB) stay
in memory. All-zero grains are not written (they read as zeros: a grain never written); a sparse source
file's holes are skipped without being read (``SEEK_DATA``/``SEEK_HOLE``).

Parallel deflate: the reading thread cuts the disk into batches of :data:`BATCH_GRAINS` grains; a pool of
``threads`` threads (ISA-L's deflate, zlib-wrapped like every VMDK writer's grains, releases the GIL)
finds the zero grains and compresses the others; the writing thread emits finished batches in order. At
most ``2 x threads`` batches are in flight, so memory stays about ``2 x threads x 2 MiB``.
"""

from __future__ import annotations

import errno
import os
import secrets
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from isal import isal_zlib

from ..errors import Cancelled, UsageError
from .decoding import SECTOR, zeros
from .vmdkformat import (
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NL_DETECT,
    GD_AT_END,
    GTES_PER_GT,
    MAGIC,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    NEWLINES,
)

#: sectors per grain (64 KiB): what VMware, qemu-img and open-vmdk write
GRAIN_SECTORS = 128
GRAIN = GRAIN_SECTORS * SECTOR
#: sectors of the embedded descriptor
DESCRIPTOR_SECTORS = 20
#: the first grain's sector (one grain of header, descriptor and padding, as qemu-img writes)
OVERHEAD_SECTORS = 128
#: grains per pool task
BATCH_GRAINS = 32
#: the adapter types VMware knows for ``ddb.adapterType``
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
#: the default ``ddb.virtualHWVersion``: the lowest VMware hardware version the disk needs (4: any
#: ESX(i) since 3.x and Workstation 6; what qemu-img and AWS's exports write)
DEFAULT_HW_VERSION = 4
#: ``ddb.toolsVersion``: 2147483647 says "tools unknown" (open-vmdk's and qemu-img's default)
TOOLS_VERSION = 2147483647
#: ISA-L's deflate levels are 0..3; 1 is about zlib -1's ratio at several times its speed
DEFAULT_LEVEL = 1
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_MARKER = struct.Struct("<QII")
_GRAIN_MARKER = struct.Struct("<QI")
_U32_MAX = 0xFFFFFFFF


class ByteSink(Protocol):
    """Where the stream goes: written strictly forward (a file, a pipe, an upload)."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...


@dataclass(frozen=True)
class VmdkWriteResult:
    """What was written: the disk's virtual size, the stream's length, the grains stored."""

    virtual_size: int
    size: int
    grains: int
    data_bytes: int


def descriptor(
    capacity_sectors: int,
    *,
    extent_name: str = "disk.vmdk",
    adapter_type: str = "lsilogic",
    hw_version: int = DEFAULT_HW_VERSION,
    cid: int | None = None,
) -> bytes:
    """The embedded descriptor (NUL-padded to :data:`DESCRIPTOR_SECTORS` sectors)."""
    if adapter_type not in ADAPTER_TYPES:
        raise UsageError(f"adapter type {adapter_type!r}: use one of {', '.join(ADAPTER_TYPES)}")
    if not extent_name or any(c in extent_name for c in '"/\\\n\r\0'):
        raise UsageError(f"extent name {extent_name!r}: a bare file name without quotes")
    heads, sectors = (16, 63) if adapter_type == "ide" else (255, 63)
    cylinders = min(capacity_sectors // (heads * sectors), 65535 if adapter_type != "ide" else 16383)
    text = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid if cid is not None else secrets.randbits(32):08x}\n"
        "parentCID=ffffffff\n"
        'createType="streamOptimized"\n'
        "\n"
        "# Extent description\n"
        f'RW {capacity_sectors} SPARSE "{extent_name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.virtualHWVersion = "{hw_version}"\n'
        f'ddb.adapterType = "{adapter_type}"\n'
        f'ddb.geometry.cylinders = "{max(cylinders, 1)}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{sectors}"\n'
        f'ddb.toolsVersion = "{TOOLS_VERSION}"\n'
    ).encode("ascii")
    if len(text) > DESCRIPTOR_SECTORS * SECTOR:
        raise UsageError("the VMDK descriptor does not fit its sectors")
    return text.ljust(DESCRIPTOR_SECTORS * SECTOR, b"\0")


def header(capacity_sectors: int, gd_offset: int) -> bytes:
    """A SparseExtentHeader sector of this writer's stream (``gd_offset``: GD_AT_END or the GD's sector)."""
    flags = FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS
    packed = _HEADER.pack(
        MAGIC,
        3,
        flags,
        capacity_sectors,
        GRAIN_SECTORS,
        1,
        DESCRIPTOR_SECTORS,
        GTES_PER_GT,
        0,
        gd_offset,
        OVERHEAD_SECTORS,
        0,
        NEWLINES,
        1,
    )
    return packed.ljust(SECTOR, b"\0")


def _meta_marker(sectors: int, kind: int) -> bytes:
    return _MARKER.pack(sectors, 0, kind).ljust(SECTOR, b"\0")


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` ranges of ``fd`` that may hold data, grain-aligned (holes skipped via SEEK_DATA;
    a block device or a filesystem that cannot tell: everything)."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:  # ENXIO: only a hole after pos; else no SEEK_DATA here (read it all)
            if exc.errno != errno.ENXIO:
                yield pos, size
            return
        if data >= size:
            return
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        start = data // GRAIN * GRAIN
        end = min(-(-hole // GRAIN) * GRAIN, size)
        yield max(start, pos), end
        pos = end


def _compress_batch(chunk: bytes, first_lba: int, level: int) -> list[tuple[int, bytes]]:
    """The pool task: ``(lba, zlib data)`` of each grain of ``chunk`` that is not all zeros."""
    out: list[tuple[int, bytes]] = []
    z = zeros(GRAIN)
    for i in range(0, len(chunk), GRAIN):
        grain = chunk[i : i + GRAIN]
        if len(grain) < GRAIN:  # the disk's last grain: padded with zeros, as qemu-img writes it
            grain += bytes(GRAIN - len(grain))
        if grain == z:
            continue
        out.append((first_lba + i // SECTOR, isal_zlib.compress(grain, level)))
    return out


class _Out:
    """The output, counted (the sink hashes what it needs: a file, an upload)."""

    def __init__(self, sink: ByteSink) -> None:
        self.sink = sink
        self.offset = 0

    def write(self, data: bytes) -> None:
        self.sink.write(data)
        self.offset += len(data)

    @property
    def sector(self) -> int:
        return self.offset // SECTOR


def write_stream_vmdk(
    fd: int,
    size: int,
    sink: ByteSink,
    *,
    extent_name: str = "disk.vmdk",
    adapter_type: str = "lsilogic",
    hw_version: int = DEFAULT_HW_VERSION,
    threads: int = 0,
    level: int = DEFAULT_LEVEL,
    on_progress: Callable[[int], object] | None = None,
    cancel: threading.Event | None = None,
    on_read: Callable[[int, bytes | bytearray], object] | None = None,
) -> VmdkWriteResult:
    """Write the RAW disk of ``size`` bytes open as ``fd`` (read with ``pread``; a file or block device)
    to ``sink`` as a streamOptimized VMDK. ``on_progress(done)`` gets the disk bytes read so far
    (holes count as read); ``on_read(offset, data)`` every piece of the disk read, in ascending order
    (the holes skipped are not: a digest of the source needs no second read). Raises
    :class:`Cancelled` when ``cancel`` is set (the sink then holds a partial stream: the caller removes
    it or aborts the upload)."""
    if size <= 0:
        raise UsageError(f"cannot write a VMDK of {size} bytes")
    capacity = -(-size // SECTOR)
    grains_total = -(-capacity // GRAIN_SECTORS)
    tables = -(-grains_total // GTES_PER_GT)
    gd_sectors = -(-tables * 4 // SECTOR)
    gt_sectors = GTES_PER_GT * 4 // SECTOR
    workers = threads or max(1, os.cpu_count() or 1)
    out = _Out(sink)
    out.write(header(capacity, GD_AT_END))
    out.write(descriptor(capacity, extent_name=extent_name, adapter_type=adapter_type, hw_version=hw_version))
    out.write(bytes((OVERHEAD_SECTORS - 1 - DESCRIPTOR_SECTORS) * SECTOR))

    directory = [0] * tables
    table: list[int] = [0] * GTES_PER_GT
    table_index = -1
    stored = 0
    data_bytes = 0

    def flush_table() -> None:
        nonlocal table_index, table
        if table_index < 0:
            return
        out.write(_meta_marker(gt_sectors, MARKER_GT))
        directory[table_index] = out.sector
        out.write(struct.pack(f"<{GTES_PER_GT}I", *table))
        table = [0] * GTES_PER_GT
        table_index = -1

    def emit(grains: list[tuple[int, bytes]]) -> None:
        nonlocal table_index, stored, data_bytes
        for lba, data in grains:
            g = lba // GRAIN_SECTORS
            if g // GTES_PER_GT != table_index:
                flush_table()
                table_index = g // GTES_PER_GT
            if out.sector > _U32_MAX:
                raise UsageError("the VMDK stream would exceed 2 TiB of compressed data (32-bit offsets)")
            table[g % GTES_PER_GT] = out.sector
            block = _GRAIN_MARKER.pack(lba, len(data)) + data
            pad = -len(block) % SECTOR
            out.write(block + bytes(pad) if pad else block)
            stored += 1
            data_bytes += GRAIN

    window: deque[Future[list[tuple[int, bytes]]]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmdk-deflate")
    batch_bytes = BATCH_GRAINS * GRAIN
    try:
        for start, end in data_ranges(fd, size):
            pos = start
            while pos < end:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("VMDK export cancelled")
                n = min(batch_bytes, end - pos)
                chunk = os.pread(fd, n, pos)
                if len(chunk) != n:
                    raise UsageError(f"the source disk ended at byte {pos + len(chunk)}, not {size}")
                if on_read is not None:
                    on_read(pos, chunk)
                window.append(pool.submit(_compress_batch, chunk, pos // SECTOR, level))
                pos += n
                if len(window) >= 2 * workers:
                    emit(window.popleft().result())
                    if on_progress is not None:
                        on_progress(pos)
            while window:
                emit(window.popleft().result())
            if on_progress is not None:
                on_progress(end)
    except BaseException:
        for f in window:
            f.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    flush_table()
    out.write(_meta_marker(gd_sectors, MARKER_GD))
    gd_offset = out.sector
    gd = struct.pack(f"<{tables}I", *directory)
    out.write(gd + bytes(gd_sectors * SECTOR - len(gd)))
    out.write(_meta_marker(1, MARKER_FOOTER))
    out.write(header(capacity, gd_offset))
    out.write(bytes(SECTOR))  # end of stream
    if on_progress is not None:
        on_progress(size)
    return VmdkWriteResult(capacity * SECTOR, out.offset, stored, data_bytes)
