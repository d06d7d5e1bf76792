"""The export step, ``export.write``: a resolved source disk (:mod:`appliance.service.resolver`)
written as an exported object through the export writer (:mod:`appliance.targets.export`).

The source is made readable first (:mod:`.export_source`: read in place, downloaded from S3 into
scratch, an EC2 volume attached, a cloud instance's volume copied and attached) and read once, its
digest checked on that read against the one recorded when it was stored (:mod:`.export_check`).
A VHD of a block device, which qemu-img reads, is the one case read twice (once for the check,
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..allowance import Allowance
from ..progress import Progress
from ..targets.export import ExportWriter, get_export_writer, ova_scratch_needed, scratch_needed
from ..targets.exportvhd import streams_vhd
from ..targets.exportwriter import StreamingExportWriter
from ..targets.rawio import disk_size
from ..timestamps import format_time, utc_now
from ..workflow.step import Step, StepContext
from .export_check import SourceDigestCheck
from .export_source import Readable
from .provenance import WHILE_WRITING, build_record, object_metadata


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
            sizes = [disk_size(path) for path in opened]
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
        # and its OS, which an OVA import checks against the boot disk (an image: what validation
        # found; an instance: the cloud's Platform); an export from before sources recorded it: linux
        platform = source.get("platform") or "linux"
        return writer.write_ova(
            paths,
            name=ctx.task_id,
            bucket=bucket,
            key=key,
            workdir=ctx.workdir,
            metadata=object_metadata(record),
            firmware=firmware,
            platform=platform,
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


def _streams_vhd(path: Path) -> bool:
    """Whether a VHD export of ``path`` streams with no scratch copy (see ``streams_vhd``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return streams_vhd(fd, os.lseek(fd, 0, os.SEEK_END))
    finally:
        os.close(fd)
