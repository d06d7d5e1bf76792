"""The copy step, ``copy.image``: a resolved stored image (:mod:`appliance.service.resolver`) copied to a
destination (:mod:`appliance.targets.copy`, which moves and checks the bytes).

The copy is named after the task (``<prefix><task id>.<ext>``). A run that resumes a task whose worker
was killed mid-copy first removes what that run left (the object and every incomplete multipart upload
of its key, or the file); a partial file is in the task's cleanup ledger anyway. Progress: ``copying``
(bytes copied of the image's size, rate, eta; a server-side copy first reports ``verifying source``).

The result (``copied``) holds the new location (recorded on the image: the resolver lists it among the
image's ``locations``), its sha256 and size, the sha256 of what was read with the one recorded when the
image was stored, how the bytes moved (``stream`` or ``server-side``), and the provenance (tools,
workflow digests, timings), which an object copy also carries as user metadata.
"""

from __future__ import annotations

import time
from typing import Any

from ..progress import Progress
from ..targets.copy import copy_stored, describe_destination, destination_of, remove_copy
from ..timestamps import format_time, utc_now
from ..workflow.step import Step, StepContext
from .provenance import build_record, tool_versions


class CopyImageStep(Step):
    """Copy the stored image ``source`` to ``destination`` (see the module docstring)."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source", "destination"],
        "properties": {
            "source": {"type": "object", "required": ["type", "location"]},
            "destination": {"type": "object", "required": ["type"]},
            "server_side": {"type": "boolean"},
        },
    }

    def run(
        self,
        ctx: StepContext,
        source: dict[str, Any],
        destination: dict[str, Any],
        server_side: bool = True,
    ) -> dict[str, Any]:
        started = utc_now()
        location = source["location"]
        fmt = str(location.get("format") or "raw")
        # a run killed mid-copy left an object, an incomplete multipart upload or a file: gone first
        remove_copy(ctx.config, destination_of(destination, ctx.task_id, fmt))

        def report(p: Progress) -> None:
            # copying: bytes written to the destination (for S3, parts uploaded); verifying: bytes read
            moved = {"written": p.done, "converted": p.done} if p.phase == "copying" else {"read": p.done}
            ctx.progress(
                {
                    "phase": p.phase,
                    "done": p.done,
                    "total": p.total,
                    "percent": p.percent,
                    "rate": p.rate,
                    "eta": p.eta,
                    **moved,
                }
            )

        source_entry: dict[str, Any] = {
            "id": source.get("id"),
            "task_id": source.get("task_id"),
            "recorded_sha256": location.get("sha256"),
        }
        if isinstance(location.get("digest"), dict):  # checked on the copy's read (sha256-chunked)
            source_entry["recorded_digest"] = location["digest"]
        tools = tool_versions()
        clock = time.monotonic()
        copied = copy_stored(
            ctx.config,
            location,
            destination,
            ctx.task_id,
            metadata={
                k: str(v)
                for k, v in (
                    ("copy-task-id", ctx.task_id),
                    ("source-id", source.get("id")),
                    ("source-sha256", location.get("sha256")),
                    ("appliance-version", tools.get("appliance")),
                )
                if v
            },
            on_progress=report,
            cancel=ctx.cancel,
            fence=ctx.fence,
            ledger=ctx,
            server_side=server_side,
        )
        source_entry["sha256"] = copied["source_sha256"]
        # one record shape for imports, exports and copies (sources/outputs per disk)
        record = build_record(
            ctx,
            "copy",
            [source_entry],
            [{"sha256": copied["sha256"], "size": copied["size"]}],
            timings={
                "started": format_time(started),
                "finished": format_time(utc_now()),
                "seconds": round(time.monotonic() - clock, 3),
            },
        )
        return {
            "image_id": source.get("id"),
            "from": location,
            "to": describe_destination(destination),
            **copied,
            "provenance": record,
        }

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result and result.get("location"):
            remove_copy(ctx.config, result["location"])

    def plan(
        self,
        ctx: StepContext,
        source: dict[str, Any],
        destination: dict[str, Any],
        server_side: bool = True,
    ) -> dict[str, Any]:
        return {
            "copies": source.get("id"),
            "from": source.get("location"),
            "writes": describe_destination(destination),
        }
