"""ImportImage/ImportSnapshot without scratch: ``image.stream`` (glue), for a disk that ``source.route``
(:mod:`.source_route`) found sequential and free to stream into the image target.

``image.stream`` reads the object once with the ranged reader (parallel ranged GETs, verified,
retried, the stall watchdog), feeds it through the confined sequential decoder
(:class:`~appliance.image.streamed.StreamDecode`; plain RAW, with nothing to parse, through
:class:`~appliance.image.rawinline.InlineRawDecode` in this process, and a fixed VHD of known size,
RAW data then a footer, through :class:`~appliance.image.vhdinline.InlineVhdFixedDecode`) and writes
the RAW disk straight into the image target's new partial file (sparse: zero ranges are holes). The
written disk is then inspected as a conversion's output is (a RAW claim, the full inspection), the
guest is validated on it as ``guest.validate`` does, and only then is it published; any failure
removes the partial — a hostile stream leaves no image. No scratch is reserved on this path.

With the S3 image target the decoder's output goes in order into a multipart upload to a staging key, is
inspected and guest-validated there (read back with cached ranged GETs) and only then copied to its final
key: :mod:`.image_stream_s3`. A killed stream into S3 resumes from its multipart upload
(:mod:`.s3_checkpoint`).

A killed stream into the file image target resumes (:mod:`.stream_checkpoint`): every
``sources.checkpoint_every`` bytes of source, at a clean boundary of the decoder, the partial is fsynced
and the step's checkpoint saved in the task store (the verified source offset with the object's size and
ETag, the running sha256/MD5 of the source, the decoder's state, the partial's size and path). The step's
next run — the worker taking the task over after its process was killed, a restart, another appliance
sharing the image directory — takes the partial again, truncates it to the checkpointed size, re-fetches
and compares the bytes before the saved offset and continues from there (a ``stream.resumed`` event); the
sweeps of a task that may still resume leave that partial, a suspend or cancel keeps it, and the task's
end removes it if no run published it. RAW, fixed VHD and stream-VMDK resume; a gzip/xz/zstd/bzip2 source
has no decoder state past its start and decodes again from byte 0. An object replaced since the
checkpoint (another ETag or size, other bytes), a partial that is gone or a checkpoint that does not
check out restart from zero with a ``stream.restarted`` event naming the reason.

:func:`stream_source` is the reusable per-disk part (one source object → one sink) with an
``observer`` that sees every verified source byte in order (a digest of the source without a second
read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import (
    Cancelled,
    LeaseLost,
    SourceChanged,
    StoreUnavailable,
    UsageError,
)
from ..guest.early import PendingProbe
from ..image.decoders import BOUNDARY_EVERY, CONTAINERS
from ..image.decoding import Sink
from ..image.inspect import inspect_image, require_safe
from ..image.rawinline import InlineRawDecode
from ..image.rawstream import RAW
from ..image.streamed import StreamDecode, StreamResult
from ..image.vhdfixed import FORMAT as VHD_FIXED
from ..image.vhdinline import InlineVhdFixedDecode
from ..progress import StageMeter
from ..sources.fetch import parse_source
from ..sources.http import SourceIntegrity
from ..sources.ranges import ReaderSettings
from ..sources.reader import open_reader
from ..sources.urlfilter import UrlPolicy
from ..targets import get_image_target
from ..targets.base import storage_error
from ..targets.chunkdigest import digest_file, range_digest
from ..targets.encryption import requested
from ..targets.file import FileImageTarget
from ..targets.offsetdigest import HashedSink, OffsetChunkedSha256
from ..targets.rawio import RawWriter
from ..targets.s3 import S3ImageTarget
from ..workflow.step import Step, StepContext
from .guest import ValidateStep
from .image_stream_s3 import stream_into_s3
from .imports import DISK_NAME, checked_source, record_streamed_source
from .provenance import READ_AFTER_STREAM, WHILE_STREAMING_CHUNKED
from .retries import retry_reporter
from .stream_checkpoint import ResumePoint, SourceReplaced, StreamCheckpoints, writing_meter

#: source bytes handed to the decoder at a time
_PIECE = 1 << 20

Observer = Callable[[bytes], None]

_NULLABLE_STR = {"type": ["string", "null"]}


def stream_source(
    ctx: StepContext,
    source: dict[str, Any],
    decoder: str,
    sink: Sink,
    *,
    capacity: int,
    meter: StageMeter | None = None,
    observer: Observer | None = None,
    on_md5_checked: Callable[[str], None] | None = None,
    checkpoints: StreamCheckpoints | None = None,
) -> StreamResult:
    """Read ``source`` once with the ranged reader and decode it with ``decoder`` into ``sink`` (one
    disk; no scratch). ``capacity``: the largest disk the sink takes (a record beyond it is
    ``CorruptImage``). ``observer`` sees every source byte, verified and in order, before the decoder
    does (e.g. a sha256 of the source). The object's MD5 is checked against a single-part ETag before
    the decode is accepted (``on_md5_checked`` is told the MD5 when it was). Raises what the reader
    and the decoder raise (coded).

    ``checkpoints`` (:mod:`.stream_checkpoint`): checkpointed at the decoder's boundaries, and started
    where its ``resume`` says (the reader from the saved position, the decoder from its boundary; the
    digests go on from their saved states); a source that is not the checkpointed object any more is
    :class:`~.stream_checkpoint.SourceReplaced`."""
    limits = ctx.config.limits
    policy = UrlPolicy.from_config(ctx.config.sources)
    settings = dataclasses.replace(
        ReaderSettings.from_sources(ctx.config.sources), max_size=limits.max_decompressed_size
    )
    reader = open_reader(
        source,
        policy,
        ctx.config.sources.s3,
        cancel=ctx.cancel,
        settings=settings,
        on_retry=retry_reporter(ctx),  # a retry (a stall among them) is a task event as it happens
        start=checkpoints.position if checkpoints is not None else None,
    )
    md5: Any = None
    try:
        reader.open()
    except SourceChanged as exc:
        if checkpoints is not None and checkpoints.position is not None:
            raise checkpoints.replaced(exc) from exc
        raise
    with reader:
        size = reader.size
        if reader.md5_etag is not None:
            # only a single-part S3 ETag is an MD5 to check; hashing every other source with MD5 as
            # well (about half sha256's speed here) would slow every import for nothing
            md5 = hashlib.md5()
        if checkpoints is not None:
            checkpoints.opened(reader)
        if meter is not None:
            meter.set_total(size)

        def on_virtual_size(virtual: int | None) -> None:
            if meter is not None and virtual is not None:
                meter.set_total(virtual)

        base = checkpoints.base if checkpoints is not None else 0

        def on_output(done: int) -> None:
            if meter is not None:
                meter.wrote(base + done)

        common: dict[str, Any] = {
            "capacity": capacity,
            "max_virtual_size": limits.max_virtual_size,
            "on_virtual_size": on_virtual_size,
            "on_output": on_output,
            "cancel": ctx.cancel,
            "resume": checkpoints.boundary if checkpoints is not None else None,
            "boundary_every": checkpoints.every if checkpoints is not None else BOUNDARY_EVERY,
            "on_boundary": checkpoints.on_boundary if checkpoints is not None else None,
        }
        # plain RAW has nothing to parse, nor a fixed VHD of known size before its footer: decoded
        # here (rawinline, vhdinline), not through the confined child
        stream: StreamDecode | InlineRawDecode = (
            InlineRawDecode(sink, **common)
            if decoder == RAW
            else InlineVhdFixedDecode(sink, input_size=size, **common)
            if decoder == VHD_FIXED and size is not None
            else StreamDecode(
                decoder,
                sink,
                limits=limits,
                max_decompressed_size=limits.max_decompressed_size,
                input_size=size if decoder == VHD_FIXED else None,
                **common,
            )
        )
        # the checkpoints' hashing thread stops once the decode is done (their digests stay readable)
        hashing = contextlib.closing(checkpoints) if checkpoints is not None else contextlib.nullcontext()
        with hashing, stream:
            done = reader.tell()  # a resumed read starts at its position
            buf = bytearray(_PIECE)
            while n := reader.readinto(buf):
                chunk = bytes(memoryview(buf)[:n])  # one copy: the decoder and the hashes keep it
                if checkpoints is None:
                    if md5 is not None:
                        md5.update(chunk)
                    feed = chunk
                else:  # hashed there; a resumed read's bytes before the decoder's boundary are not fed
                    feed = checkpoints.passed(done, chunk)
                if observer is not None:
                    observer(chunk)
                if feed:
                    stream.feed(feed)
                done += n
                if meter is not None:
                    meter.read(done)
            got = (md5.hexdigest() if md5 is not None else None) if checkpoints is None else checkpoints.md5()
            if reader.md5_etag is not None and got is not None and got != reader.md5_etag:
                raise SourceIntegrity(
                    f"{reader.origin.where}: the MD5 of the received bytes ({got}) does not "
                    f"match the ETag ({reader.md5_etag}); the download was corrupted, try again"
                )
            if reader.md5_etag is not None and got is not None and on_md5_checked is not None:
                on_md5_checked(reader.md5_etag)
            return stream.finish()


class StreamStoreStep(Step):
    """``image.stream``: decode a sequential source straight into the image target (module docstring).

    Result: ``stored`` (what ``image.store`` returns), ``source_image`` (``format``, ``compression``,
    ``virtual_size``, ``decoder``), ``guest`` (the guest report) and ``stream`` (input and data bytes).
    """

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source", "decoder"],
        "properties": {
            "source": {"type": "object"},
            "decoder": {"type": "string"},
            "preflight": {"type": ["object", "null"]},
            "bootable": {"type": "boolean"},
            "platform": _NULLABLE_STR,
            "architecture": _NULLABLE_STR,
            "virtualization_type": _NULLABLE_STR,
            "kernel_id": _NULLABLE_STR,
            "encrypted": {"type": "boolean"},
            "kms_key_id": _NULLABLE_STR,
            "boot_mode": _NULLABLE_STR,
            "name": DISK_NAME,
        },
    }

    def run(
        self,
        ctx: StepContext,
        source: dict[str, Any],
        decoder: str,
        preflight: dict[str, Any] | None = None,
        bootable: bool = True,
        encrypted: bool = False,
        kms_key_id: str | None = None,
        name: str | None = None,
        **request: str | None,
    ) -> dict[str, Any]:
        source = checked_source(ctx, source)
        target = get_image_target(ctx.config)
        encryption = requested(encrypted, kms_key_id)
        if isinstance(target, S3ImageTarget):
            return stream_into_s3(
                ctx,
                target,
                stream_source,
                source,
                decoder,
                preflight=preflight,
                bootable=bootable,
                encryption=encryption,
                name=name,
                request=dict(request),
            )
        if not isinstance(target, FileImageTarget):
            raise UsageError("image.stream writes into a file or S3 image target only")
        facts: dict[str, Any] = {}
        # where an earlier run of this step got to (stream_checkpoint): a checkpoint that does not
        # check out is dropped, and the stream starts from zero
        key = str(parse_source(source))
        point, dropped = ResumePoint.load(ctx.load_checkpoint(), key, decoder, ctx.config.limits)
        if dropped is not None:
            ctx.event("stream.restarted", offset=0, reason=dropped)
        meter = writing_meter(ctx, point)
        md5_checked: list[str] = []

        def write(path: Path) -> None:
            # the guest probe starts with the stream (its start and imports overlap it) and waits for the
            # written disk; leaving this function any way kills and reaps it
            with PendingProbe("raw", config=ctx.config, workdir=ctx.workdir) as probe:
                write_and_check(path, probe)

        def write_and_check(path: Path, probe: PendingProbe) -> None:
            where = f"image file {path}"
            resume = point if point is not None and path == point.partial else None
            if resume is not None and os.stat(path).st_size < resume.output_size:
                resume = None  # shorter than it was when the checkpoint was saved: not that partial
            if point is not None and resume is None:
                ctx.event(
                    "stream.restarted",
                    offset=0,
                    reason="the partial image of the checkpoint is gone or short",
                )
            # what was written after the checkpoint goes (all of it, when the stream starts from zero)
            os.truncate(path, resume.output_size if resume is not None else 0)
            with RawWriter(path, zeroed=True, error=lambda exc: storage_error(exc, where)) as out, meter:
                written: list[OffsetChunkedSha256] = []

                def run(start: ResumePoint | None) -> tuple[StreamResult, StreamCheckpoints]:
                    checkpoints = StreamCheckpoints(
                        ctx, key, decoder, out, path, every=ctx.config.sources.checkpoint_every, resume=start
                    )
                    # the image's sha256-chunked, taken from the decoder's writes (no second read)
                    for old in written:
                        old.close()
                    written[:] = [
                        OffsetChunkedSha256(
                            reread=lambda start, end: range_digest(out.fd, start, end), name="image"
                        )
                    ]
                    if start is not None:
                        written[0].unknown(
                            f"the stream resumed at source byte {start.boundary.input_offset}: the disk "
                            "before it was written by an earlier run"
                        )
                    result = stream_source(
                        ctx,
                        source,
                        decoder,
                        HashedSink(out, written[0]),
                        capacity=ctx.config.limits.max_virtual_size,
                        meter=meter,
                        on_md5_checked=md5_checked.append,
                        checkpoints=checkpoints,
                    )
                    return result, checkpoints

                try:
                    try:
                        result, checkpoints = run(resume)
                    except SourceReplaced as exc:  # (raised before anything was read or written)
                        ctx.event("stream.restarted", offset=0, reason=exc.message)
                        os.truncate(path, 0)
                        result, checkpoints = run(None)
                    image_digest = written[0].result(result.virtual_size)
                    facts["digest_gap"] = written[0].gap
                finally:
                    for hasher in written:
                        hasher.close()
            facts["digest"] = image_digest.to_dict() if image_digest is not None else None
            # a wrong source fails before the disk is published
            record_streamed_source(ctx, facts, source, checkpoints, result.input_bytes, md5_checked, name)
            with open(path, "r+b") as f:
                # the disk's size: a trailing zero range is a hole, not a write (the target fsyncs it)
                f.truncate(result.virtual_size)
            # the written disk is RAW output: inspected as a conversion's output is (nothing hidden inside;
            # decoded out of a VMDK or VHD, a guest's disk, which may begin with a tar)
            inspected = require_safe(
                inspect_image(
                    path,
                    "raw",
                    config=ctx.config,
                    workdir=ctx.workdir,
                    cancel=ctx.cancel,
                    decoded=decoder in CONTAINERS,
                )
            )
            facts["stream"] = {
                "decoder": decoder,
                "input_bytes": result.input_bytes,
                "data_bytes": result.data_bytes,
            }
            facts["source_image"] = {
                "format": (preflight or {}).get("format"),
                "compression": (preflight or {}).get("compression"),
                "virtual_size": result.virtual_size,
                "decoder": decoder,
                "output_format": inspected.format,
            }
            # the guest, read on the written disk before it is published (guest.validate's checks)
            facts["guest"] = ValidateStep().run(
                ctx,
                str(path),
                format="raw",
                bootable=bootable,
                platform=request.get("platform"),
                architecture=request.get("architecture"),
                virtualization_type=request.get("virtualization_type"),
                kernel_id=request.get("kernel_id"),
                boot_mode=request.get("boot_mode"),
                probe=probe,
            )
            meter.set_total(result.virtual_size)
            meter.wrote(result.virtual_size)

        location = target.store_streamed(
            f"{ctx.task_id}-{name}" if name else ctx.task_id,  # a data disk of an image: its own name
            write,
            format="raw",
            ledger=ctx,
            encryption=encryption,
            fence=ctx.fence,
            # the partial an earlier run kept, taken again; kept when this run is stopped (a suspend or
            # a cancel: the task's end removes it if no run finishes it; a lost lease or database:
            # the run that resumes the task takes it)
            reuse_partial=point.partial if point is not None else None,
            keep_partial_on=(Cancelled, LeaseLost, StoreUnavailable),
            # its digest is the sha256-chunked taken while it was written: no second read for a sha256
            hash_output=False,
        )
        meter.flushed()  # published and fsynced
        digest, gap = facts.pop("digest"), facts.pop("digest_gap")
        if digest is not None:
            location["digest"] = digest
            location["digest_method"] = WHILE_STREAMING_CHUNKED
        else:  # a resumed stream did not see the disk before its checkpoint: one read of the image
            location["digest"] = digest_file(Path(location["path"]), cancel=ctx.cancel).to_dict()
            location["digest_method"] = READ_AFTER_STREAM + str(gap)
        ctx.ledger_created(json.dumps(location, sort_keys=True))
        return {"stored": location, **facts}

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result and result.get("stored"):
            get_image_target(ctx.config).delete(result["stored"])
            ctx.ledger_removed(json.dumps(result["stored"], sort_keys=True))

    def plan(
        self,
        ctx: StepContext,
        source: dict[str, Any],
        decoder: str,
        preflight: dict[str, Any] | None = None,
        bootable: bool = True,
        encrypted: bool = False,
        kms_key_id: str | None = None,
        **request: str | None,
    ) -> dict[str, Any]:
        return {
            "streams": source,
            "decoder": decoder,
            "target": ctx.config.targets["image"]["type"],
            "scratch_bytes": 0,
        }
