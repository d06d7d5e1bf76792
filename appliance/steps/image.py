"""Image steps: ``image.inspect``, ``image.decompress`` and ``image.convert``.

They wrap :mod:`appliance.image.inspect`, :mod:`appliance.image.decompress` and
:mod:`appliance.image.convert` for workflows: intermediates go to the task's scratch directory under
a reservation that grows with them (:class:`appliance.allowance.Allowance`), progress and findings go
to the task, and every file a step creates is in the cleanup ledger (partial outputs before they
exist) and removed by its ``undo``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..allowance import Allowance
from ..errors import ImageRejected
from ..image.convert import convert_image
from ..image.decompress import decompress, detect_compression
from ..image.formats import OUTPUT_FORMATS, parse_claim
from ..image.inspect import inspect_image
from ..workflow.step import Step, StepContext
from .meters import convert_meter, scaled

#: dry-run estimate of how much a compressed disk image grows when decompressed (raw disks are
#: mostly zeros and text; measured 1.8x for the benchmark disk, far more for sparse ones)
DECOMPRESSION_RATIO_ESTIMATE = 4

_CLAIM = {"type": ["string", "null"]}


def _decompression_allowance(ctx: StepContext, src: Path) -> Allowance:
    """A scratch reservation for decompressing ``src``, grown as the output is written (the output's
    size is not known before); the decompressor's own cap is ``limits.max_decompressed_size``."""
    return Allowance(ctx.scratch, f"decompressing {src.name}")


def _settle(allowance: Allowance, path: Path | None) -> None:
    """Keep what the output really occupies reserved (nothing when there is no output)."""
    allowance.shrink_to(os.stat(path).st_blocks * 512 if path is not None and path.exists() else 0)


def decompress_into_scratch(ctx: StepContext, src: Path, kind: str, dst: Path) -> int:
    """Decompress ``src`` (``kind``) to ``dst`` in the task's scratch under a reservation that grows with
    the output and shrinks to what was written; ``dst`` goes into the cleanup ledger. Returns the bytes
    written."""
    allowance = _decompression_allowance(ctx, src)
    ctx.ledger_created(dst)
    try:
        written = decompress(
            src,
            dst,
            kind,
            ctx.config.limits.max_decompressed_size,
            reserve=allowance.cover,
            cancel=ctx.cancel,
            on_progress=lambda n: ctx.progress({"phase": "decompressing", "done": n}),
            ledger=ctx,
            limits=ctx.config.limits,
        )
    except BaseException:
        allowance.release()
        raise
    _settle(allowance, dst)
    return written


def _remove(ctx: StepContext, path: str | None) -> None:
    if path and Path(path).exists():
        Path(path).unlink()
        ctx.ledger_removed(path)


def _plan_scratch(src: Path, ctx: StepContext) -> int:
    """Scratch a compressed ``src`` would need: an estimate, capped like the real run."""
    if not src.is_file() or detect_compression(src) is None:
        return 0
    return min(src.stat().st_size * DECOMPRESSION_RATIO_ESTIMATE, ctx.config.limits.max_decompressed_size)


class InspectStep(Step):
    """Inspect an untrusted image (decompressing it into scratch first if compressed).

    Result: the inspection (``format``, ``virtual_size``, ``path`` of the inspected file, …).
    An unsafe image fails the step with the first finding's code; all findings are kept on the task.
    """

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {"source": {"type": "string", "minLength": 1}, "format": _CLAIM},
    }

    def run(self, ctx: StepContext, source: str, format: str | None = None) -> dict[str, Any]:
        src = Path(source)
        allowance = None
        # One name per step: an attempt of it that was interrupted after its decompressed copy was complete
        # (and before the step was) left that copy there; it goes before this attempt decompresses again.
        decompressed = ctx.workdir / f"decompressed-{ctx.idx.replace('/', '-')}"
        decompressed.unlink(missing_ok=True)
        if src.is_file() and detect_compression(src) is not None:
            allowance = _decompression_allowance(ctx, src)
        try:
            result = inspect_image(
                src,
                format or None,
                config=ctx.config,
                workdir=ctx.workdir,
                reserve=allowance.cover if allowance is not None else None,
                cancel=ctx.cancel,
                ledger=ctx,
                decompress_to=decompressed,
            )
        except BaseException:
            if allowance is not None:
                allowance.release()
            raise
        if result.path != result.source:
            ctx.ledger_created(result.path)
        if allowance is not None:
            _settle(allowance, Path(result.path) if result.path != result.source else None)
        ctx.event("findings", findings=[f.to_dict() for f in result.findings])
        if ctx.store is not None:
            ctx.store.add_findings(ctx.task_id, result.findings)
        if not result.safe:
            raise ImageRejected(result.findings)
        return result.to_dict()

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result and result.get("path") != args.get("source"):
            _remove(ctx, result.get("path"))

    def plan(self, ctx: StepContext, source: str, format: str | None = None) -> dict[str, Any]:
        if format:
            parse_claim(format)
        return {"source": source, "format": format, "scratch_bytes": _plan_scratch(Path(source), ctx)}


