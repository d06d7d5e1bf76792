"""The sequential decoders by name, decoding into a new file, and the decoder as a confinable child.

Formats (:data:`FORMATS`): ``raw``, ``gzip``/``xz``/``zstd``/``bzip2`` (a compressed RAW disk),
``vmdk-stream`` (streamOptimized VMDK, :mod:`appliance.image.vmdkstream`) and ``vhd-fixed``
(:mod:`appliance.image.vhdfixed`). :func:`open_decoder` reads and checks the format's header and returns
the :class:`~appliance.image.decoding.Decoder`; :func:`resume_decoder` continues from a checkpointed
:class:`~appliance.image.decoding.Boundary`.

The decoders parse untrusted bytes, so they are written to run where decompression runs (the confined
decompressor child of :mod:`appliance.confine`): :func:`main` is that child's entry point. It reads the
image on stdin (a pipe or a file, read forward only), writes the RAW disk to stdout, a regular file opened
by the parent that reads as zeros (positional writes, zeros left as holes), and reports on stderr, one
JSON object per line: ``{"virtual_size": N|null}`` once the header is checked (before the first write),
``{"done": INPUT_BYTES, "data": DATA_BYTES}`` every few MiB of input (with ``"boundary": {...}``, the
latest clean boundary or null, every :data:`BOUNDARY_EVERY` bytes), then
``{"total": VIRTUAL_SIZE, "input": N, "data": N}`` or ``{"error": CODE, "message": ..., "done": N}``.
The parent truncates the output to ``total`` (the child's stdout may be a block device) and, on an error
line or a child killed by a limit, removes it.

With ``--records`` stdout is a pipe instead, and the child holds no writable file at all (as the
decompressor child): it sends framed records (:data:`RECORD`: a tag byte, offset, length), ``V`` the
virtual size (offset; length 0) once the header is checked, ``W`` data at an offset (followed by its
bytes), ``Z`` a range that must read as zeros, ``B`` a clean boundary (followed by ``length`` bytes of
its JSON), sent after every record it covers. The parent (:mod:`appliance.image.streamed`) checks each
record against the target and writes it itself.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import ImageRejected, ImagingError, UsageError
from .decoding import Boundary, DecodeLimits, Decoder, DecodeResult, FdSink, Progress
from .formats import COMPRESSIONS
from .rawstream import RAW, CompressedDecoder, RawDecoder
from .vhdfixed import FORMAT as VHD_FIXED
from .vhdfixed import VhdFixedDecoder
from .vmdkformat import FORMAT as VMDK_STREAM
from .vmdkstream import VmdkStreamDecoder

if TYPE_CHECKING:  # the decoder child never loads the configuration (and jsonschema with it)
    from ..config import Limits
    from .verdict import Preflight

FORMATS = (RAW, *COMPRESSIONS, VMDK_STREAM, VHD_FIXED)
#: the decoders whose output is a guest's disk decoded out of a container, as a conversion's output is
#: (the others write the input's own bytes, RAW or decompressed)
CONTAINERS = (VMDK_STREAM, VHD_FIXED)
#: input bytes between two boundaries the child reports
BOUNDARY_EVERY = 64 << 20
#: the error code of a resume from a checkpoint the format refuses (see :func:`check_checkpoint`)
BAD_CHECKPOINT = "InvalidCheckpoint"
#: a record of ``--records`` output: tag (V, W, Z, B), offset, length
RECORD = struct.Struct(">cQQ")


class RecordSink:
    """The ``--records`` sink: every write and zero range framed onto a pipe (module docstring)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _send(self, tag: bytes, offset: int, length: int, body: bytes = b"") -> None:
        data = RECORD.pack(tag, offset, length) + body if len(body) < 65536 else None
        if data is None:
            _write_all(self.fd, RECORD.pack(tag, offset, length))
            _write_all(self.fd, body)
        else:
            _write_all(self.fd, data)

    def write(self, offset: int, chunk: bytes) -> None:
        self._send(b"W", offset, len(chunk), chunk)

    def zero(self, offset: int, length: int) -> None:
        self._send(b"Z", offset, length)

    def virtual_size(self, size: int | None) -> None:
        self._send(b"V", size if size is not None else (1 << 64) - 1, 0)

    def boundary(self, b: Boundary) -> None:
        body = json.dumps(b.to_dict()).encode()
        self._send(b"B", 0, len(body), body)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def container_decoder(verdict: Preflight) -> str | None:
    """The sequential decoder of the container a preflight found: :data:`VMDK_STREAM` for a
    stream-optimized VMDK, :data:`VHD_FIXED` for a fixed VHD; None for any other format (random access:
    via scratch). RAW and compressed disks are the caller's to decide: ``source.route`` streams them, an
    ImportVolume upload writes RAW as it is."""
    if (
        verdict.format == "vmdk"
        and str(verdict.details.get("vmdk_create_type", "")).lower() == "streamoptimized"
    ):
        return VMDK_STREAM
    if verdict.format == "vhd" and verdict.details.get("vhd_subformat") == "fixed":
        return VHD_FIXED
    return None


