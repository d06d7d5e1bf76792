"""Operator hooks: steps the configuration inserts at named points of the import workflows.

A workflow marks an insertion point with a step ``hooks: POINT`` (``after_fetch``, ``after_inspect``,
``after_convert``, ``before_write``) whose ``with: {image: IMAGE}`` names the image at that point.
The configuration (``hooks.points``) lists the hooks each point runs, in order; the engine runs
them as ordinary recorded steps (``<idx>/hook/<n>``), so undo, the cleanup ledger, retries,
timeouts, dry-run plans and resume work for them as for any step.

THE HOOK STEP INTERFACE: a hook action gets ``image`` = :data:`IMAGE_SCHEMA` (``path``, ``format``
and the facts known at the point: ``virtual_size``, ``inspection``, ``guest``, ...) plus the hook's
configured ``with`` arguments. It returns ``{"image": IMAGE}`` (a new path or format, more facts)
or None (unchanged); the next hook gets that image. The point registers
``{"image": final IMAGE, "hooks": [hook names]}``. A hook fails the task by raising an
:class:`~appliance.errors.ImagingError` with its own code.

Modules: :mod:`.plugins` (operator step modules from ``hooks.plugins_dir``), :mod:`.policy`
(the rules of ``hook.policy``); the shipped hook actions live in :mod:`appliance.steps.hooks`.
"""

from __future__ import annotations

from typing import Any

from ..config import HOOK_POINTS

#: jsonschema of the ``image`` every hook action receives (hooks put it in their own ``schema``)
IMAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1},
        # null only where nothing has looked at the content yet (after_fetch without a claimed format)
        "format": {"type": ["string", "null"]},
        "virtual_size": {"type": ["integer", "null"], "minimum": 0},
        "inspection": {"type": ["object", "null"]},
        "guest": {"type": ["object", "null"]},
    },
}

__all__ = ["HOOK_POINTS", "IMAGE_SCHEMA"]
