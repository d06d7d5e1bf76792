"""A one-pass decoder of streamOptimized VMDK (the VMware "Virtual Disk Format 5.0" stream layout, and what
qemu-img and open-vmdk write), inflating grains in a thread pool and writing each at its LBA.

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

The decoder reads the input strictly forward: a grain's marker gives its LBA, so the grain directory and
tables are skipped, never followed (a one-pass reader needs no seek). Bounds: grain size, LBA < capacity and
grain-aligned, compressed size ≤ 2 grains (qemu's bound), inflated size exactly one grain (the last grain of
a capacity that is not a multiple of the grain size may be shorter), so total output ≤ capacity; each grain
at most once (a bitmap of grains); metadata sizes bounded by the header's geometry; overHead bounded by what
the metadata can occupy. Everything else raises ``CorruptImage`` naming the input byte offset.

Parallel inflate: the reader thread hands grains in batches (up to 8 grains or 1 MiB compressed: one pool
task each, so the per-task overhead is paid per batch) to a pool of ``limits.workers`` threads (ISA-L's
inflate releases the GIL) and writes finished grains in input order; at most ``2 x workers`` batches are
in flight, so memory stays about ``2 x workers x 8 x (compressed + grain)`` (4 MiB with two workers).
:attr:`VmdkStreamDecoder.buffered` counts it (compressed bytes of every grain read and not yet written,
plus the grain size each inflates to) and :attr:`~VmdkStreamDecoder.peak_buffered` keeps its highest
value: at most :meth:`VmdkStreamDecoder.buffer_bound`, whatever the speeds of input, pool and sink.

Resumable boundary: after a grain is written, the offset of the marker that follows it is a clean point
(:meth:`VmdkStreamDecoder.boundary`): the header fields, the bitmap of written grains (one bit per grain,
zlib + base64: a few KiB for a qemu-img stream) and the counters are the state;
:meth:`VmdkStreamDecoder.resume` continues from there (``checkpoint()`` / :meth:`VmdkStreamDecoder.restore`:
the same as a JSON object). A checkpoint comes back from the task store, so it is checked as untrusted:
its header passes every check a stream's header passes (:meth:`Header.check`, the virtual size against
the caller's limits), its bitmap must fit that header (its length, no grain past the capacity) and agree
with its data count, its offset must be a sector after the metadata; the order checks start again in the
data phase (metadata markers after the offset are read again). Anything else is ValueError.
"""

from __future__ import annotations

import base64
import re
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any, BinaryIO, cast

from isal import isal_zlib

from ..errors import ImageRejected
from .decoding import (
    SECTOR,
    Boundary,
    DecodeLimits,
    Decoder,
    DecodeResult,
    Progress,
    Reader,
    Sink,
    corrupt,
    emit_runs,
    too_large,
    zero_runs,
)

FORMAT = "vmdk-stream"
MAGIC = b"KDMV"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_MARKER = struct.Struct("<QII")
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
_WHAT = "streamOptimized VMDK"
_PROGRESS_EVERY = 1 << 20  # (and so a boundary at most this far apart: checkpoints)
_DATA, _GD, _FOOTER = "data", "gd", "footer"
#: grains inflated by one pool task, at most (and at most so many compressed bytes)
_BATCH_GRAINS = 8
_BATCH_BYTES = 1 << 20
#: isal's stub declares ``error`` as an instance; at run time it is the exception class
_INFLATE_ERROR = cast(type[Exception], isal_zlib.error)


