"""Import steps: ``manifest.wait``, ``volume.create``, ``volume.import``, ``volume.finalize``,
``source.fetch`` and ``image.store``.

They join the sources (:mod:`appliance.sources`), the safety pipeline and the targets
(:mod:`appliance.targets`) for the shipped import workflows. Progress follows one model:
``phase`` is the EC2-style sub-state, ``percent`` covers the whole transfer (download and
conversion weighted equally when both happen), and ``converted`` counts bytes written to the
target, which never goes backwards (EC2 ``bytesConverted``).

Restart safety: ``volume.create`` records the volume in the task's scratch directory the moment it
exists, and ``volume.import`` checkpoints after every verified part, so a resumed task reuses the
volume and downloads only the parts it had not verified.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any

from ..atomicfile import write_json_atomic
from ..errors import Finding, ImageRejected, ImagingError
from ..image.convert import convert_image
from ..image.decoding import Boundary
from ..image.formats import parse_claim
from ..image.inspect import PREFLIGHT_HEAD, PREFLIGHT_TAIL, Preflight, inspect_image, preflight, require_safe
from ..image.stream import RawStreamCheck
from ..image.streamed import StreamDecode
from ..image.vhdfixed import FORMAT as VHD_FIXED
from ..image.vmdkstream import FORMAT as VMDK_STREAM
from ..progress import Progress
from ..scratch import Allowance, is_no_space, no_space_error
from ..sources.euca_manifest import (
    cloud_keys,
    fetch_download_manifest,
    part_lengths,
    strip_marker,
    to_import_manifest,
)
from ..sources.fetch import fetch_to_file, parse_source
from ..sources.http import HttpClient, SourceUnavailable
from ..sources.manifest import ImportManifest, Part
from ..sources.origins import Origin, origin_for
from ..sources.parts import download_parts, wait_for_manifest
from ..sources.ranges import ReaderSettings, parse_content_range
from ..sources.urlfilter import UrlPolicy
from ..targets import get_image_target, get_volume_target
from ..targets.base import Volume, insufficient_storage, storage_error
from ..targets.ec2 import Ec2VolumeTarget
from ..targets.encryption import requested
from ..targets.rawio import RawWriter
from ..workflow.step import Step, StepContext
from .bundles import bundle_download, bundle_manifest_url, unbundle_onto_volume, unbundle_source

GiB = 1 << 30
_VOLUME_RECORD = "volume.json"
_CHECKPOINT = "parts.json"


class InsufficientVolumeSize(ImagingError):
    """The disk's virtual size does not fit the requested volume."""

    code = "InsufficientVolumeSize"


def _policy(ctx: StepContext) -> UrlPolicy:
    return UrlPolicy.from_config(ctx.config.sources)


class ManifestWaitStep(Step):
    """Wait until the import manifest and all its parts are uploaded (or the task expires).

    ``signed`` (pull mode): the URL is a Eucalyptus download manifest, uploaded already; it is verified
    against the cloud certificate before anything is read from it or any part is fetched
    (``CertificateFailure``), then each part's length is asked for (:mod:`appliance.sources.euca_manifest`).
    """

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["url", "expires", "format"],
        "properties": {
            "url": {"type": "string"},
            "expires": {"type": "string"},
            "format": {"enum": ["RAW", "VMDK", "VHD"]},
            "signed": {"type": "boolean"},
        },
    }

    def run(
        self, ctx: StepContext, url: str, expires: str, format: str, signed: bool = False
    ) -> dict[str, Any]:
        deadline = dt.datetime.fromisoformat(expires.replace("Z", "+00:00"))
        ctx.progress({"phase": "pending-upload", "done": 0})
        if signed:
            http = HttpClient(_policy(ctx))
            download = fetch_download_manifest(url, cloud_keys(ctx.config.controller), http, ctx.cancel)
            if (
                download.bundle is not None
            ):  # an instance-store bundle: volume.import unbundles it (bundles.py)
                return bundle_download(download)
            manifest = to_import_manifest(download, part_lengths(download, http, ctx.cancel), format)
        else:
            manifest = wait_for_manifest(
                url,
                _policy(ctx),
                deadline=deadline,
                cancel=ctx.cancel,
                on_wait=lambda status: ctx.event("waiting", message=status),
            )
        if manifest.file_format.upper() != format:
            raise ImageRejected(
                [
                    Finding.error(
                        "FormatMismatch",
                        f"claimed {format}, but the import manifest says {manifest.file_format}; "
                        "import again with the format of the uploaded file",
                    )
                ]
            )
        return manifest.to_dict()

    def plan(
        self, ctx: StepContext, url: str, expires: str, format: str, signed: bool = False
    ) -> dict[str, Any]:
        _policy(ctx).check(strip_marker(url))
        return {"waits_for": "manifest and parts", "until": expires, "scratch_bytes": 0}


