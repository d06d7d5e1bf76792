"""Provenance of a task: what ran, with which tools, on which input, producing which output.

:func:`provenance` builds the record an export keeps in its result (shown on ``/v1/tasks/{id}``)
and, flattened by :func:`object_metadata`, as the exported object's user metadata
(``x-amz-meta-*``): the source's digest (sha256 computed while reading it, and the digest its
store recorded when it was written, checked), the tool versions (appliance, qemu-img), the
digests of the workflow file and of the hook set the task runs with, the output's digest and the
timings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..image.qemuimg import availability
from ..workflow.hookpoints import HOOKS_RECORD
from ..workflow.loader import WorkflowLoader
from ..workflow.step import StepContext


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tool_versions() -> dict[str, str | None]:
    """``{appliance, qemu-img}`` versions (qemu-img's first ``--version`` line, None when absent)."""
    return {"appliance": __version__, "qemu-img": availability()[1]}


def workflow_digests(ctx: StepContext) -> dict[str, Any]:
    """``{workflow, workflow_sha256, hooks_sha256}`` of the task ``ctx`` runs in: the sha256 of the
    workflow file it was submitted with, and of the hook set recorded on it (canonical JSON; the
    digest of ``{}`` when it runs none)."""
    out: dict[str, Any] = {"workflow": None, "workflow_sha256": None, "hooks_sha256": None}
    if ctx.store is None:
        return out
    task = ctx.store.get_task(ctx.task_id)
    out["workflow"] = task.workflow
    if task.workflow:
        try:
            path = WorkflowLoader(ctx.config.workflow_dirs).resolve(task.workflow)
            out["workflow_sha256"] = _file_digest(path)
        except Exception:  # an artifact no longer in the cache: the digest stays unknown
            out["workflow_sha256"] = None
    hooks = ctx.store.record(ctx.task_id, HOOKS_RECORD) or {}
    out["hooks_sha256"] = hashlib.sha256(json.dumps(hooks, sort_keys=True).encode()).hexdigest()
    return out


def object_metadata(record: dict[str, Any]) -> dict[str, str]:
    """The S3 user metadata of an export's provenance (ASCII values, well under S3's 2 KiB)."""
    source = record.get("source") or {}
    tools = record.get("tools") or {}
    meta = {
        "export-task-id": record.get("task_id"),
        "source-id": source.get("id"),
        "source-sha256": source.get("sha256"),
        "appliance-version": tools.get("appliance"),
        "qemu-img-version": tools.get("qemu-img"),
        "workflow-sha256": (record.get("workflow") or {}).get("workflow_sha256"),
        "hooks-sha256": (record.get("workflow") or {}).get("hooks_sha256"),
    }
    return {k: str(v).encode("ascii", "replace").decode()[:256] for k, v in meta.items() if v}
