"""A one-pass decoder of streamOptimized VMDK (the VMware "Virtual Disk Format 5.0" stream layout, and what
qemu-img and open-vmdk write), inflating grains in a thread pool and writing each at its LBA.

The format (header, markers, order) is :mod:`appliance.image.vmdkformat`'s.

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
:mod:`appliance.image.grainmap`: a few KiB for a qemu-img stream) and the counters are the state;
:meth:`VmdkStreamDecoder.resume` continues from there (``checkpoint()`` / :meth:`VmdkStreamDecoder.restore`:
the same as a JSON object). A checkpoint comes back from the task store, so it is checked as untrusted: its
header passes every check a stream's header passes (:meth:`~appliance.image.vmdkformat.Header.check`, the
virtual size against the caller's limits), its bitmap must fit that header (its length, no grain past the
capacity) and agree with its data count, its offset must be a sector after the metadata; the order checks
start again in the data phase (metadata markers after the offset are read again). Anything else is
ValueError.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

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
    emit_runs,
    too_large,
    zero_runs,
)
from .grainmap import pack, unpack, unset_runs
from .vmdkformat import (
    FORMAT,
    GD_AT_END,
    MARKER,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    WHAT,
    Header,
    corrupt_at,
    create_type,
    inflate_grain,
)

_PROGRESS_EVERY = 1 << 20  # (and so a boundary at most this far apart: checkpoints)
_DATA, _GD, _FOOTER = "data", "gd", "footer"
#: grains inflated by one pool task, at most (and at most so many compressed bytes)
_BATCH_GRAINS = 8
_BATCH_BYTES = 1 << 20


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
        out = inflate_grain(g.data, full, g.last, g.at)[: g.last]
        done.append((out, zero_runs(out)))
    return done


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
        self._r = Reader(src, 0, WHAT)
        sector = self._r.exactly(SECTOR, "the header")
        self.header = h = Header.parse(sector, 0)
        self._check_size()
        self._r.skip(h.descriptor_offset * SECTOR - self._r.offset, "the space before the descriptor")
        start = self._r.offset
        descriptor = self._r.exactly(h.descriptor_size * SECTOR, "the embedded descriptor")
        kind = create_type(descriptor)
        if kind is None or kind.lower() != "streamoptimized":
            raise corrupt_at(start, f"the descriptor's createType is {kind!r}, not streamOptimized")
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
        self._seen = unpack(s["written"], h.grains)
        data_bytes = s["data_bytes"]
        written = int.from_bytes(self._seen, "little").bit_count()
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
        self._r = Reader(src, offset, WHAT)
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
            "written": pack(written),
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
                        raise corrupt_at(at, "the stream ends without its footer and end-of-stream marker")
                    break
                if len(sector) < SECTOR:
                    raise corrupt_at(at, f"the input ends inside a marker ({len(sector)} of {SECTOR} bytes)")
                val, length, kind = MARKER.unpack_from(sector)
                if length:
                    if self._phase != _DATA:
                        raise corrupt_at(at, f"a grain after the {self._phase} marker (markers out of order)")
                    if val % h.grain_size or val >= h.capacity:
                        raise corrupt_at(
                            at, f"grain LBA {val} (grain-aligned and below capacity {h.capacity})"
                        )
                    if length > max_compressed:
                        raise corrupt_at(at, f"grain of {length} compressed bytes (at most {max_compressed})")
                    g = val // h.grain_size
                    if self._seen[g >> 3] >> (g & 7) & 1:
                        raise corrupt_at(at, f"grain LBA {val} appears twice (repeated or overlapping grain)")
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
                    raise corrupt_at(at, f"a metadata marker (type {kind}) with non-zero padding")
                if kind == MARKER_EOS:
                    if h.gd_offset == GD_AT_END and not footer_seen:
                        raise corrupt_at(at, "end-of-stream marker without the footer the header announces")
                    self._trailing_zeros(cancel)
                    break
                if kind == MARKER_GT:
                    if self._phase != _DATA:
                        raise corrupt_at(
                            at, f"a grain table after the {self._phase} marker (markers out of order)"
                        )
                    if not 1 <= val <= h.gt_sectors:
                        raise corrupt_at(at, f"grain table of {val} sectors (at most {h.gt_sectors})")
                    r.skip(val * SECTOR, "a grain table")
                elif kind == MARKER_GD:
                    if self._phase != _DATA:
                        raise corrupt_at(
                            at, f"a grain directory after the {self._phase} marker (out of order)"
                        )
                    if not 1 <= val <= h.gd_sectors:
                        raise corrupt_at(at, f"grain directory of {val} sectors (at most {h.gd_sectors})")
                    r.skip(val * SECTOR, "the grain directory")
                    self._phase = _GD
                elif kind == MARKER_FOOTER:
                    if self._phase == _FOOTER:
                        raise corrupt_at(at, "a second footer (markers out of order)")
                    if val != 1:
                        raise corrupt_at(at, f"footer of {val} sectors (expected 1)")
                    self._footer(r.offset, r.exactly(SECTOR, "the footer"))
                    footer_seen = True
                    self._phase = _FOOTER
                else:
                    raise corrupt_at(at, f"unknown marker type {kind}")
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
        for first, end in unset_runs(self._seen, h.grains):
            start = first * full
            sink.zero(start, min(end * full, size) - start)
        if on_progress is not None:
            on_progress(Progress(r.offset, self.data_bytes))
        return DecodeResult(FORMAT, size, r.offset, self.data_bytes)

    def _footer(self, offset: int, sector: bytes) -> None:
        footer = Header.parse(sector, offset)
        if footer.gd_offset == GD_AT_END:
            raise corrupt_at(offset + 56, "the footer's gdOffset is GD_AT_END too")
        differ = self.header.agrees_with(footer)
        if differ:
            raise corrupt_at(offset, f"the footer disagrees with the header ({', '.join(differ)})")

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
                raise corrupt_at(at + nz, "data after the end-of-stream marker")
