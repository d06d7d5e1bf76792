"""``ova.convert``: every disk of an untrusted OVA, verified and inspected, converted (boot disk first).

Wraps :func:`appliance.image.ova.convert_ova`: the package is unpacked into the task's scratch directory
(removed again when the step ends), each disk converted to the target format at the target name (the boot
disk) or beside it (``-disk2``, ``-disk3``, …); every output is in the cleanup ledger and removed by
``undo``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..image.formats import OUTPUT_FORMATS
from ..image.ova import convert_ova, output_names
from ..workflow.step import Step, StepContext


class OvaConvertStep(Step):
    """Unpack, verify and inspect an OVA, then convert each of its disks."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source", "target", "format"],
        "properties": {
            "source": {"type": "string", "minLength": 1},
            "target": {"type": "string", "minLength": 1},
            "format": {"enum": list(OUTPUT_FORMATS)},
            "subformat": {"oneOf": [{"type": "null"}, {"enum": ["dynamic", "fixed"]}]},
        },
    }

    def run(
        self, ctx: StepContext, source: str, target: str, format: str, subformat: str | None = None
    ) -> dict[str, Any]:
        result = convert_ova(
            Path(source),
            Path(target),
            format,
            config=ctx.config,
            workdir=ctx.workdir,
            subformat=subformat,
            on_progress=ctx.progress,
            cancel=ctx.cancel,
            ledger=ctx,
        )
        for out in result.outputs:
            ctx.ledger_created(out.dst)
        return {**result.to_dict(), "outputs": [str(o.dst) for o in result.outputs]}

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        for path in (result or {}).get("outputs", []):
            if Path(path).exists():
                Path(path).unlink()
                ctx.ledger_removed(path)

    def plan(
        self, ctx: StepContext, source: str, target: str, format: str, subformat: str | None = None
    ) -> dict[str, Any]:
        return {
            "source": source,
            "target": target,
            "format": format,
            "scratch_bytes": Path(source).stat().st_size if Path(source).is_file() else 0,
            "writes": str(output_names(Path(target), 1)[0]),
        }
