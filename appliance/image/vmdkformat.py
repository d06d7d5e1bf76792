"""The streamOptimized VMDK format (the VMware "Virtual Disk Format 5.0" stream layout, and what
qemu-img and open-vmdk write): its constants, the sparse extent header and its checks, the embedded
descriptor's ``createType`` and the inflation of one grain. The decoder
(:mod:`appliance.image.vmdkstream`) and the writer (:mod:`appliance.image.vmdkwriter`) share it.

Format knowledge (little-endian; offsets in bytes; reference: ``vmdk-stream-and-streaming.md`` §1)::

    SparseExtentHeader, sector 0 (512 bytes)
       0  4  magicNumber          b"KDMV"
       4  4  version              1, 2 or 3
       8  4  flags                bit 0 newline detector valid, 1 redundant GD, 2 zeroed-grain GTEs,
                                  16 grains compressed, 17 grains carry markers (both required here);
                                  other bits 16-31: unknown incompatible features (refused)
      12  8  capacity             virtual size in sectors
      20  8  grainSize            sectors per grain (a power of two, 8..128 here)
      28  8  descriptorOffset     sector of the embedded descriptor (1 here, as oslo requires)
      36  8  descriptorSize       sectors (≤ 2048: 1 MiB)
      44  4  numGTEsPerGT         512
      48  8  rgdOffset            redundant GD (ignored)
      56  8  gdOffset             GD sector, or 0xffffffffffffffff (GD_AT_END): the footer has it
      64  8  overHead             sectors before the first grain
      72  1  uncleanShutdown
      73  4  newline detector     b"\\n \\r\\n" when flag bit 0 is set
      77  2  compressAlgorithm    1 (deflate, zlib-wrapped in every implementation)

    Markers, each at a sector boundary (offset 0: u64 val, 8: u32 size, 12: u32 type when size == 0):
      grain     size > 0: val = LBA (sector, grain-aligned), then ``size`` bytes of zlib data, zero-padded
                to the next sector; inflates to grainSize x 512 bytes (the last grain: to the capacity)
      EOS       val 0, size 0, type 0: the whole sector is zero; after it only zero padding
      GT        type 1: val = sectors of grain table that follow the marker sector (≤ its size)
      GD        type 2: val = sectors of grain directory that follow (≤ its size)
      footer    type 3: val = 1, then a SparseExtentHeader copy with the real gdOffset

Order: header · descriptor · (anything up to ``overHead``) · {grain | GT}… · GD · footer · EOS. qemu-img
writes no metadata markers and no EOS: its stream ends after the last grain (and zero padding, which reads
as an EOS). A header with ``gdOffset = GD_AT_END`` requires the footer, whose fields must agree with the
header's (the footer's values rule; a disagreement is ``CorruptImage``).

A header's checks (:meth:`Header.check`) bound what the geometry may say: grain size, capacity, the
descriptor's place and size, ``overHead`` by what the metadata can occupy. A grain inflates to exactly
one grain (:func:`inflate_grain`). Everything else raises ``CorruptImage`` naming the input byte offset.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, fields
from typing import cast

from isal import isal_zlib

from ..errors import ImageRejected
from .decoding import SECTOR, corrupt

FORMAT = "vmdk-stream"
MAGIC = b"KDMV"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
#: a marker's first 16 bytes: value, size, type (the type only when the size is 0)
MARKER = struct.Struct("<QII")
FLAG_NL_DETECT = 1 << 0
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
_KNOWN_INCOMPAT = FLAG_COMPRESSED | FLAG_MARKERS
NEWLINES = b"\n \r\n"
MIN_GRAIN, MAX_GRAIN = 8, 128
#: grains per disk: 16 TiB of 64 KiB grains; the bitmap of grains seen is then 32 MiB
MAX_GRAINS = 1 << 28
GTES_PER_GT = 512
MAX_DESCRIPTOR_SECTORS = 2048
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
WHAT = "streamOptimized VMDK"
#: isal's stub declares ``error`` as an instance; at run time it is the exception class
_INFLATE_ERROR = cast(type[Exception], isal_zlib.error)


def corrupt_at(offset: int, detail: str) -> ImageRejected:
    """``CorruptImage`` of a streamOptimized VMDK at input byte ``offset``."""
    return corrupt(WHAT, offset, detail)


@dataclass(frozen=True)
class Header:
    """The SparseExtentHeader fields the decoder uses."""

    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    gtes_per_gt: int
    gd_offset: int
    overhead: int
    compress: int

    @classmethod
    def parse(cls, sector: bytes, offset: int) -> Header:
        """Parse and check a header (at input ``offset``: 0, or the footer's place)."""
        (magic, version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd, overhead, _unclean, nl,
         compress) = _HEADER.unpack_from(sector)  # fmt: skip
        if magic != MAGIC:
            raise corrupt_at(offset, f"no sparse extent header (magic {magic!r}, expected {MAGIC!r})")
        h = cls(version, flags, capacity, grain, desc_off, desc_size, gtes, gd, overhead, compress)
        h.check(offset, nl)
        return h

    @classmethod
    def from_state(cls, state: object) -> Header:
        """The header a decoder's checkpoint holds (:mod:`appliance.image.vmdkstream`), checked as a
        header read from the stream is: ValueError for anything a stream's header could not be."""
        names = [f.name for f in fields(cls)]
        if not isinstance(state, dict) or sorted(state) != sorted(names):
            raise ValueError("the checkpoint's VMDK header does not have the header's fields")
        if not all(type(state[n]) is int and state[n] >= 0 for n in names):
            raise ValueError("the checkpoint's VMDK header has a field that is not a count")
        h = cls(**state)
        try:
            h.check(0)
        except ImageRejected as exc:
            raise ValueError(f"the checkpoint's VMDK header is not a stream's: {exc.message}") from exc
        return h

    def check(self, offset: int, nl: bytes | None = None) -> None:
        """The checks of a header's fields (``offset``: where it was read, for the messages; ``nl``:
        its newline detector, when it was read from a stream)."""
        version, flags, capacity, grain = self.version, self.flags, self.capacity, self.grain_size
        desc_off, desc_size, gtes = self.descriptor_offset, self.descriptor_size, self.gtes_per_gt
        overhead, compress = self.overhead, self.compress
        if version not in (1, 2, 3):
            raise corrupt_at(offset, f"unsupported version {version}")
        if flags & 0xFFFF0000 & ~_KNOWN_INCOMPAT:
            raise corrupt_at(offset, f"unknown incompatible flags {flags:#x}")
        if flags & _KNOWN_INCOMPAT != _KNOWN_INCOMPAT or compress != 1:
            raise corrupt_at(
                offset,
                f"not a stream (flags {flags:#x}, compressAlgorithm {compress}: compressed grains with "
                "markers are required)",
            )
        if nl is not None and flags & FLAG_NL_DETECT and nl != NEWLINES:
            raise corrupt_at(offset, "the newline detector is damaged (a text-mode transfer?)")
        if grain < MIN_GRAIN or grain > MAX_GRAIN or grain & (grain - 1):
            raise corrupt_at(
                offset + 20, f"grain size {grain} sectors (a power of two, {MIN_GRAIN}..{MAX_GRAIN})"
            )
        if gtes != GTES_PER_GT:
            raise corrupt_at(offset + 44, f"{gtes} entries per grain table (expected {GTES_PER_GT})")
        if capacity == 0 or capacity > (1 << 52):
            raise corrupt_at(offset + 12, f"capacity {capacity} sectors")
        if desc_off != 1 or not 1 <= desc_size <= MAX_DESCRIPTOR_SECTORS:
            raise corrupt_at(offset + 28, f"descriptor at sector {desc_off}, {desc_size} sectors")
        if self.grains > MAX_GRAINS:  # the decoder keeps a bit per grain
            raise corrupt_at(offset + 12, f"{self.grains} grains (at most {MAX_GRAINS})")
        if not desc_off + desc_size <= overhead <= self.max_overhead:
            raise corrupt_at(offset + 64, f"overHead {overhead} sectors (allowed {desc_off + desc_size}.."
                           f"{self.max_overhead} for this geometry)")  # fmt: skip

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def grains(self) -> int:
        return -(-self.capacity // self.grain_size)

    @property
    def gt_sectors(self) -> int:
        return -(-self.gtes_per_gt * 4 // SECTOR)

    @property
    def gd_sectors(self) -> int:
        tables = -(-self.grains // self.gtes_per_gt)
        return -(-tables * 4 // SECTOR)

    @property
    def max_overhead(self) -> int:
        """The most sectors header, descriptor, GD, redundant GD and all grain tables can take, aligned."""
        tables = -(-self.grains // self.gtes_per_gt)
        meta = 1 + self.descriptor_size + 2 * (self.gd_sectors + tables * self.gt_sectors)
        return -(-meta // self.grain_size) * self.grain_size + self.grain_size

    def agrees_with(self, footer: Header) -> list[str]:
        """Fields of ``footer`` that disagree with this header (gdOffset aside)."""
        mine, theirs = asdict(self), asdict(footer)
        return [k for k in mine if k != "gd_offset" and mine[k] != theirs[k]]


def create_type(descriptor: bytes) -> str | None:
    """The ``createType`` of an embedded descriptor (unquoted), None without one."""
    text = descriptor.split(b"\0", 1)[0].decode("ascii", "replace")
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "createtype":
            return value.strip().strip('"')
    return None


def inflate_grain(data: bytes, full: int, last: int, offset: int) -> bytes:
    """One grain: exactly ``full`` bytes (or ``last`` for the disk's last grain), or CorruptImage.

    ISA-L's inflate (``isal_zlib``: zlib's API and checks, the GIL released, about twice zlib's speed)."""
    d = isal_zlib.decompressobj()
    try:
        out = d.decompress(data, full + 1)  # the output bound: a bomb stops here
    except _INFLATE_ERROR as exc:
        raise corrupt_at(offset, f"grain data does not inflate ({exc})") from exc
    if len(out) > full:
        raise corrupt_at(offset, f"grain inflates to more than the grain size ({full} bytes)")
    if not d.eof:
        raise corrupt_at(offset, "grain data ends before its deflate stream does")
    if d.unused_data:
        raise corrupt_at(offset, f"{len(d.unused_data)} bytes after the grain's deflate stream")
    if len(out) != full and len(out) != last:
        raise corrupt_at(offset, f"grain inflates to {len(out)} bytes, not the grain size {full}")
    return out
