"""The export step, ``export.write``: a resolved source disk (:mod:`appliance.service.resolver`)
written as an exported object through the export writer (:mod:`appliance.targets.export`).

The source is made readable here first:

- an image stored as a file, a file volume: read where it is;
- a block device (a device volume, an attached EC2 volume): read where it is (no scratch copy);
- an image stored in S3: downloaded into scratch (under a reservation), hashed as it arrives;
- an EC2 volume this appliance imported: attached here (found by serial), detached afterwards;
- an instance of the controlling cloud: a snapshot of its boot volume made into a volume attached
  here, all of it deleted afterwards (:class:`appliance.targets.ec2_export.CloudDiskCopy`; what it
  created is kept in the step's checkpoint, so a resumed run removes a killed run's leftovers).

The source is read once (:class:`SourceDigestCheck`): its digest is computed from the export writer's
own reads of it (or from the download of an S3-stored image) and checked against the digest its store
recorded when the import wrote it — the ``sha256-chunked`` where the import recorded one, else the plain
``sha256`` of an image stored before — before the object is completed (``Source.DigestMismatch``: a
stored disk that changed since; the upload is aborted, nothing is left). A RAW export's output digest
stands for the source's (the same bytes: hashed once; to S3 the check runs on the parts' digest once
every part is uploaded and before the upload is completed: a mismatch aborts it, no object ever
exists). A VHD of a block device, which qemu-img reads, is the one case read twice (once for the check,
before qemu-img runs).
Progress: ``exporting`` (the source read, converted and uploaded in one pass; a VHD of a block device
is converted to scratch by qemu-img, then uploaded). An OVA export of an instance of the controlling
cloud with several EBS volumes holds all of them, root device first (each copied, read and removed as
above; the checkpoint keeps each copy's record); the provenance lists each disk. The result holds the
object (``bucket``, ``key``, ``etag``, ``sha256``, ``size``) and its provenance
(:mod:`.provenance`), which the object also carries as user metadata.

Cancel or failure leaves nothing in the bucket: the writer aborts the multipart upload and deletes
the key; the step's undo (a later step failed) deletes the finished object.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ImagingError
from ..progress import Progress, ProgressTracker
from ..scratch import Allowance
from ..targets import get_image_target, get_volume_target
from ..targets.chunkdigest import ALGORITHM, DEFAULT_CHUNK
from ..targets.ec2 import Ec2VolumeTarget
from ..targets.ec2_export import CloudDiskCopy
from ..targets.export import ExportWriter, get_export_writer, ova_scratch_needed, scratch_needed
from ..targets.exportvhd import streams_vhd
from ..targets.exportwriter import StreamingExportWriter
from ..targets.hashing import OffsetSha256
from ..targets.offsetdigest import OffsetChunkedSha256
from ..timestamps import format_time, utc_now
from ..workflow.step import Step, StepContext
from .provenance import WHILE_WRITING, SourceDigestMismatch, build_record, object_metadata

CHUNK = 4 << 20


def _reading(ctx: StepContext, total: int | None) -> ProgressTracker:
    """Progress of reading the source (throttled: the task's row is not written for every chunk)."""
    return ProgressTracker(
        "reading source",
        total,
        lambda p: ctx.progress(
            {"phase": p.phase, "done": p.done, "total": p.total, "rate": p.rate, "eta": p.eta}
        ),
    )


def _download(ctx: StepContext, location: dict[str, Any], check: SourceDigestCheck) -> tuple[Path, Allowance]:
    """The S3-stored image into scratch, ``check`` fed as it arrives and verified before anything is
    written; ``(path, its scratch reservation)``."""
    target: Any = get_image_target(ctx.config)
    dst = ctx.workdir / "export-source.raw"
    dst.unlink(missing_ok=True)
    allowance = Allowance(ctx.scratch, f"downloading s3://{location['bucket']}/{location['key']}")
    ctx.ledger_created(dst)
    total = int(location.get("size") or 0)
    done = 0
    tracker = _reading(ctx, total or None)
    try:
        body = target.client.get_object(Bucket=location["bucket"], Key=location["key"])["Body"]
        with open(dst, "wb") as out:
            for chunk in body.iter_chunks(CHUNK):
                ctx.check_cancelled()
                check.read(done, chunk)
                done += len(chunk)
                allowance.cover(done)
                out.write(chunk)
                tracker.update(min(done, total) if total else done)
        check.verify(done)
    except BaseException:
        dst.unlink(missing_ok=True)
        ctx.ledger_removed(dst)
        allowance.release()
        check.close()
        raise
    allowance.shrink_to(done)
    return dst, allowance


class ExportWriteStep(Step):
    """Write a resolved source disk as ``disk_format`` to ``s3://bucket/key`` (see the module docstring)."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source", "disk_format", "bucket", "key"],
        "properties": {
            "source": {"type": "object", "required": ["type"]},
            "disk_format": {"enum": ["VMDK", "VHD", "RAW", "vmdk", "vhd", "raw"]},
            "bucket": {"type": "string", "minLength": 1},
            "key": {"type": "string", "minLength": 1},
            "container": {"enum": ["", "ova"]},
        },
    }

    def run(
        self,
        ctx: StepContext,
        source: dict[str, Any],
        disk_format: str,
        bucket: str,
        key: str,
        container: str = "",
    ) -> dict[str, Any]:
        started = utc_now()
        clock = time.monotonic()
        Readable.remove_leftovers(ctx, ctx.load_checkpoint() or {})
        writer = get_export_writer(ctx.config)
        # a run killed mid-upload left an incomplete multipart upload (or an object): gone first
        writer.remove(bucket, key)
        # an OVA holds every disk of the instance (the root device first); any other export one disk
        sources = disk_sources(source) if container else [source]
        state: dict[str, Any] = {}  # the step's checkpoint: what each cloud copy created
        with contextlib.ExitStack() as stack:
            checks = [SourceDigestCheck(s) for s in sources]
            for check in checks:
                stack.callback(check.close)
            opened = [
                stack.enter_context(Readable(ctx, s, slot=_slot(i), state=state, check=check))
                for i, (s, check) in enumerate(zip(sources, checks, strict=True))
            ]
            read_seconds = time.monotonic() - clock
            # one source per disk: an OVA of a multi-disk instance lists each volume, root first; what
            # the import recorded until the export's own read of each disk has been checked
            record = build_record(
                ctx, "export", [c.entry(path) for c, path in zip(checks, opened, strict=True)], [], timings={}
            )
            clock = time.monotonic()
            # what the writer puts in scratch, reserved up front: a VMDK or RAW export, and a VHD of
            # a regular file, stream with no scratch copy; a VHD of a block device is written by
            # qemu-img to scratch before it is uploaded (an OVA: each disk's VMDK is written to
            # scratch, then the tar streamed)
            conversion = Allowance(ctx.scratch, f"{container or disk_format} form of the disk")
            sizes = [_size(path) for path in opened]
            streams = not container and _streams_vhd(opened[0])
            needed = (
                sum(ova_scratch_needed(n) for n in sizes)
                if container
                else scratch_needed(disk_format, sizes[0], streams=streams)
            )
            if needed:
                conversion.cover(needed, exact=True)
            # a source not read yet (every one but a download) is checked on the export's own read
            pending = [None if c.verified else c for c in checks]
            try:
                if container:
                    stored = self._write_ova(ctx, writer, opened, source, bucket, key, record, pending)
                else:
                    stored = self._write(ctx, writer, opened[0], disk_format, bucket, key, record, pending[0])
            finally:
                conversion.release()
            reads = [c.entry(path) for c, path in zip(checks, opened, strict=True)]
        write_seconds = time.monotonic() - clock
        output = {
            "type": "s3",
            "bucket": stored.get("bucket"),
            "key": stored.get("key"),
            "sha256": stored["sha256"],
            "digest": stored.get("digest"),
            "size": stored["size"],
            "etag": stored["etag"],
            "digest_method": WHILE_WRITING,
        }
        record["output"], record["outputs"] = output, [output]
        record["sources"], record["source"] = reads, reads[0]
        record["timings"] = {
            "started": format_time(started),
            "finished": format_time(utc_now()),
            "source_seconds": round(read_seconds, 3),
            "write_seconds": round(write_seconds, 3),
        }
        return stored | {"provenance": record}

    @staticmethod
    def _write(
        ctx: StepContext,
        writer: ExportWriter,
        path: Path,
        disk_format: str,
        bucket: str,
        key: str,
        record: dict[str, Any],
        check: SourceDigestCheck | None,
    ) -> dict[str, Any]:
        return writer.write(
            path,
            disk_format=disk_format,
            bucket=bucket,
            key=key,
            workdir=ctx.workdir,
            metadata=object_metadata(record),
            on_progress=_progress(ctx),
            cancel=ctx.cancel,
            fence=ctx.fence,
            ledger=ctx,
            source_check=check,
        )

    @staticmethod
    def _write_ova(
        ctx: StepContext,
        writer: StreamingExportWriter,
        paths: list[Path],
        source: dict[str, Any],
        bucket: str,
        key: str,
        record: dict[str, Any],
        checks: list[SourceDigestCheck | None],
    ) -> dict[str, Any]:
        # the VM's firmware: what the resolver derived from the import's guest validation (an
        # instance of the controlling cloud carries none: bios)
        firmware = source.get("firmware") or "bios"
        record["firmware"] = firmware
        return writer.write_ova(
            paths,
            name=ctx.task_id,
            bucket=bucket,
            key=key,
            workdir=ctx.workdir,
            metadata=object_metadata(record),
            firmware=firmware,
            on_progress=_progress(ctx),
            cancel=ctx.cancel,
            fence=ctx.fence,
            ledger=ctx,
            source_checks=list(checks),
        )

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result:
            get_export_writer(ctx.config).remove(result["bucket"], result["key"])

    def plan(
        self,
        ctx: StepContext,
        source: dict[str, Any],
        disk_format: str,
        bucket: str,
        key: str,
        container: str = "",
    ) -> dict[str, Any]:
        return {
            "exports": source.get("id"),
            "format": container or disk_format,
            "writes": f"s3://{bucket}/{key}",
        }


def disk_sources(source: dict[str, Any]) -> list[dict[str, Any]]:
    """The disks an OVA export of ``source`` writes, each a source of its own: every EBS volume of a
    cloud instance (the resolver lists them root device first), else the one disk."""
    disks = source.get("disks") or []
    if source.get("type") != "cloud-instance" or len(disks) < 2:
        return [source]
    return [{k: v for k, v in source.items() if k != "disks"} | dict(d) for d in disks]


def _slot(index: int) -> str:
    """The checkpoint key of the cloud copy of an export's ``index``-th disk."""
    return "cloud_copy" if index == 0 else f"cloud_copy_{index}"


def _recorded_chunked(source: dict[str, Any]) -> dict[str, Any] | None:
    digest = (source.get("location") or {}).get("digest")
    if isinstance(digest, dict) and digest.get("algorithm") == ALGORITHM and digest.get("value"):
        return digest
    return None


class SourceDigestCheck:
    """The digest of one source disk, computed on the export's own read of it (the writer's reads, or
    the download of an S3-stored image: no second read) and compared with the digest its store
    recorded when the import wrote it (``Source.DigestMismatch``: a stored disk that changed since; the
    writer then leaves nothing). The record's ``sha256-chunked`` when it has one (the same chunk size),
    else its plain ``sha256`` (an image stored before the chunked digest was recorded on import);
    a source with no record (a volume, an instance of the controlling cloud) gets its
    ``sha256-chunked`` for the provenance."""

    def __init__(self, source: dict[str, Any]) -> None:
        self.source = source
        self.recorded_digest = _recorded_chunked(source)
        self.recorded_sha256 = (source.get("location") or {}).get("sha256")
        self.chunked: OffsetChunkedSha256 | None = None
        self.plain: OffsetSha256 | None = None
        if self.recorded_digest is not None or not self.recorded_sha256:
            chunk = int((self.recorded_digest or {}).get("chunk_size") or DEFAULT_CHUNK)
            self.chunked = OffsetChunkedSha256(chunk, name="export-source")
        else:
            self.plain = OffsetSha256("export-source")
        self.sha256: str | None = None
        self.digest: dict[str, Any] | None = None
        self.verified = False
        self.bytes_read = 0

    def read(self, offset: int, data: bytes) -> None:
        self.bytes_read += len(data)
        if self.chunked is not None:
            self.chunked.write(offset, data)
        elif self.plain is not None:
            self.plain.write(offset, data)

    def verify(self, size: int) -> None:
        if self.chunked is not None:
            found = self.chunked.result(size)
            self.digest = found.to_dict() if found is not None else None
        elif self.plain is not None:
            self.sha256 = self.plain.result(size)
        self.verified = True
        self._compare()

    def _compare(self) -> None:
        what = self.source.get("id")
        if self.recorded_digest is not None:
            value = (self.digest or {}).get("value")
            if value != self.recorded_digest["value"]:
                raise SourceDigestMismatch(
                    f"the stored disk of {what} has {ALGORITHM} {value}, not the "
                    f"{self.recorded_digest['value']} recorded when it was stored: it changed since; "
                    "nothing was exported"
                )
        elif self.recorded_sha256 and self.sha256 != self.recorded_sha256:
            raise SourceDigestMismatch(
                f"the stored disk of {what} has sha256 {self.sha256}, not the {self.recorded_sha256} "
                "recorded when it was stored: it changed since; nothing was exported"
            )

    def output_stands_for_source(self, chunk_size: int) -> bool:
        """A RAW export's output is the source's bytes: its ``sha256-chunked`` is the source's when the
        recorded one has the same chunk size (the source is then hashed once, as the output)."""
        recorded = self.recorded_digest
        return recorded is not None and int(recorded.get("chunk_size") or 0) == chunk_size

    def verify_output(self, digest: Mapping[str, Any], size: int) -> bool:
        """Check the RAW output's chunked ``digest`` as the source's (False: not of the recorded chunk
        size, nothing checked)."""
        recorded = self.recorded_digest or {}
        if int(digest.get("chunk_size") or 0) != int(recorded.get("chunk_size") or -1):
            return False
        keep = ("algorithm", "value", "chunk_size", "chunks", "s3_checksum_sha256")
        self.digest = {k: digest[k] for k in keep if k in digest}
        self.bytes_read = size
        self.verified = True
        if self.chunked is not None:
            self.chunked.close()
            self.chunked = None
        self._compare()
        return True

    def entry(self, path: Path) -> dict[str, Any]:
        """The provenance of the source disk: what was computed (once verified), else what its store
        recorded (the record's metadata goes up with the upload's start, before the disk is read)."""
        checked: list[dict[str, Any]] = []
        if self.recorded_digest is not None:
            checked.append({"what": "recorded-sha256-chunked", "value": self.recorded_digest["value"]})
        elif self.recorded_sha256:
            checked.append({"what": "recorded-sha256", "value": self.recorded_sha256})
        source = self.source
        read: dict[str, Any] = {
            "id": source.get("id"),
            "task_id": source.get("task_id"),
            "type": source.get("type"),
            "sha256": self.sha256 if self.verified else self.recorded_sha256,
            "digest": self.digest if self.verified else self.recorded_digest,
            "recorded_sha256": self.recorded_sha256,
            "size": _size(path),
            # the stored disk's digest, recorded by the import that wrote it, checked on the export's read
            "checked": checked,
        }
        if self.recorded_digest is not None:
            read["recorded_digest"] = self.recorded_digest
        if source.get("type") == "cloud-instance":
            read |= {"volume_id": source.get("volume_id"), "device_name": source.get("device_name")}
        return read

    def close(self) -> None:
        if self.chunked is not None:
            self.chunked.close()
        if self.plain is not None:
            self.plain.close()


def _progress(ctx: StepContext) -> Callable[[Progress], None]:
    """One percentage over converting (first half) and uploading (second half); a RAW upload without
    conversion is the whole range."""
    converted = False

    def report(p: Progress) -> None:
        nonlocal converted
        percent = p.percent or 0.0
        if p.phase == "converting":
            converted = True
            overall = percent / 2
        else:
            overall = 50 + percent / 2 if converted else percent
        ctx.progress(
            {
                "phase": p.phase,
                "done": p.done,
                "total": p.total,
                "percent": overall,
                "rate": p.rate,
                "eta": p.eta,
                **({"converted": p.done} if p.phase == "uploading" else {}),
            }
        )

    return report


class Readable:
    """Context manager: the path of the source, readable until exit (see the module docstring;
    ``bundle.write`` reads its source through it too)."""

    @staticmethod
    def remove_leftovers(ctx: StepContext, checkpoint: dict[str, Any]) -> None:
        """Remove what a killed run of the step left (cloud volume copies and their snapshots)."""
        records = [v for k, v in checkpoint.items() if k.startswith("cloud_copy") and v]
        for record in records:
            CloudDiskCopy(ctx.config.targets["volume"]).remove(record)
        if records:
            ctx.save_checkpoint({})

    def __init__(
        self,
        ctx: StepContext,
        source: dict[str, Any],
        *,
        slot: str = "cloud_copy",
        state: dict[str, Any] | None = None,
        check: SourceDigestCheck | None = None,
    ) -> None:
        """``slot``: the key of this source's cloud copy in the step's checkpoint ``state`` (shared by
        the readables of one step, which saves it whole); ``check``: fed and verified by the download
        of an S3-stored image (any other source is read in place by the writer, which feeds it)."""
        self.ctx = ctx
        self.source = source
        self.check = check
        self.slot = slot
        self.state: dict[str, Any] = {} if state is None else state
        self._cleanup: list[Callable[[], None]] = []

    def __enter__(self) -> Path:
        try:
            return self._open()
        except BaseException:
            self._close()
            raise

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        # every clean-up runs (a failed detach must not keep the snapshot); the first error is raised
        failed: BaseException | None = None
        while self._cleanup:
            try:
                self._cleanup.pop()()
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def _open(self) -> Path:
        ctx, source = self.ctx, self.source
        kind = source["type"]
        if kind == "image":
            location = source["location"]
            if location.get("type") == "s3":
                check = self.check if self.check is not None else SourceDigestCheck(source)
                path, allowance = _download(ctx, location, check)
                self._cleanup.append(allowance.release)
                self._cleanup.append(lambda: _drop(ctx, path))
                return path
            return Path(location["path"])
        if kind == "volume":
            volume = source["volume"]
            if volume.get("type") == "ec2":
                target = get_volume_target(ctx.config)
                if not isinstance(target, Ec2VolumeTarget):
                    raise ImagingError(
                        f"{source.get('id')} is an EC2 volume but the volume target is not ec2",
                        "NotExportable",
                    )
                attached = target.adopt(str(volume["volume_id"]), ctx.task_id)
                self._cleanup.append(lambda: target.release(attached.info))
                return attached.path
            return Path(volume["path"])
        if kind == "cloud-instance":
            copy = CloudDiskCopy(ctx.config.targets["volume"])
            record: dict[str, Any] = {}
            self.state[self.slot] = record
            ctx.save_checkpoint(self.state)

            def remove() -> None:
                copy.remove(record)
                self.state.pop(self.slot, None)
                ctx.save_checkpoint(self.state)

            self._cleanup.append(remove)
            attached = copy.create(ctx.task_id, str(source["volume_id"]), record, ctx.cancel)
            ctx.save_checkpoint(self.state)
            return attached.path
        raise ImagingError(f"cannot export a source of type {kind!r}", "NotExportable")


def _drop(ctx: StepContext, path: Path) -> None:
    if path.exists():
        path.unlink()
        ctx.ledger_removed(path)


def _streams_vhd(path: Path) -> bool:
    """Whether a VHD export of ``path`` streams with no scratch copy (see ``streams_vhd``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return streams_vhd(fd, os.lseek(fd, 0, os.SEEK_END))
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    """Bytes of a regular file or a block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
