"""``volume.import``: the uploaded disk of an import manifest written onto the volume as RAW.

RAW uploads, stream-optimized VMDK and fixed VHD go part by part (each MD5-verified) straight onto
the volume, the latter two through the confined sequential decoder; other formats are assembled
in scratch and converted by qemu-img (:mod:`.volume_assemble`). The upload's parts are read, verified
and preflighted by :mod:`.volume_upload`. Progress: ``converted`` counts bytes written to the target
(EC2 ``bytesConverted``) and never goes backwards; 100 % only once the volume is flushed.

Restart safety: the step checkpoints at the first verified part boundary past every
``sources.checkpoint_every`` bytes (a RAW upload streamed onto the volume, flushed first), after every
part of an upload assembled in scratch, and at the decoder's boundaries; a resumed task downloads only
the parts after its checkpoint. The checkpoints are in the task
database (:meth:`~appliance.workflow.step.StepContext.save_checkpoint`, fenced by the run's lease),
not in scratch: an appliance that takes the task over from a dead one resumes where it got to on the
volume (a RAW or streamed upload; the volume is shared or reattached). An upload assembled in
scratch is resumed only where that scratch is (:mod:`.volume_assemble`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..errors import ImageRejected
from ..image.decoders import container_decoder
from ..image.decoding import Boundary, zeros
from ..image.inspect import PREFLIGHT_HEAD, PREFLIGHT_TAIL, preflight
from ..image.stream import RawStreamCheck
from ..image.streamed import StreamDecode
from ..image.vhdfixed import FORMAT as VHD_FIXED
from ..image.vhdinline import InlineVhdFixedDecode
from ..progress import StageMeter
from ..sources.digest import StreamDigest
from ..sources.manifest import ImportManifest, Part
from ..targets import earlyflush, get_volume_target
from ..targets.base import Volume, storage_error
from ..targets.chunkdigest import ChunkedDigest, range_digest
from ..targets.offsetdigest import HashedSink, OffsetChunkedSha256
from ..targets.rawio import RawWriter
from ..workflow.step import Step, StepContext
from .bundles import unbundle_onto_volume
from .volume import GiB, InsufficientVolumeSize
from .volume_assemble import import_via_scratch
from .volume_upload import (
    download_upload,
    part_at,
    save_part_checkpoint,
    upload_preflight,
    upload_source,
)


class VolumeImportStep(Step):
    """Write the uploaded disk onto the volume as RAW.

    RAW: parts stream straight onto the volume (no scratch), checked by the format inspectors on the
    way. VMDK/VHD: the upload's first and last bytes (ranged GETs of its first and last parts) are
    checked first (:func:`~appliance.image.inspect.preflight`: the claim against the content, the VMDK
    create type, a differencing VHD...), so a mislabelled or hostile upload fails before anything is
    written. A stream-optimized VMDK or a fixed VHD then streams part by part, each verified, through
    the confined sequential decoder onto the volume (no scratch; checkpointed at the decoder's clean
    boundaries every ``sources.checkpoint_every`` input bytes, so a resumed task continues there); the
    written disk's content is checked as RAW output is. Other VMDK/VHD subformats (random access) are
    assembled in scratch, inspected, and converted by qemu-img onto the volume.
    A volume whose storage fills up is ``InsufficientStorage`` on every path; scratch that fills up while
    a VMDK/VHD upload is assembled is ``InsufficientScratch``.
    """

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["manifest", "format", "volume"],
        "properties": {
            "manifest": {"type": "object"},
            "format": {"enum": ["RAW", "VMDK", "VHD"]},
            "volume": {"type": "object"},
        },
    }

    def run(
        self, ctx: StepContext, manifest: dict[str, Any], format: str, volume: dict[str, Any]
    ) -> dict[str, Any]:
        if "bundle" in manifest:  # a BUNDLE download manifest (pull mode): unbundled onto the volume
            vol = get_volume_target(ctx.config).reopen(volume)
            return unbundle_onto_volume(ctx, manifest, vol, bool(volume.get("zeroed")))
        m = ImportManifest.from_dict(manifest)
        fresh = dict(volume)
        vol = get_volume_target(ctx.config).reopen(volume)
        # where an earlier attempt (here, or on an appliance that died) got to: in the task database
        state = ctx.load_checkpoint() or {"next": 0, "done": 0}
        # A volume nobody wrote to yet still reads as zeros; after a restart it may hold a partial write.
        zeroed = bool(fresh.get("zeroed")) and state["next"] == 0
        if format == "RAW":
            return self._stream_raw(ctx, m, vol, zeroed, state)
        verdict = upload_preflight(ctx, m, format)
        decoder = container_decoder(verdict)
        if decoder is not None:
            return self._stream_decoded(ctx, m, format, decoder, vol, zeroed, state)
        return import_via_scratch(ctx, m, format, vol, state)

    def _stream_raw(
        self,
        ctx: StepContext,
        m: ImportManifest,
        vol: Volume,
        zeroed: bool,
        state: dict[str, Any],
    ) -> dict[str, Any]:
        if m.size > vol.size:
            raise InsufficientVolumeSize(
                f"the RAW image is {m.size} bytes but volume {vol.id} holds {vol.size}; import it into a "
                f"volume of at least {-(-m.size // GiB)} GiB"
            )
        check = RawStreamCheck()
        digest = StreamDigest()
        where = f"volume {vol.id} ({vol.path})"
        with (
            RawWriter(vol.path, zeroed=zeroed, error=lambda exc: storage_error(exc, where)) as out,
            _volume_digest(out) as written,
        ):
            # After a restart the inspectors must see the whole stream: re-read what was verified (the
            # upload's bytes as they are on the volume: the source and volume digests cover them too).
            for offset in range(0, state["done"], 1 << 20):
                piece = out.read(offset, min(1 << 20, state["done"] - offset))
                check.eat(piece)
                digest.update(piece)
                written.write(offset, piece)

            # bytes read and written, rate and ETA, also while nothing arrives; 100 % only once the
            # volume is flushed (finalize)
            meter = StageMeter("writing", m.size, ctx.progress, read=state["done"], written=state["done"])

            def write(offset: int, chunk: bytes) -> None:
                check.eat(chunk)
                meter.read(offset + len(chunk))
                # one zero check for the volume and its digest: a zero chunk is a hole (or zeroed)
                # and adds only zeros to the digest, which it hashes without being given them
                if chunk == zeros(len(chunk)):
                    out.zero(offset, len(chunk))
                    written.zero(offset, len(chunk))
                else:
                    out.write(offset, chunk, zero=False)
                    written.write(offset, chunk, zero=False)
                meter.wrote(offset + len(chunk))

            every, saved = ctx.config.sources.checkpoint_every, state["done"]

            def on_part(part: Part, done: int) -> None:
                nonlocal saved
                meter.wrote(done)
                # a checkpoint every ``checkpoint_every`` bytes, not every part: each costs a flush the
                # writing waits for (a resume writes at most that much again)
                if done - saved < every:
                    return
                # what the checkpoint says is on the volume must be there for whoever resumes (another
                # appliance after this one lost power): durable first, then recorded
                out.flush()
                save_part_checkpoint(ctx, part, done)
                saved = done

            with meter:
                download_upload(ctx, m, write, start_index=state["next"], on_part=on_part, digest=digest)
            findings = check.verdict()
            if findings:
                raise ImageRejected(findings)
            out.zero(m.size, vol.size - m.size)  # no stale data past the image
            written.zero(m.size, vol.size - m.size)
            volume_digest = written.result(vol.size)
            # the flush runs while the guest is validated (on what the page cache holds, which is what the
            # volume will hold), hooks run and provenance is recorded; volume.finalize awaits it and
            # fails the task with its error
            earlyflush.start(out.fd, vol.path)
        return {
            "bytes_written": m.size,
            "format": "RAW",
            "virtual_size": m.size,
            "streamed": True,
            "source": upload_source(m, digest),
            **_output_digest(volume_digest, written),
        }

    def _stream_decoded(
        self,
        ctx: StepContext,
        m: ImportManifest,
        format: str,
        decoder: str,
        vol: Volume,
        zeroed: bool,
        state: dict[str, Any],
    ) -> dict[str, Any]:
        where = f"volume {vol.id} ({vol.path})"
        resume = Boundary.from_dict(state["boundary"]) if state.get("boundary") else None
        if resume is not None and resume.format != decoder:
            resume = None  # a checkpoint of another decode: start again
        start_index, skip = 0, 0
        if resume is not None:
            start_index = part_at(m, resume.input_offset)
            if start_index < len(m.parts):
                skip = resume.input_offset - m.parts[start_index].start
        base = int(state.get("converted", 0)) if resume is not None else 0
        digest = StreamDigest()
        if resume is not None:
            digest.gap(
                f"the task resumed at upload byte {resume.input_offset}: the bytes before it were decoded "
                "onto the volume by an earlier run and are not kept to hash again"
            )
        limits = ctx.config.limits
        virtual: list[int | None] = [None]
        produced = [base]

        def on_virtual_size(size: int | None) -> None:
            virtual[0] = size
            if size is not None and size > vol.size:
                raise _too_small(format, size, vol)

        with (
            RawWriter(
                vol.path, zeroed=zeroed and resume is None, error=lambda e: storage_error(e, where)
            ) as out,
            _volume_digest(out) as written,
        ):
            if resume is not None:
                written.unknown(
                    f"the task resumed at upload byte {resume.input_offset}: the disk before it was "
                    "decoded onto the volume by an earlier run"
                )

            def on_boundary(b: Boundary, done: int) -> None:
                # everything before the boundary is in the volume: make it durable, then record it
                out.flush()
                index = part_at(m, b.input_offset)
                ctx.save_checkpoint(
                    {
                        "next": index,
                        "done": b.input_offset,
                        "boundary": b.to_dict(),
                        "converted": base + done,
                    }
                )

            # bytes fed to the decoder (read) and of the disk written, rate and ETA, also while nothing
            # arrives; 100 % only once the volume is flushed
            first_input = m.parts[start_index].start + skip if start_index < len(m.parts) else m.size
            meter = StageMeter("writing", m.size, ctx.progress, read=first_input, written=base)

            def on_output(done: int) -> None:
                produced[0] = base + done
                meter.set_total(virtual[0] or m.size)
                meter.wrote(produced[0])

            def report() -> None:
                meter.set_total(virtual[0] or m.size)
                meter.wrote(produced[0])

            common: dict[str, Any] = {
                "capacity": vol.size,
                "max_virtual_size": limits.max_virtual_size,  # a disk larger than the volume: on_virtual_size
                "resume": resume,
                "boundary_every": ctx.config.sources.checkpoint_every,
                "on_virtual_size": on_virtual_size,
                "on_boundary": on_boundary,
                "on_output": on_output,
                "cancel": ctx.cancel,
            }
            # a fixed VHD of known size is RAW data and a footer: decoded here (vhdinline), without
            # the child's two pipe crossings of every byte
            stream: StreamDecode | InlineVhdFixedDecode = (
                InlineVhdFixedDecode(HashedSink(out, written), input_size=m.size, **common)
                if decoder == VHD_FIXED
                else StreamDecode(
                    decoder,
                    HashedSink(out, written),
                    limits=limits,
                    max_decompressed_size=limits.max_decompressed_size,
                    input_size=None,
                    **common,
                )
            )
            with stream:

                def write(offset: int, chunk: bytes | memoryview) -> None:
                    if offset + len(chunk) <= first_input:
                        return  # before the boundary: decoded already
                    stream.feed(chunk[max(0, first_input - offset) :])
                    meter.read(offset + len(chunk))

                with meter:
                    download_upload(
                        ctx, m, write, start_index=start_index, on_part=lambda p, d: report(), digest=digest
                    )
                    result = stream.finish()
            size = result.virtual_size
            if size > vol.size:
                raise _too_small(format, size, vol)
            out.zero(size, vol.size - size)  # no stale data past the image
            written.zero(size, vol.size - size)
            out.flush()
            volume_digest = written.result(vol.size)
            # the written disk is RAW output: its content must be RAW (nothing hidden inside), as a
            # conversion's output is checked (decoded out of a VMDK or VHD: a guest's disk, which may
            # begin with a tar)
            head = out.read(0, min(PREFLIGHT_HEAD, size))
            tail = out.read(max(0, size - PREFLIGHT_TAIL), min(PREFLIGHT_TAIL, size))
        check = preflight(head, tail, "raw", config=ctx.config, size=size, decoded=True)
        if not check.safe:
            raise ImageRejected(check.errors)
        meter.set_total(size)
        meter.wrote(size)
        meter.flushed()  # the volume was flushed above
        return {
            "bytes_written": size,
            "format": format,
            "virtual_size": size,
            "streamed": True,
            "decoder": decoder,
            "source": upload_source(m, digest),
            **_output_digest(volume_digest, written),
        }

    def plan(
        self, ctx: StepContext, manifest: dict[str, Any], format: str, volume: dict[str, Any]
    ) -> dict[str, Any]:
        size = manifest.get("size", 0) if isinstance(manifest, dict) else 0
        # VMDK/VHD: a stream-optimized VMDK or a fixed VHD streams (decided on the upload's first and
        # last bytes when the step runs); the scratch shown is what any other subformat needs
        return {
            "streams": "yes" if format == "RAW" else "if stream-optimized VMDK or fixed VHD",
            "scratch_bytes": 0 if format == "RAW" else size,
        }


def _too_small(format: str, size: int, vol: Volume) -> InsufficientVolumeSize:
    return InsufficientVolumeSize(
        f"the {format} image's virtual size is {size} bytes but volume {vol.id} holds {vol.size}; import it "
        f"into a volume of at least {-(-size // GiB)} GiB"
    )


@contextlib.contextmanager
def _volume_digest(out: RawWriter) -> Iterator[OffsetChunkedSha256]:
    """The chunked digest of the whole volume, taken from the writes onto it (a chunk a write landed
    behind the others in is hashed again from the volume)."""
    digest = OffsetChunkedSha256(reread=lambda start, end: range_digest(out.fd, start, end), name="volume")
    try:
        yield digest
    finally:
        digest.close()


def _output_digest(digest: ChunkedDigest | None, written: OffsetChunkedSha256) -> dict[str, Any]:
    """The ``output_digest`` of the step's result (the volume's ``sha256-chunked`` as written), or
    ``output_digest_gap``: why there is none (the provenance step then reads the volume once)."""
    if digest is None:
        return {"output_digest": None, "output_digest_gap": written.gap}
    return {"output_digest": digest.to_dict()}
