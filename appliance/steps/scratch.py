"""``scratch.reserve``: reserve scratch space for later steps (released by undo or at task end)."""

from __future__ import annotations

from typing import Any

from ..config import parse_size
from ..workflow.step import Step, StepContext


class ReserveStep(Step):
    """Reserve ``bytes`` (an integer or a size like ``2GiB``) of the task's scratch quota.

    Fails with ``InsufficientScratch`` before anything is written when the quota or the disk
    cannot take it. The reservation ends with the task (its scratch directory is removed) or
    when the step is undone.
    """

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["bytes"],
        "properties": {
            "bytes": {
                "oneOf": [
                    {"type": "integer", "minimum": 0},
                    {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([KMGTPkmgtp]i?)?[Bb]?\s*$"},
                ]
            },
            "purpose": {"type": "string"},
        },
    }

    def run(self, ctx: StepContext, bytes: int | str, purpose: str | None = None) -> Any:
        nbytes = parse_size(bytes)
        reservation = ctx.scratch.reserve(nbytes, purpose or f"step {ctx.name!r}")
        return {"reservation": reservation, "bytes": nbytes, "path": str(ctx.scratch.path)}

    def undo(self, ctx: StepContext, args: dict[str, Any], result: Any) -> None:
        ctx.scratch.release(result["reservation"])

    def plan(self, ctx: StepContext, bytes: int | str, purpose: str | None = None) -> dict[str, Any]:
        return {"scratch_bytes": parse_size(bytes), "purpose": purpose}
