"""The ``image.store`` step: a converted disk stored with the image target (a file directory or an
S3 bucket), server-side encrypted when asked, an S3 object carrying the import's provenance as its
user metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..progress import Progress
from ..targets import get_image_target
from ..targets.encryption import requested
from ..workflow.step import Step, StepContext
from .imports import DISK_NAME
from .provenance import import_metadata


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
            "source_sha256": {"type": ["string", "null"]},
            "name": DISK_NAME,
        },
    }

    def run(
        self,
        ctx: StepContext,
        path: str,
        format: str,
        encrypted: bool = False,
        kms_key_id: str | None = None,
        source_sha256: str | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        encryption = requested(encrypted, kms_key_id)
        # an S3 object carries its provenance as user metadata (what is known when the upload starts)
        extra: dict[str, Any] = {}
        if ctx.config.targets["image"].get("type") == "s3":
            extra["metadata"] = import_metadata(ctx, source_sha256)

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
            f"{ctx.task_id}-{name}" if name else ctx.task_id,  # a data disk of an image: its own name
            Path(path),
            format=format,
            on_progress=on_progress,
            cancel=ctx.cancel,
            ledger=ctx,
            encryption=encryption,
            fence=ctx.fence,  # a run that lost the task to another worker publishes nothing
            **extra,
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
        source_sha256: str | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        encryption = requested(encrypted, kms_key_id)
        return {
            "stores": path,
            "target": ctx.config.targets["image"]["type"],
            "encryption": encryption.to_dict() if encryption else None,
            "scratch_bytes": 0,
        }
