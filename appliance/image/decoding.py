"""The sequential-decoder interface: an image's bytes in, in order, once; RAW writes at offsets out.

A decoder reads its input as a byte stream (anything with ``read(n)``: a pipe, a socket, the parallel
ranged reader; it never seeks back) and emits to a :class:`Sink`:

* ``write(offset, data)`` — RAW bytes of the virtual disk at ``offset`` (an all-zero ``data`` may be
  dropped or zeroed by the sink: :class:`appliance.targets.rawio.RawWriter` satisfies this protocol and
  turns zeros into holes);
* ``zero(offset, length)`` — a range that must read as zeros (a sink writing a fresh file or a zeroed
  volume ignores it, one writing a device of unknown content zeroes it).

Output stays sparse: a decoder never writes the zeros of unallocated ranges, it reports them with
``zero``. Where the format says it up front (a VMDK stream's header, a fixed VHD whose size is given)
:attr:`Decoder.virtual_size` is known before the first write, so the caller can size the target.

Every decoder is strict: anything the format does not allow raises :class:`~appliance.errors.ImageRejected`
with a ``CorruptImage`` finding whose message names the byte offset in the input where it was found,
``SizeLimitExceeded…`` for sizes over the limits; nothing else escapes for bad input. Writes already made
to the sink stay there: the caller removes a partial output (:func:`appliance.image.decoders.decode_file`
does for a file).

**Resumable boundaries.** :attr:`Decoder.boundary` is the latest point of the input at which the decoder's
state is clean: every byte before it has been decoded and written to the sink, and decoding can restart
there from a small JSON state (a VMDK stream: the start of the marker after the last written grain; raw
and fixed VHD: any offset). An integration checkpoints ``boundary.to_dict()`` with the target, and later
opens the input at ``boundary.input_offset`` and calls the format's ``resume(src, boundary, ...)``: the
decoder continues exactly as if it had never stopped (same output, same checks).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from ..errors import Cancelled, Finding, ImageRejected

SECTOR = 512


class Sink(Protocol):
    """Where a decoder puts the RAW disk (:class:`appliance.targets.rawio.RawWriter` is one)."""

    def write(self, offset: int, chunk: bytes) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...


@dataclass(frozen=True)
class DecodeLimits:
    """The bounds a decoder enforces on untrusted input."""

    #: largest virtual disk accepted (``limits.max_virtual_size``)
    max_virtual_size: int
    #: largest output of a compressed stream (``limits.max_decompressed_size``)
    max_decompressed_size: int
    #: threads inflating VMDK grains (0: one per CPU)
    threads: int = 0

    @property
    def workers(self) -> int:
        return self.threads or max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Boundary:
    """A clean point of a decode: input before ``input_offset`` fully written, ``state`` enough to resume."""

    format: str
    input_offset: int
    state: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "input_offset": self.input_offset, "state": self.state}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Boundary:
        return cls(str(d["format"]), int(d["input_offset"]), dict(d.get("state") or {}))


def offset_state(boundary: Boundary, fmt: str, input_end: int | None) -> int:
    """The ``data_bytes`` of an offset-only boundary (RAW, fixed VHD) once it is checked as untrusted:
    of ``fmt``, an offset inside the input (``input_end``: where the data ends, when known), no more
    data bytes than input before it. ValueError for anything else."""
    if boundary.format != fmt:
        raise ValueError(f"a {boundary.format} boundary cannot resume a {fmt} decode")
    state, offset = boundary.state, boundary.input_offset
    if sorted(state) not in ([], ["data_bytes"]):
        raise ValueError(f"a {fmt} checkpoint holds only data_bytes")
    data = state.get("data_bytes", 0)
    if offset < 0 or (input_end is not None and offset > input_end):
        raise ValueError(f"the checkpoint's input offset {offset} is outside the {fmt} data")
    if type(data) is not int or not 0 <= data <= offset:
        raise ValueError(f"the checkpoint's data_bytes {data!r} do not fit its offset {offset}")
    return data


@dataclass(frozen=True)
class DecodeResult:
    """What a finished decode produced: the disk size, input bytes read, data bytes handed to the sink."""

    format: str
    virtual_size: int
    input_bytes: int
    data_bytes: int


@dataclass(frozen=True)
class Progress:
    """Input consumed and data bytes emitted so far."""

    input_bytes: int
    data_bytes: int


def corrupt(what: str, offset: int, detail: str) -> ImageRejected:
    """``CorruptImage`` for the ``what`` input at byte ``offset``."""
    return ImageRejected(
        [
            Finding.error(
                "CorruptImage",
                f"the {what} is corrupt at input byte {offset}: {detail}; the image was not written, "
                "create it again and re-upload it",
            )
        ]
    )


def too_large(size: int, limit: int, what: str) -> ImageRejected:
    return ImageRejected(
        [
            Finding.error(
                "SizeLimitExceeded",
                f"the {what} says the virtual disk is {size} bytes, over the limit of {limit} bytes "
                "(limits.max_virtual_size); shrink the disk or ask for a higher limit",
            )
        ]
    )


class Reader:
    """The input as a counted, forward-only byte stream (``offset``: bytes consumed so far)."""

    def __init__(self, src: BinaryIO, offset: int = 0, what: str = "image") -> None:
        self._src = src
        self.offset = offset
        self.what = what

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the input)."""
        parts: list[bytes] = []
        left = n
        while left > 0:
            piece = self._src.read(left)
            if not piece:
                break
            parts.append(piece)
            left -= len(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset += len(data)
        return data

    def exactly(self, n: int, what: str) -> bytes:
        """``n`` bytes or ``CorruptImage`` (the input ends inside ``what``)."""
        start = self.offset
        data = self.read(n)
        if len(data) != n:
            raise corrupt(self.what, start, f"the input ends inside {what} ({len(data)} of {n} bytes)")
        return data

    def skip(self, n: int, what: str) -> None:
        while n > 0:
            step = min(n, 1 << 20)
            self.exactly(step, what)
            n -= step

    def readinto(self, buf: bytearray | memoryview) -> int:
        """One read into ``buf`` (for readers that want it, such as isal's gzip reader)."""
        data = self._src.read(len(buf))
        buf[: len(data)] = data
        self.offset += len(data)
        return len(data)

    def readable(self) -> bool:
        return True

    def read_some(self, n: int) -> bytes:
        """One read of at most ``n`` bytes (b"" at the end): for pass-through copies."""
        data = self._src.read(n)
        self.offset += len(data)
        return data


class Decoder(ABC):
    """One image's sequential decode. Construct with the input (the format's header is read and checked
    then, so :attr:`virtual_size` is known), then :meth:`decode` into a sink once."""

    format: str = ""

    def __init__(self) -> None:
        self.virtual_size: int | None = None
        self.data_bytes = 0

    @abstractmethod
    def boundary(self) -> Boundary | None:
        """The latest clean point of the input (module docstring); None where the format has none
        after its start (a compressed stream)."""

    def checkpoint(self) -> dict[str, Any] | None:
        """The state at the latest clean boundary as a small JSON object (the format's ``restore``
        continues from it), or None where there is none (a compressed stream after its start)."""
        b = self.boundary()
        return None if b is None else b.to_dict()

    @abstractmethod
    def decode(
        self,
        sink: Sink,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> DecodeResult:
        """Decode the rest of the input into ``sink``; the result once the input ended cleanly."""

    @staticmethod
    def check_cancel(cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("decoding cancelled")


class FdSink:
    """A sink over a file descriptor that reads as zeros (a new or truncated regular file): data is
    written with ``pwrite``, zeros are left as holes (the decoder child's stdout)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, offset: int, chunk: bytes) -> None:
        if chunk == zeros(len(chunk)):
            return
        view = memoryview(chunk)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def zero(self, offset: int, length: int) -> None:
        """The file reads as zeros where nothing was written."""


#: zero buffers by length (comparing with one is memcmp-fast, ``count(0)`` is not)
_ZERO_BUFFERS: dict[int, bytes] = {}
#: what the cache may hold in all: callers ask for many lengths (gap and extent remainders), and a
#: long-lived worker must not keep one buffer per length it ever saw
_ZERO_CACHE_BYTES = 64 << 20


def zeros(n: int) -> bytes:
    """``n`` zero bytes, shared for the lengths asked for most (cached up to a total of 64 MiB)."""
    z = _ZERO_BUFFERS.get(n)
    if z is None:
        z = bytes(n)
        if n <= 16 << 20 and sum(list(_ZERO_BUFFERS)) + n <= _ZERO_CACHE_BYTES:  # keys are lengths
            z = _ZERO_BUFFERS.setdefault(n, z)
    return z


#: the granularity of zero detection: all-zero blocks of this size become holes (qemu-img's default too)
ZERO_BLOCK = 4096


def zero_runs(chunk: bytes) -> list[tuple[int, int, bool]]:
    """``(start, end, all_zero)`` runs of :data:`ZERO_BLOCK` blocks covering ``chunk`` (pure computation:
    a decoder may do it in a worker thread)."""
    n = len(chunk)
    if chunk == zeros(n):
        return [(0, n, True)]
    z = zeros(ZERO_BLOCK)
    runs: list[tuple[int, int, bool]] = []
    run = 0
    run_is_zero = chunk[:ZERO_BLOCK] == z[: min(n, ZERO_BLOCK)]
    for i in range(ZERO_BLOCK, n, ZERO_BLOCK):
        block = chunk[i : i + ZERO_BLOCK]
        is_zero = block == z[: len(block)]
        if is_zero != run_is_zero:
            runs.append((run, i, run_is_zero))
            run, run_is_zero = i, is_zero
    runs.append((run, n, run_is_zero))
    return runs


def emit_runs(sink: Sink, offset: int, chunk: bytes, runs: list[tuple[int, int, bool]]) -> int:
    """Hand ``chunk`` (disk bytes at ``offset``) to ``sink`` as its :func:`zero_runs` say: zero runs as
    ``zero`` ranges, the rest as ``write`` calls. Returns the data bytes written."""
    data = 0
    for start, end, is_zero in runs:
        if is_zero:
            sink.zero(offset + start, end - start)
        else:
            sink.write(offset + start, chunk if start == 0 and end == len(chunk) else chunk[start:end])
            data += end - start
    return data


def emit(sink: Sink, offset: int, chunk: bytes) -> int:
    """Hand ``chunk`` (disk bytes at ``offset``) to ``sink``: runs of all-zero :data:`ZERO_BLOCK` blocks
    as ``zero`` ranges, the rest as coalesced ``write`` calls. Returns the data bytes written."""
    return emit_runs(sink, offset, chunk, zero_runs(chunk))
