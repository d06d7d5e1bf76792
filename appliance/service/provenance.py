"""Where a task keeps its provenance record (:mod:`appliance.steps.provenance`): an import registers
it as ``provenance`` (at the top of its result, or inside an included workflow's, e.g.
``imported.provenance`` of ImportInstance), an export inside ``exported``. Read by the admin API
(``/v1/tasks/{id}``) and the controller reports."""

from __future__ import annotations

from typing import Any

from ..store import Task

#: how deep :func:`provenance_of` looks into the registered results
_DEPTH = 3


def provenance_of(task: Task) -> dict[str, Any] | None:
    """The task's provenance record, or None (not recorded yet, or a workflow that records none): the
    shallowest dict member named ``provenance`` that has ``tools`` and ``workflow``."""
    level = [task.result] if isinstance(task.result, dict) else []
    for _ in range(_DEPTH):
        for node in level:
            found = node.get("provenance")
            if isinstance(found, dict) and {"tools", "workflow"} <= found.keys():
                return found
        level = [v for node in level for v in node.values() if isinstance(v, dict)]
    return None