def _corrupt(offset: int, detail: str) -> ImageRejected:
    return corrupt(_WHAT, offset, detail)


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
            raise _corrupt(offset, f"no sparse extent header (magic {magic!r}, expected {MAGIC!r})")
        h = cls(version, flags, capacity, grain, desc_off, desc_size, gtes, gd, overhead, compress)
        h.check(offset, nl)
        return h

    @classmethod
    def from_state(cls, state: object) -> Header:
        """The header a checkpoint holds (:meth:`VmdkStreamDecoder.checkpoint`), checked as a header
        read from the stream is: ValueError for anything a stream's header could not be."""
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
            raise _corrupt(offset, f"unsupported version {version}")
        if flags & 0xFFFF0000 & ~_KNOWN_INCOMPAT:
            raise _corrupt(offset, f"unknown incompatible flags {flags:#x}")
        if flags & _KNOWN_INCOMPAT != _KNOWN_INCOMPAT or compress != 1:
            raise _corrupt(
                offset,
                f"not a stream (flags {flags:#x}, compressAlgorithm {compress}: compressed grains with "
                "markers are required)",
            )
        if nl is not None and flags & FLAG_NL_DETECT and nl != NEWLINES:
            raise _corrupt(offset, "the newline detector is damaged (a text-mode transfer?)")
        if grain < MIN_GRAIN or grain > MAX_GRAIN or grain & (grain - 1):
            raise _corrupt(
                offset + 20, f"grain size {grain} sectors (a power of two, {MIN_GRAIN}..{MAX_GRAIN})"
            )
        if gtes != GTES_PER_GT:
            raise _corrupt(offset + 44, f"{gtes} entries per grain table (expected {GTES_PER_GT})")
        if capacity == 0 or capacity > (1 << 52):
            raise _corrupt(offset + 12, f"capacity {capacity} sectors")
        if desc_off != 1 or not 1 <= desc_size <= MAX_DESCRIPTOR_SECTORS:
            raise _corrupt(offset + 28, f"descriptor at sector {desc_off}, {desc_size} sectors")
        if self.grains > MAX_GRAINS:  # the decoder keeps a bit per grain
            raise _corrupt(offset + 12, f"{self.grains} grains (at most {MAX_GRAINS})")
        if not desc_off + desc_size <= overhead <= self.max_overhead:
            raise _corrupt(offset + 64, f"overHead {overhead} sectors (allowed {desc_off + desc_size}.."
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


def _inflate(data: bytes, full: int, last: int, offset: int) -> bytes:
    """One grain: exactly ``full`` bytes (or ``last`` for the disk's last grain), or CorruptImage.

    ISA-L's inflate (``isal_zlib``: zlib's API and checks, the GIL released, about twice zlib's speed)."""
    d = isal_zlib.decompressobj()
    try:
        out = d.decompress(data, full + 1)  # the output bound: a bomb stops here
    except _INFLATE_ERROR as exc:
        raise _corrupt(offset, f"grain data does not inflate ({exc})") from exc
    if len(out) > full:
        raise _corrupt(offset, f"grain inflates to more than the grain size ({full} bytes)")
    if not d.eof:
        raise _corrupt(offset, "grain data ends before its deflate stream does")
    if d.unused_data:
        raise _corrupt(offset, f"{len(d.unused_data)} bytes after the grain's deflate stream")
    if len(out) != full and len(out) != last:
        raise _corrupt(offset, f"grain inflates to {len(out)} bytes, not the grain size {full}")
    return out


@dataclass(frozen=True)
class _Grain:
    """A grain read but not yet written: compressed data, LBA, input offset after it and of its marker,
    expected size if it is the disk's last grain."""

    data: bytes
    lba: int
    end: int
    at: int
    last: int


@dataclass
class _Batch:
    """Grains inflated together by one pool task (fewer tasks: less per-grain overhead); ``written``:
    how many of them the sink has."""

    future: Future[list[tuple[bytes, list[tuple[int, int, bool]]]]]
    grains: list[_Grain]
    written: int = 0


def _inflate_all(grains: list[_Grain], full: int) -> list[tuple[bytes, list[tuple[int, int, bool]]]]:
    """The pool task: each grain inflated, cut to the disk's end, and its zero runs (so the writing
    thread only writes)."""
    done = []
    for g in grains:
        out = _inflate(g.data, full, g.last, g.at)[: g.last]
        done.append((out, zero_runs(out)))
    return done


def _unset_runs(bitmap: bytearray, count: int) -> list[tuple[int, int]]:
    """``(first, end)`` runs of grains whose bit is clear, over grains ``[0, count)``."""
    runs: list[tuple[int, int]] = []

    def add(a: int, b: int) -> None:
        b = min(b, count)
        if a >= b:
            return
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))

    pos = 0
    for m in re.finditer(rb"[^\x00]", bytes(bitmap)):
        i = m.start()
        add(pos * 8, i * 8)
        byte = bitmap[i]
        for bit in range(8):
            if not byte >> bit & 1:
                add(i * 8 + bit, i * 8 + bit + 1)
        pos = i + 1
    add(pos * 8, len(bitmap) * 8)
    return runs


