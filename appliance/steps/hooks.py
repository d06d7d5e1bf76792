"""Shipped hook actions: ``hook.decompress`` and ``hook.policy``.

Hooks follow the hook step interface of :mod:`appliance.hooks`: they get ``image`` (plus their
configured arguments) and return ``{"image": IMAGE}`` or None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..hooks import IMAGE_SCHEMA
from ..hooks.policy import RULES_SCHEMA, check_policy
from ..image.decompress import detect_compression
from ..image.formats import parse_claim
from ..workflow.step import Step, StepContext
from .image import _plan_scratch, _remove, decompress_into_scratch


def _base_format(fmt: str | None) -> str | None:
    """``qcow2.gz`` → ``qcow2``: the claim without its compression suffix (unknown names kept)."""
    if not fmt or "." not in fmt:
        return fmt
    try:
        return parse_claim(fmt)[0]
    except Exception:
        return fmt.split(".", 1)[0]


class DecompressHook(Step):
    """Decompress a gzip/xz/zstd/bzip2 image into scratch (capped like ``image.decompress``).

    An uncompressed image passes unchanged. The decompressed file is in the cleanup ledger and
    removed by undo.
    """

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["image"],
        "properties": {"image": IMAGE_SCHEMA},
    }

    def run(self, ctx: StepContext, image: dict[str, Any]) -> dict[str, Any] | None:
        src = Path(image["path"])
        kind = detect_compression(src)
        if kind is None:
            return None
        # A name of our own: the input may itself be in scratch, under any name. What is there already is
        # the output of an attempt of this hook that was interrupted before it ended.
        dst = ctx.workdir / f"hook-{ctx.idx.replace('/', '-')}-decompressed"
        dst.unlink(missing_ok=True)
        written = decompress_into_scratch(ctx, src, kind, dst)
        ctx.event("hook.decompressed", source=str(src), compression=kind, bytes=written)
        return {
            "image": {**image, "path": str(dst), "format": _base_format(image.get("format"))},
            "compression": kind,
            "bytes": written,
        }

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any] | None) -> None:
        if result and result.get("compression"):
            _remove(ctx, result["image"]["path"])

    def plan(self, ctx: StepContext, image: dict[str, Any]) -> dict[str, Any]:
        return {"decompresses": image["path"], "scratch_bytes": _plan_scratch(Path(image["path"]), ctx)}


class PolicyHook(Step):
    """Reject the import when the image breaks a rule (format, virtual size, guest OS, findings).

    See :mod:`appliance.hooks.policy` for the rules and the ``Policy.*`` codes.
    """

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["image"],
        "properties": {"image": IMAGE_SCHEMA, **RULES_SCHEMA},
    }

    def run(self, ctx: StepContext, image: dict[str, Any], **rules: Any) -> dict[str, Any]:
        task_findings = ctx.store.get_task(ctx.task_id).findings if ctx.store is not None else []
        checked = check_policy(image, rules, findings=task_findings)
        ctx.event("hook.policy", passed=checked)
        return {"image": image, "passed": checked}

    def plan(self, ctx: StepContext, image: dict[str, Any], **rules: Any) -> dict[str, Any]:
        return {"rules": sorted(rules), "scratch_bytes": 0}
