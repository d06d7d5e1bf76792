"""Hand-built streamOptimized VMDK streams in the VMware spec layout (header with GD_AT_END, grain markers,
grain tables after their grains, grain directory, footer, end-of-stream marker), with knobs to break them.

qemu-img reads what :func:`build` makes with default knobs (the footer at the end of the file gives it
the grain directory), so the corpus can hold a spec-layout stream next to qemu-img's own layout.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTOR = 512
GD_AT_END = 0xFFFFFFFFFFFFFFFF
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")


@dataclass
class Grain:
    lba: int
    data: bytes = b""
    #: compressed bytes to store instead of zlib(data)
    raw: bytes | None = None
    #: the marker's size field instead of len(compressed)
    size: int | None = None


@dataclass
class Stream:
    capacity: int  # sectors
    grains: list[Grain] = field(default_factory=list)
    grain_size: int = 128
    create_type: str = "streamOptimized"
    header: dict[str, Any] = field(default_factory=dict)  # field overrides of the leading header
    footer: dict[str, Any] | None = field(default_factory=dict)  # None: no footer marker
    eos: bool = True
    gd_marker: bool = True
    gt_markers: bool = True
    #: raw sectors inserted before the footer marker (e.g. a misplaced marker)
    before_footer: bytes = b""
    trailing: bytes = b""


def header_bytes(capacity: int, grain_size: int, gd_offset: int, overhead: int, /, **over: Any) -> bytes:
    fields = {
        "magic": b"KDMV",
        "version": 3,
        "flags": 0x30001,
        "capacity": capacity,
        "grain_size": grain_size,
        "desc_offset": 1,
        "desc_size": 20,
        "gtes": 512,
        "rgd": 0,
        "gd": gd_offset,
        "overhead": overhead,
        "unclean": 0,
        "nl": b"\n \r\n",
        "compress": 1,
    }
    fields.update(over)
    return HEADER.pack(*fields.values()).ljust(SECTOR, b"\0")


def metadata_marker(kind: int, sectors: int) -> bytes:
    return struct.pack("<QII", sectors, 0, kind).ljust(SECTOR, b"\0")


def _pad(b: bytes) -> bytes:
    return b + bytes(-len(b) % SECTOR)


def build(s: Stream) -> bytes:
    gb = s.grain_size * SECTOR
    desc = (
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="{s.create_type}"\n# Extent description\nRW {s.capacity} SPARSE "x.vmdk"\n'
        '# The Disk Data Base\n#DDB\nddb.adapterType = "lsilogic"\n'
    ).encode()
    overhead = 128
    out = bytearray(header_bytes(s.capacity, s.grain_size, GD_AT_END, overhead, **s.header))
    out += desc.ljust(20 * SECTOR, b"\0")
    out += bytes(overhead * SECTOR - len(out))
    gts: dict[int, list[int]] = {}
    for g in s.grains:
        data = g.data.ljust(gb, b"\0") if len(g.data) < gb and g.raw is None else g.data
        comp = g.raw if g.raw is not None else zlib.compress(data)
        gts.setdefault(g.lba // s.grain_size // 512, [0] * 512)[g.lba // s.grain_size % 512] = (
            len(out) // SECTOR
        )
        out += _pad(struct.pack("<QI", g.lba, len(comp) if g.size is None else g.size) + comp)
    tables = -(-s.capacity // s.grain_size // 512) or 1
    gd = [0] * tables
    for t in sorted(gts):
        if s.gt_markers:
            out += metadata_marker(1, 4)
        gd[t] = len(out) // SECTOR
        out += struct.pack("<512I", *gts[t])
    gd_sector = len(out) // SECTOR + 1
    gd_bytes = _pad(struct.pack(f"<{tables}I", *gd))
    if s.gd_marker:
        out += metadata_marker(2, len(gd_bytes) // SECTOR)
        out += gd_bytes
    out += s.before_footer
    if s.footer is not None:
        out += metadata_marker(3, 1)
        fields = {k: v for k, v in s.header.items() if k != "gd"}
        fields.update(s.footer)
        out += header_bytes(s.capacity, s.grain_size, fields.pop("gd", gd_sector), overhead, **fields)
    if s.eos:
        out += bytes(SECTOR)
    out += s.trailing
    return bytes(out)


def grain_beyond_capacity(path: Path) -> Path:
    """``path`` written as an 8 MiB stream-optimized VMDK whose second grain lies past its capacity (a
    hostile stream every decoder must refuse as ``CorruptImage``)."""
    capacity = 8 * (1 << 20) // SECTOR
    grains = [Grain(lba=0, data=b"\x01" * 65536), Grain(lba=capacity + 128, data=b"\x02" * 65536)]
    path.write_bytes(build(Stream(capacity=capacity, grains=grains)))
    return path


def nonzero_bytes(path: Path, block: int = 4096) -> int:
    """Bytes of the ``block``-sized blocks of ``path`` that are not all zero (what a sparse copy writes)."""
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            total += len(chunk) if chunk.count(0) != len(chunk) else 0
    return total