class DecompressStep(Step):
    """Decompress a gzip/xz/zstd/bzip2 file into scratch, capped by the scratch quota and the limits."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {"source": {"type": "string", "minLength": 1}},
    }

    def run(self, ctx: StepContext, source: str) -> dict[str, Any]:
        src = Path(source)
        kind = detect_compression(src)
        if kind is None:
            return {"path": source, "compression": None, "bytes": src.stat().st_size}
        dst = ctx.workdir / (src.name.rsplit(".", 1)[0] or "image")
        written = decompress_into_scratch(ctx, src, kind, dst)
        return {"path": str(dst), "compression": kind, "bytes": written}

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result and result.get("compression"):
            _remove(ctx, result.get("path"))

    def plan(self, ctx: StepContext, source: str) -> dict[str, Any]:
        return {"source": source, "scratch_bytes": _plan_scratch(Path(source), ctx)}


class ConvertStep(Step):
    """Inspect, convert with qemu-img and verify; ``target`` is a file (atomic) or a block device."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source", "target", "format"],
        "properties": {
            "source": {"type": "string", "minLength": 1},
            "target": {"type": "string", "minLength": 1},
            "format": {"enum": list(OUTPUT_FORMATS)},
            "claimed": {"oneOf": [{"type": "null"}, {"type": "string"}]},
            "subformat": {"oneOf": [{"type": "null"}, {"enum": ["dynamic", "fixed"]}]},
        },
    }

    def run(
        self,
        ctx: StepContext,
        source: str,
        target: str,
        format: str,
        claimed: str | None = None,
        subformat: str | None = None,
    ) -> dict[str, Any]:
        src = Path(source)
        allowance = None
        if src.is_file() and detect_compression(src) is not None:
            allowance = _decompression_allowance(ctx, src)
        # bytes read and written, rate and ETA; 100 % only once the output is durable
        meter, on_convert = convert_meter(
            scaled(ctx.progress, None, converted=False), src.stat().st_size if src.is_file() else None
        )
        with meter:
            result = convert_image(
                Path(source),
                Path(target),
                format,
                claimed or None,
                config=ctx.config,
                workdir=ctx.workdir,
                subformat=subformat,
                on_progress=on_convert,
                cancel=ctx.cancel,
                ledger=ctx,
                reserve=allowance.cover if allowance is not None else None,
            )
        meter.flushed()  # convert_image returns once the output is fsynced
        if allowance is not None:  # the decompressed copy was removed after the conversion
            allowance.release()
        if not result.block_device:
            ctx.ledger_created(result.dst)
        return result.to_dict()

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result and not result.get("block_device"):
            _remove(ctx, result.get("dst"))

    def plan(
        self,
        ctx: StepContext,
        source: str,
        target: str,
        format: str,
        claimed: str | None = None,
        subformat: str | None = None,
    ) -> dict[str, Any]:
        parse_claim(claimed)  # a bad claim fails the plan the way it would fail the run
        return {
            "source": source,
            "target": target,
            "format": format,
            "subformat": subformat,
            "scratch_bytes": 0,
            "writes": target,
        }