class VolumeCreateStep(Step):
    """Create the target volume (a file, a given device, or a cloud volume attached to this appliance).

    ``volume_id`` (pull mode) names a volume the cloud created for the task: the ``ec2`` target attaches
    that one instead (found by its serial, as its own volumes), and undoing only detaches it. Other
    targets cannot reach a cloud volume and create their own, as without it.
    """

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["size_gib"],
        "properties": {
            "size_gib": {"type": "integer", "minimum": 1},
            "availability_zone": {"type": ["string", "null"]},
            "volume_id": {"type": ["string", "null"]},
        },
    }

    def run(
        self,
        ctx: StepContext,
        size_gib: int,
        availability_zone: str | None = None,
        volume_id: str | None = None,
    ) -> dict[str, Any]:
        target = get_volume_target(ctx.config)
        record = ctx.workdir / _VOLUME_RECORD
        if record.exists():  # the step ran before a crash: take the volume it created again
            volume = target.reopen(json.loads(record.read_text()))
        elif volume_id and isinstance(target, Ec2VolumeTarget):
            volume = target.adopt(volume_id, ctx.task_id)
            record.write_text(json.dumps(volume.info))
        else:
            # The token is this step's: a create that was interrupted before the record was written made (or
            # began) the volume this one takes again, where the target can.
            volume = target.create(
                ctx.task_id,
                size_gib * GiB,
                availability_zone=availability_zone,
                client_token=f"{ctx.task_id}/{ctx.idx}",
            )
            record.write_text(json.dumps(volume.info))
            ctx.ledger_created(f"volume {volume.id} ({volume.path})")
        return {"id": volume.id, **volume.info}

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result and result.get("adopted"):  # the cloud's volume: handed back, never deleted
            target = get_volume_target(ctx.config)
            if isinstance(target, Ec2VolumeTarget):
                target.release(result)
        elif result:
            get_volume_target(ctx.config).delete(result)
            ctx.ledger_removed(f"volume {result['id']} ({result.get('path')})")

    def plan(
        self,
        ctx: StepContext,
        size_gib: int,
        availability_zone: str | None = None,
        volume_id: str | None = None,
    ) -> dict[str, Any]:
        return {
            "creates": f"a {size_gib} GiB volume",
            "target": ctx.config.targets["volume"]["type"],
            "scratch_bytes": 0,
        }


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
        checkpoint = ctx.workdir / _CHECKPOINT
        state = json.loads(checkpoint.read_text()) if checkpoint.exists() else {"next": 0, "done": 0}
        # A volume nobody wrote to yet still reads as zeros; after a restart it may hold a partial write.
        zeroed = bool(fresh.get("zeroed")) and state["next"] == 0
        if format == "RAW":
            return self._stream_raw(ctx, m, vol, zeroed, checkpoint, state)
        verdict = _preflight(ctx, m, format)
        decoder = _sequential(verdict)
        if decoder is not None:
            return self._stream_decoded(ctx, m, format, decoder, vol, zeroed, checkpoint, state)
        return self._via_scratch(ctx, m, format, vol, checkpoint, state)

    @staticmethod
    def _save(checkpoint: Path, part: Part, done: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        state = {"next": part.index + 1, "done": done, **(extra or {})}
        write_json_atomic(checkpoint, state, 0o600)  # durable: a resume trusts it
        return state

    def _stream_raw(
        self,
        ctx: StepContext,
        m: ImportManifest,
        vol: Volume,
        zeroed: bool,
        checkpoint: Path,
        state: dict[str, Any],
    ) -> dict[str, Any]:
        if m.size > vol.size:
            raise InsufficientVolumeSize(
                f"the RAW image is {m.size} bytes but volume {vol.id} holds {vol.size}; import it into a "
                f"volume of at least {-(-m.size // GiB)} GiB"
            )
        check = RawStreamCheck()
        where = f"volume {vol.id} ({vol.path})"
        with RawWriter(vol.path, zeroed=zeroed, error=lambda exc: storage_error(exc, where)) as out:
            # After a restart the inspectors must see the whole stream: re-read what was verified.
            for offset in range(0, state["done"], 1 << 20):
                check.eat(out.read(offset, min(1 << 20, state["done"] - offset)))

            def write(offset: int, chunk: bytes) -> None:
                check.eat(chunk)
                out.write(offset, chunk)

            def on_part(part: Part, done: int) -> None:
                self._save(checkpoint, part, done)
                ctx.progress(
                    {
                        "phase": "writing",
                        "done": done,
                        "total": m.size,
                        # 100 % only once the volume is flushed (finalize)
                        "percent": min(99.0, 100.0 * done / m.size),
                        "converted": done,
                    }
                )

            ctx.progress(
                {"phase": "writing", "done": state["done"], "total": m.size, "converted": state["done"]}
            )
            download_parts(
                m, write, _policy(ctx), start_index=state["next"], on_part=on_part, cancel=ctx.cancel
            )
            findings = check.verdict()
            if findings:
                raise ImageRejected(findings)
            out.zero(m.size, vol.size - m.size)  # no stale data past the image
        return {"bytes_written": m.size, "format": "RAW", "virtual_size": m.size, "streamed": True}

    def _stream_decoded(
        self,
        ctx: StepContext,
        m: ImportManifest,
        format: str,
        decoder: str,
        vol: Volume,
        zeroed: bool,
        checkpoint: Path,
        state: dict[str, Any],
    ) -> dict[str, Any]:
        where = f"volume {vol.id} ({vol.path})"
        resume = Boundary.from_dict(state["boundary"]) if state.get("boundary") else None
        if resume is not None and resume.format != decoder:
            resume = None  # a checkpoint of another decode: start again
        start_index, skip = 0, 0
        if resume is not None:
            start_index = _part_at(m, resume.input_offset)
            if start_index < len(m.parts):
                skip = resume.input_offset - m.parts[start_index].start
        base = int(state.get("converted", 0)) if resume is not None else 0
        limits = ctx.config.limits
        virtual: list[int | None] = [None]
        produced = [base]

        def on_virtual_size(size: int | None) -> None:
            virtual[0] = size
            if size is not None and size > vol.size:
                raise _too_small(format, size, vol)

        with RawWriter(
            vol.path, zeroed=zeroed and resume is None, error=lambda e: storage_error(e, where)
        ) as out:

            def on_boundary(b: Boundary, done: int) -> None:
                # everything before the boundary is in the volume: make it durable, then record it
                out.flush()
                index = _part_at(m, b.input_offset)
                write_json_atomic(
                    checkpoint,
                    {
                        "next": index,
                        "done": b.input_offset,
                        "boundary": b.to_dict(),
                        "converted": base + done,
                    },
                    0o600,
                )

            def on_output(done: int) -> None:
                produced[0] = base + done

            def report() -> None:
                total = virtual[0] or m.size
                done = min(produced[0], total)
                ctx.progress(
                    {
                        "phase": "writing",
                        "done": done,
                        "total": total,
                        # 100 % only once the volume is flushed
                        "percent": min(99.0, 100.0 * done / total) if total else None,
                        "converted": done,
                    }
                )

            with StreamDecode(
                decoder,
                out,
                capacity=vol.size,
                limits=limits,
                max_virtual_size=limits.max_virtual_size,  # a disk larger than the volume: on_virtual_size
                max_decompressed_size=limits.max_decompressed_size,
                input_size=m.size if decoder == VHD_FIXED else None,
                resume=resume,
                boundary_every=ctx.config.sources.checkpoint_every,
                on_virtual_size=on_virtual_size,
                on_boundary=on_boundary,
                on_output=on_output,
                cancel=ctx.cancel,
            ) as stream:

                def write(offset: int, chunk: bytes) -> None:
                    first = m.parts[start_index].start + skip if start_index < len(m.parts) else m.size
                    if offset + len(chunk) <= first:
                        return  # before the boundary: decoded already
                    stream.feed(chunk[max(0, first - offset) :])

                report()
                download_parts(
                    m,
                    write,
                    _policy(ctx),
                    start_index=start_index,
                    on_part=lambda p, d: report(),
                    cancel=ctx.cancel,
                )
                result = stream.finish()
            size = result.virtual_size
            if size > vol.size:
                raise _too_small(format, size, vol)
            out.zero(size, vol.size - size)  # no stale data past the image
            out.flush()
            # the written disk is RAW output: its content must be RAW (nothing hidden inside), as a
            # conversion's output is checked
            head = out.read(0, min(PREFLIGHT_HEAD, size))
            tail = out.read(max(0, size - PREFLIGHT_TAIL), min(PREFLIGHT_TAIL, size))
        check = preflight(head, tail, "raw", config=ctx.config, size=size)
        if not check.safe:
            raise ImageRejected(check.errors)
        ctx.progress({"phase": "writing", "done": size, "total": size, "percent": 100.0, "converted": size})
        return {
            "bytes_written": size,
            "format": format,
            "virtual_size": size,
            "streamed": True,
            "decoder": decoder,
        }

    def _via_scratch(
        self,
        ctx: StepContext,
        m: ImportManifest,
        format: str,
        vol: Volume,
        checkpoint: Path,
        state: dict[str, Any],
    ) -> dict[str, Any]:
        upload = ctx.workdir / f"upload.{format.lower()}"
        # Made again on every run: the engine released this step's reservations when it was interrupted.
        reservation = ctx.scratch.reserve(m.size, f"assembling the {format} upload")
        doing = f"assembling the {format} upload"
        # parts already verified stay: the file is reopened, never truncated (a fresh one reads as zeros)
        fresh_upload = not upload.exists()
        with RawWriter(
            upload,
            zeroed=fresh_upload,
            create=True,
            error=lambda exc: no_space_error(upload.parent, doing) if is_no_space(exc) else None,
        ) as out:

            def on_part(part: Part, done: int) -> None:
                self._save(checkpoint, part, done)
                ctx.progress(
                    {
                        "phase": "downloading",
                        "done": done,
                        "total": m.size,
                        "percent": 50.0 * done / m.size,
                    }
                )

            download_parts(
                m, out.write, _policy(ctx), start_index=state["next"], on_part=on_part, cancel=ctx.cancel
            )
            out.flush()
        ctx.progress({"phase": "validating", "done": 0})
        source = require_safe(
            inspect_image(
                upload, format.lower(), config=ctx.config, workdir=ctx.workdir, cancel=ctx.cancel, ledger=ctx
            )
        )
        if source.virtual_size and source.virtual_size > vol.size:
            raise InsufficientVolumeSize(
                f"the {format} image's virtual size is {source.virtual_size} bytes but volume {vol.id} holds "
                f"{vol.size}; import it into a volume of at least {-(-source.virtual_size // GiB)} GiB"
            )

        def on_convert(p: Progress) -> None:
            ctx.progress(
                {
                    "phase": "converting",
                    "done": p.done,
                    "total": p.total,
                    "percent": 50.0 + (p.percent or 0.0) / 2,
                    "converted": p.done,
                    "rate": p.rate,
                    "eta": p.eta,
                }
            )

        result = convert_image(
            upload,
            vol.path,
            "raw",
            format.lower(),
            config=ctx.config,
            workdir=ctx.workdir,
            on_progress=on_convert,
            cancel=ctx.cancel,
            ledger=ctx,
            # qemu-img writes onto the volume's storage, not into scratch
            no_space=lambda _where, doing: insufficient_storage(f"volume {vol.id} ({vol.path})", doing),
        )
        if not result.block_device:
            # qemu-img wrote a new file of the image's virtual size: give it the volume's size and mode.
            os.chmod(vol.path, 0o600)
            if os.stat(vol.path).st_size < vol.size:
                os.truncate(vol.path, vol.size)
        upload.unlink(missing_ok=True)
        ctx.scratch.release(reservation)
        return {
            "bytes_written": result.virtual_size,
            "format": format,
            "virtual_size": result.virtual_size,
            "streamed": False,
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


def _part_at(m: ImportManifest, offset: int) -> int:
    """The index of the part holding input byte ``offset`` (len(parts) at the end)."""
    for part in m.parts:
        if part.start <= offset <= part.end:
            return part.index
    return len(m.parts)


def _read_range(m: ImportManifest, start: int, end: int, http: HttpClient, ctx: StepContext) -> bytes:
    """Bytes ``[start, end)`` of the upload, by ranged GETs of the parts holding them."""
    pieces: list[bytes] = []
    for part in m.parts:
        lo, hi = max(start, part.start), min(end, part.end + 1)
        if lo >= hi:
            continue
        response = http.get_stream(part.get_url, (lo - part.start, hi - part.start - 1), cancel=ctx.cancel)
        with response:
            if response.status not in (200, 206):
                raise SourceUnavailable(
                    f"part {part.index} ({part.key}) answered HTTP {response.status}", status=response.status
                )
            skip = lo - part.start if response.status == 200 else 0  # a server ignoring Range
            body = response.read(skip + hi - lo)
        piece = body[skip : skip + hi - lo]
        if len(piece) != hi - lo:
            raise SourceUnavailable(f"part {part.index} ({part.key}) sent {len(piece)} of {hi - lo} bytes")
        pieces.append(piece)
    return b"".join(pieces)


def _preflight(ctx: StepContext, m: ImportManifest, format: str) -> Preflight:
    """The header-only checks on the upload's first and last bytes, before anything is written;
    ImageRejected (the codes of a full inspection) for a mislabelled or unsafe upload."""
    http = HttpClient(_policy(ctx))
    head = _read_range(m, 0, min(PREFLIGHT_HEAD, m.size), http, ctx)
    tail = _read_range(m, max(0, m.size - PREFLIGHT_TAIL), m.size, http, ctx)
    verdict = preflight(head, tail, format.lower(), config=ctx.config, size=m.size)
    if not verdict.safe:
        raise ImageRejected(verdict.errors)
    return verdict


def _sequential(verdict: Preflight) -> str | None:
    """The sequential decoder for what the preflight found, or None (random access: via scratch)."""
    if (
        verdict.format == "vmdk"
        and str(verdict.details.get("vmdk_create_type", "")).lower() == "streamoptimized"
    ):
        return VMDK_STREAM
    if verdict.format == "vhd" and verdict.details.get("vhd_subformat") == "fixed":
        return VHD_FIXED
    return None


class VolumeFinalizeStep(Step):
    """Flush the volume and hand it over (an attached cloud volume is detached)."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["volume"],
        "properties": {"volume": {"type": "object"}},
    }

    def run(self, ctx: StepContext, volume: dict[str, Any]) -> dict[str, Any]:
        ctx.progress({"phase": "finalizing"})
        target = get_volume_target(ctx.config)
        ctx.fence()  # a run that lost the task to another worker hands over nothing
        return target.finalize(target.reopen(volume))


class SourceFetchStep(Step):
    """Download a disk (``{url}``: s3:// or https://; or ``{bucket, key}``) into scratch, with its sha256."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {"source": {"type": "object"}},
    }

    def run(self, ctx: StepContext, source: dict[str, Any]) -> dict[str, Any]:
        # fail fast: the header-only checks on the object's first and last bytes, before the download
        verdict = source_preflight(ctx, source)
        if verdict is not None and not verdict.safe:
            raise ImageRejected(verdict.errors)
        dst = ctx.workdir / "source.img"
        dst.unlink(missing_ok=True)  # a partial download from before a restart: fetch_to_file starts anew
        bundle = bundle_manifest_url(source)
        if bundle is not None:  # an EC2 image bundle: unbundled instead of downloaded (steps/bundles.py)
            return unbundle_source(ctx, bundle, dst)
        # Reserved as it is known: the object's size from the first answer, or as the bytes of a
        # source without a length arrive. Kept, at the downloaded size, while the file exists.
        allowance = Allowance(ctx.scratch, f"downloading {parse_source(source)}")
        ctx.ledger_created(dst)

        def on_progress(done: int, total: int | None) -> None:
            ctx.progress(
                {
                    "phase": "downloading",
                    "done": done,
                    "total": total,
                    "percent": 50.0 * done / total if total else None,
                }
            )

        try:
            result = fetch_to_file(
                source,
                dst,
                _policy(ctx),
                ctx.config.sources.s3,
                max_bytes=ctx.config.limits.max_decompressed_size,
                reserve=allowance.cover,
                cancel=ctx.cancel,
                on_progress=on_progress,
            )
        except BaseException:
            allowance.release()
            raise
        allowance.shrink_to(result.size)
        return {
            "path": str(result.path),
            "size": result.size,
            "sha256": result.sha256,
            "etag": result.etag,
            "preflight": verdict.to_dict() if verdict is not None else None,
        }

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result and Path(result["path"]).exists():
            Path(result["path"]).unlink()
            ctx.ledger_removed(result["path"])

    def plan(self, ctx: StepContext, source: dict[str, Any]) -> dict[str, Any]:
        if source.get("url") and not str(source["url"]).startswith("s3://"):
            _policy(ctx).check(source["url"])
        # the same preflight as the run: the verdict on the object's first and last bytes, and its size
        # (what the download needs in scratch)
        try:
            verdict = source_preflight(ctx, source)
        except ImagingError as exc:
            return {
                "downloads": source,
                "scratch_bytes": None,
                "preflight": {"error": exc.code, "message": exc.message},
            }
        size = verdict.details.get("object_size") if verdict is not None else None
        return {
            "downloads": source,
            "scratch_bytes": size,
            "preflight": verdict.to_dict() if verdict is not None else None,
        }


def _get_range(origin: Origin, start: int, end: int, ctx: StepContext) -> tuple[bytes, int | None]:
    """Bytes ``start..end`` (inclusive) of ``origin`` and the object's size (None when not said)."""
    cancel = ctx.cancel or threading.Event()
    response = origin.get(start, end, cancel=cancel)
    with response:
        partial = parse_content_range(response.status, response.headers.get("Content-Range"))
        want = end - start + 1
        body = bytearray()
        for chunk in response.iter_chunks():
            body += chunk
            if len(body) >= want:
                break
        if partial is None:  # a whole answer (Range not served): its length is the size
            if start:
                return b"", response.content_length
            return bytes(body[:want]), response.content_length
        return bytes(body[:want]), partial[2]


def source_preflight(ctx: StepContext, source: dict[str, Any]) -> Preflight | None:
    """:func:`~appliance.image.inspect.preflight` of a source object by two ranged GETs (its first
    :data:`PREFLIGHT_HEAD` and last :data:`PREFLIGHT_TAIL` bytes) against the claimed ``format``; None
    without a claim the inspectors know. ``details["object_size"]``: the object's size when known."""
    claim = str(source.get("format") or "").lower() or None
    try:
        parse_claim(claim)
    except ImagingError:
        return None  # a container (OVA...) or a name the inspection step reports
    if claim is None:
        return None
    settings = ReaderSettings.from_sources(ctx.config.sources)
    origin = origin_for(source, _policy(ctx), ctx.config.sources.s3, settings=settings)
    try:
        head, size = _get_range(origin, 0, PREFLIGHT_HEAD - 1, ctx)
    except SourceUnavailable as exc:
        if exc.status == 416:  # an empty object has no first byte: the download and inspection say so
            return None
        raise
    tail: bytes | None = None
    if size is not None and size > len(head):
        tail, _ = _get_range(origin, max(0, size - PREFLIGHT_TAIL), size - 1, ctx)
        tail = tail or None
    elif size is None:
        size = None if len(head) >= PREFLIGHT_HEAD else len(head)
    verdict = preflight(head, tail, claim, config=ctx.config, size=size)
    verdict.details["object_size"] = size
    return verdict


class ImageStoreStep(Step):
    """Store a converted disk with the image target (a file directory or an S3 bucket), server-side
    encrypted when ``encrypted`` (with the KMS key ``kms_key_id``, else the store's default; see
    :mod:`appliance.targets.encryption`). The result's ``encryption`` is what the stored image has."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["path", "format"],
        "properties": {
            "path": {"type": "string"},
            "format": {"type": "string"},
            "encrypted": {"type": "boolean"},
            "kms_key_id": {"type": ["string", "null"]},
        },
    }

    def run(
        self,
        ctx: StepContext,
        path: str,
        format: str,
        encrypted: bool = False,
        kms_key_id: str | None = None,
    ) -> dict[str, Any]:
        encryption = requested(encrypted, kms_key_id)

        def on_progress(p: Progress) -> None:
            ctx.progress(
                {
                    "phase": "uploading",
                    "done": p.done,
                    "total": p.total,
                    "percent": p.percent,
                    "converted": p.done,
                    "rate": p.rate,
                    "eta": p.eta,
                }
            )

        location = get_image_target(ctx.config).store(
            ctx.task_id,
            Path(path),
            format=format,
            on_progress=on_progress,
            cancel=ctx.cancel,
            ledger=ctx,
            encryption=encryption,
            fence=ctx.fence,  # a run that lost the task to another worker publishes nothing
        )
        ctx.ledger_created(json.dumps(location, sort_keys=True))
        return location

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result:
            get_image_target(ctx.config).delete(result)
            ctx.ledger_removed(json.dumps(result, sort_keys=True))

    def plan(
        self,
        ctx: StepContext,
        path: str,
        format: str,
        encrypted: bool = False,
        kms_key_id: str | None = None,
    ) -> dict[str, Any]:
        encryption = requested(encrypted, kms_key_id)
        return {
            "stores": path,
            "target": ctx.config.targets["image"]["type"],
            "encryption": encryption.to_dict() if encryption else None,
            "scratch_bytes": 0,
        }