def limits_of(limits: Limits, threads: int = 0) -> DecodeLimits:
    """The decoder bounds from the configuration's ``limits``."""
    return DecodeLimits(limits.max_virtual_size, limits.max_decompressed_size, threads)


def open_decoder(
    fmt: str,
    src: BinaryIO,
    limits: DecodeLimits,
    *,
    input_size: int | None = None,
    footer: bytes | None = None,
) -> Decoder:
    """The decoder of ``fmt`` over ``src`` (read from its first byte; the header is checked here).

    ``input_size``: the input's length when known (RAW: the virtual size; fixed VHD: size + 512).
    ``footer``: a fixed VHD's last 512 bytes when read ahead (verified before any write).
    Raises ImageRejected for a bad header, UsageError for an unknown format.
    """
    if fmt == RAW:
        return RawDecoder(src, limits, input_size=input_size)
    if fmt in COMPRESSIONS:
        return CompressedDecoder(src, fmt, limits)
    if fmt == VMDK_STREAM:
        return VmdkStreamDecoder(src, limits)
    if fmt == VHD_FIXED:
        return VhdFixedDecoder(src, limits, input_size=input_size, footer=footer)
    raise UsageError(f"no sequential decoder for {fmt!r}; use one of {', '.join(FORMATS)}")


def resume_decoder(
    boundary: Boundary,
    src: BinaryIO,
    limits: DecodeLimits,
    *,
    input_size: int | None = None,
    footer: bytes | None = None,
) -> Decoder:
    """Continue a decode at ``boundary``; ``src`` yields the input from ``boundary.input_offset`` on."""
    if boundary.format == RAW:
        return RawDecoder.resume(src, boundary, limits, input_size=input_size)
    if boundary.format == VMDK_STREAM:
        return VmdkStreamDecoder.resume(src, boundary, limits)
    if boundary.format == VHD_FIXED:
        return VhdFixedDecoder.resume(src, boundary, limits, input_size=input_size, footer=footer)
    if boundary.format in COMPRESSIONS and boundary.input_offset == 0:
        return CompressedDecoder(src, boundary.format, limits)
    raise UsageError(f"a {boundary.format} decode cannot resume at input byte {boundary.input_offset}")


def check_checkpoint(
    fmt: str, state: object, limits: DecodeLimits, *, input_size: int | None = None
) -> Boundary:
    """A decoder checkpoint (:meth:`~appliance.image.decoding.Decoder.checkpoint`, kept in the task store)
    as the :class:`~appliance.image.decoding.Boundary` to resume ``fmt`` from, once the format's restore
    accepted it (checked as untrusted: see each format's ``restore``). ValueError for anything else, a
    compressed stream past its start included (it has no state to resume from)."""
    if not isinstance(state, dict):
        raise ValueError("a decoder checkpoint is a JSON object")
    try:
        boundary = Boundary.from_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a decoder checkpoint: {exc}") from exc
    if boundary.format != fmt:
        raise ValueError(f"a checkpoint of a {boundary.format} decode, not of {fmt}")
    try:
        resume_decoder(boundary, io.BytesIO(), limits, input_size=input_size)  # reads nothing
    except UsageError as exc:
        raise ValueError(exc.message) from exc
    return boundary