class VmdkStreamDecoder(Decoder):
    """A streamOptimized VMDK, from its first byte (:meth:`__init__` reads header and descriptor) or from
    a :class:`Boundary` (:meth:`resume`)."""

    format = FORMAT

    def __init__(self, src: BinaryIO, limits: DecodeLimits, *, _resume: Boundary | None = None) -> None:
        super().__init__()
        self.limits = limits
        #: bytes held for grains read and not yet written (compressed, plus the grain each inflates to)
        self.buffered = 0
        #: the highest :attr:`buffered` of this decode (module docstring)
        self.peak_buffered = 0
        if _resume is not None:
            self._restore(src, _resume)
            return
        self._r = Reader(src, 0, _WHAT)
        sector = self._r.exactly(SECTOR, "the header")
        self.header = h = Header.parse(sector, 0)
        self._check_size()
        self._r.skip(h.descriptor_offset * SECTOR - self._r.offset, "the space before the descriptor")
        start = self._r.offset
        descriptor = self._r.exactly(h.descriptor_size * SECTOR, "the embedded descriptor")
        kind = create_type(descriptor)
        if kind is None or kind.lower() != "streamoptimized":
            raise _corrupt(start, f"the descriptor's createType is {kind!r}, not streamOptimized")
        self._r.skip(h.overhead * SECTOR - self._r.offset, "the metadata before the first grain")
        self._seen = bytearray(-(-h.grains // 8))
        self._window: deque[_Batch] = deque()
        self._batch: list[_Grain] = []
        self._phase = _DATA
        self._clean = self._r.offset

    # ------------------------------------------------------------------------------------- resuming

    @classmethod
    def resume(cls, src: BinaryIO, boundary: Boundary, limits: DecodeLimits) -> VmdkStreamDecoder:
        """Continue a decode from ``boundary``; ``src`` yields the input from ``boundary.input_offset``.
        ValueError for a boundary that is not one this decoder could have made (:meth:`restore`)."""
        return cls(src, limits, _resume=boundary)

    @classmethod
    def restore(cls, src: BinaryIO, state: dict[str, Any], limits: DecodeLimits) -> VmdkStreamDecoder:
        """Continue from a :meth:`checkpoint` (``src`` yields the input from its ``input_offset``). The
        state is checked as untrusted: its header as a stream's header is (and against ``limits``, the
        configuration's, never the checkpoint's), its bitmap of written grains must fit the header, its
        offset must be a marker's place after the metadata, its counters must agree with the bitmap.
        ValueError for anything else: a tampered checkpoint cannot switch a check off."""
        try:
            boundary = Boundary.from_dict(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a {FORMAT} checkpoint: {exc}") from exc
        return cls.resume(src, boundary, limits)

    def _restore(self, src: BinaryIO, b: Boundary) -> None:
        if b.format != FORMAT:
            raise ValueError(f"a {b.format} boundary cannot resume a {FORMAT} decode")
        s = b.state
        if not isinstance(s, dict) or sorted(s) != ["data_bytes", "header", "written"]:
            raise ValueError(f"a {FORMAT} checkpoint holds header, written and data_bytes")
        self.header = h = Header.from_state(s["header"])
        try:
            self._check_size()
        except ImageRejected as exc:
            raise ValueError(f"the checkpoint's VMDK header: {exc.message}") from exc
        try:
            packed = base64.b64decode(str(s["written"]), validate=True)
            d = zlib.decompressobj()
            bitmap = d.decompress(packed, -(-h.grains // 8) + 1)  # bounded: never more than it should be
        except (ValueError, zlib.error) as exc:
            raise ValueError(f"the checkpoint's grain bitmap does not decode ({exc})") from exc
        if len(bitmap) != -(-h.grains // 8) or not d.eof or d.unused_data:
            raise ValueError("the checkpoint's grain bitmap does not fit the header")
        if h.grains % 8 and bitmap[-1] >> (h.grains % 8):
            raise ValueError("the checkpoint's grain bitmap marks grains beyond the capacity")
        self._seen = bytearray(bitmap)
        data_bytes = s["data_bytes"]
        written = int.from_bytes(bitmap, "little").bit_count()
        if type(data_bytes) is not int or not 0 <= data_bytes <= written * h.grain_bytes:
            raise ValueError(f"the checkpoint's data_bytes {data_bytes!r} do not fit its {written} grains")
        offset = b.input_offset
        if offset % SECTOR or offset < h.overhead * SECTOR:
            raise ValueError(
                f"the checkpoint's input offset {offset} is not a marker's place after the metadata "
                f"({h.overhead * SECTOR} bytes)"
            )
        self._window = deque()
        self._batch = []
        self.data_bytes = data_bytes
        self._phase = _DATA
        self._r = Reader(src, offset, _WHAT)
        self._clean = offset

    def boundary(self) -> Boundary:
        """The latest clean point: everything before it is written (see the module docstring)."""
        written = bytearray(self._seen)  # every grain seen is written but those still in flight
        pending = [g for b in self._window for g in b.grains[b.written :]] + self._batch
        for grain in pending:
            g = grain.lba // self.header.grain_size
            written[g >> 3] &= ~(1 << (g & 7))
        state = {
            "header": asdict(self.header),
            "written": base64.b64encode(zlib.compress(written, 1)).decode("ascii"),
            "data_bytes": self.data_bytes,
        }
        return Boundary(FORMAT, self._clean, state)

    def buffer_bound(self) -> int:
        """The most :attr:`buffered` can reach: ``2 x workers`` batches in the window and the batch being
        filled, each of at most :data:`_BATCH_GRAINS` grains of at most two grains compressed (or the
        batch's compressed limit plus one grain) plus the grain each inflates to."""
        full = self.header.grain_bytes
        per_batch = min(_BATCH_GRAINS * 2 * full, _BATCH_BYTES + 2 * full) + _BATCH_GRAINS * full
        return (2 * self.limits.workers + 1) * per_batch

    def _check_size(self) -> None:
        size = self.header.capacity * SECTOR
        if size > self.limits.max_virtual_size:
            raise too_large(size, self.limits.max_virtual_size, "VMDK header")
        self.virtual_size = size

    # ------------------------------------------------------------------------------------- decoding

    def decode(
        self,
        sink: Sink,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> DecodeResult:
        h = self.header
        workers = self.limits.workers
        window = self._window
        r = self._r
        next_report = r.offset + _PROGRESS_EVERY
        full = h.grain_bytes
        size = h.capacity * SECTOR
        max_compressed = 2 * full
        footer_seen = False
        batched = 0

        batch = self._batch

        def drain_one() -> None:
            head = window[0]  # its grains stay in flight (not written) until the sink has them
            outs = head.future.result()
            for k in range(head.written, len(outs)):
                grain = head.grains[k]
                out, runs = outs[k]
                self.data_bytes += emit_runs(sink, grain.lba * SECTOR, out, runs)
                head.written = k + 1
                self._clean = grain.end
                self.buffered -= len(grain.data) + full
            window.popleft()

        def submit() -> None:
            items = list(batch)
            batch.clear()  # (the grains are in the window now)
            window.append(_Batch(pool.submit(_inflate_all, items, full), items))
            if len(window) >= 2 * workers:
                drain_one()

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmdk-inflate")
        try:
            while True:
                self.check_cancel(cancel)
                at = r.offset
                if on_progress is not None and at >= next_report:
                    on_progress(Progress(at, self.data_bytes))
                    next_report = at + _PROGRESS_EVERY
                sector = r.read(SECTOR)
                if not sector:
                    if h.gd_offset == GD_AT_END or self._phase != _DATA:
                        raise _corrupt(at, "the stream ends without its footer and end-of-stream marker")
                    break
                if len(sector) < SECTOR:
                    raise _corrupt(at, f"the input ends inside a marker ({len(sector)} of {SECTOR} bytes)")
                val, length, kind = _MARKER.unpack_from(sector)
                if length:
                    if self._phase != _DATA:
                        raise _corrupt(at, f"a grain after the {self._phase} marker (markers out of order)")
                    if val % h.grain_size or val >= h.capacity:
                        raise _corrupt(at, f"grain LBA {val} (grain-aligned and below capacity {h.capacity})")
                    if length > max_compressed:
                        raise _corrupt(at, f"grain of {length} compressed bytes (at most {max_compressed})")
                    g = val // h.grain_size
                    if self._seen[g >> 3] >> (g & 7) & 1:
                        raise _corrupt(at, f"grain LBA {val} appears twice (repeated or overlapping grain)")
                    self._seen[g >> 3] |= 1 << (g & 7)
                    block = -(-(12 + length) // SECTOR) * SECTOR
                    data = sector[12 : 12 + length]
                    if block > SECTOR:
                        data += r.exactly(block - SECTOR, "a grain")[: 12 + length - SECTOR]
                    batch.append(_Grain(data, val, r.offset, at, min(full, size - val * SECTOR)))
                    self.buffered += len(data) + full
                    self.peak_buffered = max(self.peak_buffered, self.buffered)
                    batched += length
                    if len(batch) >= _BATCH_GRAINS or batched >= _BATCH_BYTES:
                        submit()
                        batched = 0
                    continue
                if any(sector[16:]) or (kind == MARKER_EOS and val):
                    raise _corrupt(at, f"a metadata marker (type {kind}) with non-zero padding")
                if kind == MARKER_EOS:
                    if h.gd_offset == GD_AT_END and not footer_seen:
                        raise _corrupt(at, "end-of-stream marker without the footer the header announces")
                    self._trailing_zeros(cancel)
                    break
                if kind == MARKER_GT:
                    if self._phase != _DATA:
                        raise _corrupt(
                            at, f"a grain table after the {self._phase} marker (markers out of order)"
                        )
                    if not 1 <= val <= h.gt_sectors:
                        raise _corrupt(at, f"grain table of {val} sectors (at most {h.gt_sectors})")
                    r.skip(val * SECTOR, "a grain table")
                elif kind == MARKER_GD:
                    if self._phase != _DATA:
                        raise _corrupt(at, f"a grain directory after the {self._phase} marker (out of order)")
                    if not 1 <= val <= h.gd_sectors:
                        raise _corrupt(at, f"grain directory of {val} sectors (at most {h.gd_sectors})")
                    r.skip(val * SECTOR, "the grain directory")
                    self._phase = _GD
                elif kind == MARKER_FOOTER:
                    if self._phase == _FOOTER:
                        raise _corrupt(at, "a second footer (markers out of order)")
                    if val != 1:
                        raise _corrupt(at, f"footer of {val} sectors (expected 1)")
                    self._footer(r.offset, r.exactly(SECTOR, "the footer"))
                    footer_seen = True
                    self._phase = _FOOTER
                else:
                    raise _corrupt(at, f"unknown marker type {kind}")
            if batch:
                submit()
            while window:
                drain_one()
        except BaseException:
            for b in window:
                b.future.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        self._clean = r.offset
        for first, end in _unset_runs(self._seen, h.grains):
            start = first * full
            sink.zero(start, min(end * full, size) - start)
        if on_progress is not None:
            on_progress(Progress(r.offset, self.data_bytes))
        return DecodeResult(FORMAT, size, r.offset, self.data_bytes)

    def _footer(self, offset: int, sector: bytes) -> None:
        footer = Header.parse(sector, offset)
        if footer.gd_offset == GD_AT_END:
            raise _corrupt(offset + 56, "the footer's gdOffset is GD_AT_END too")
        differ = self.header.agrees_with(footer)
        if differ:
            raise _corrupt(offset, f"the footer disagrees with the header ({', '.join(differ)})")

    def _trailing_zeros(self, cancel: threading.Event | None) -> None:
        """After the end-of-stream marker only zero padding may follow."""
        r = self._r
        while True:
            self.check_cancel(cancel)
            at = r.offset
            chunk = r.read_some(1 << 20)
            if not chunk:
                return
            if chunk.count(0) != len(chunk):
                nz = next(i for i, b in enumerate(chunk) if b)
                raise _corrupt(at + nz, "data after the end-of-stream marker")