def decode_file(
    decoder: Decoder,
    dst: Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
) -> DecodeResult:
    """Decode into the new file ``dst`` (created exclusively, never through a symlink; sparse), sized to
    the virtual size. On any failure ``dst`` is removed: no partial output is left."""
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            if decoder.virtual_size is not None:
                os.ftruncate(fd, decoder.virtual_size)
            result = decoder.decode(FdSink(fd), on_progress=on_progress, cancel=cancel)
            os.ftruncate(fd, result.virtual_size)
        finally:
            os.close(fd)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return result


# ------------------------------------------------------------------------------------------ the child


def main(argv: list[str] | None = None) -> int:
    """The decoder child: stdin → stdout, status on stderr (module docstring). Exit 0 with a result or
    error line; anything else (a traceback, a limit's signal) is the parent's to interpret."""
    parser = argparse.ArgumentParser(prog="appliance.image.decoders")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--max-virtual-size", type=int, required=True)
    parser.add_argument("--max-decompressed-size", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--input-size", type=int)
    parser.add_argument(
        "--resume", help="a file holding a boundary (JSON) to continue from; stdin starts at its offset"
    )
    parser.add_argument("--records", action="store_true", help="stdout is a pipe of framed records")
    parser.add_argument("--boundary-every", type=int, default=BOUNDARY_EVERY)
    args = parser.parse_args(argv)
    status = sys.stderr

    def report(obj: dict[str, Any]) -> None:
        status.write(json.dumps(obj) + "\n")
        status.flush()

    done = 0
    limits = DecodeLimits(args.max_virtual_size, args.max_decompressed_size, args.threads)
    src = os.fdopen(0, "rb", closefd=False)
    try:
        if args.resume:
            try:
                boundary = Boundary.from_dict(json.loads(Path(args.resume).read_text()))
                decoder = resume_decoder(boundary, src, limits, input_size=args.input_size)
            except (KeyError, TypeError, ValueError) as exc:  # checked as untrusted by each format
                raise ImagingError(
                    f"the checkpoint to resume from is refused: {exc}", code=BAD_CHECKPOINT
                ) from exc
        else:
            decoder = open_decoder(args.format, src, limits, input_size=args.input_size)
        report({"virtual_size": decoder.virtual_size})
        records = RecordSink(1) if args.records else None
        if records is not None:
            records.virtual_size(decoder.virtual_size)

        next_boundary = 0

        def progress(p: Progress) -> None:
            nonlocal done, next_boundary
            done = p.input_bytes
            line: dict[str, Any] = {"done": p.input_bytes, "data": p.data_bytes}
            if p.input_bytes >= next_boundary:  # a VMDK state holds a bitmap: not with every line
                b = decoder.boundary()
                line["boundary"] = b and b.to_dict()
                if records is not None and b is not None:
                    records.boundary(b)
                next_boundary = p.input_bytes + args.boundary_every
            report(line)

        result = decoder.decode(records or FdSink(1), on_progress=progress)
    except BrokenPipeError:
        return 1  # the parent stopped reading (a write it refused, cancelled)
    except ImageRejected as exc:
        report({"error": exc.code, "message": exc.message, "done": done})
    except ImagingError as exc:
        report({"error": exc.code, "message": exc.message, "done": done})
    except MemoryError:
        report(
            {"error": "UnsafeImage.ResourceLimit", "message": "the decoder ran out of memory", "done": done}
        )
    else:
        report({"total": result.virtual_size, "input": result.input_bytes, "data": result.data_bytes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
