"""The JSON schema of a workflow file (a data file, ``appliance/schemas/workflow.json``), and errors
that name file, step and field.

Structural checks live here (unknown keys, wrong types); checks that need more than one key or
other files (exactly one of ``action``/``include``, include cycles, template names, action
argument schemas) are made by :mod:`appliance.workflow.loader` and reported the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema

from .. import schemas
from ..errors import WorkflowInvalid

#: the JSON schema of a workflow file (``appliance/schemas/workflow.json``)
WORKFLOW_SCHEMA: dict[str, Any] = schemas.load("workflow")

_VALIDATOR = schemas.validator("workflow")


@dataclass(frozen=True)
class WorkflowError:
    """One problem in a workflow file: where it is (file, step, field) and what is wrong."""

    file: str
    message: str
    step: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.step:
            where.append(self.step)
        if self.field:
            where.append(self.field)
        return ": ".join([*where, self.message])


def step_label(index: int, name: Any) -> str:
    """How errors name a step: ``step 'convert' (#3)`` (1-based, as a reader counts)."""
    return f"step {name!r} (#{index})" if isinstance(name, str) else f"step #{index}"


def invalid(errors: Sequence[WorkflowError]) -> WorkflowInvalid:
    """One :class:`WorkflowInvalid` carrying every error (``.errors``); the message lists them."""
    exc = WorkflowInvalid("\n".join(str(e) for e in errors) or "invalid workflow")
    exc.errors = list(errors)  # type: ignore[attr-defined]
    return exc


def _field_path(parts: Sequence[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _locate(data: Any, path: Sequence[Any]) -> tuple[str | None, list[Any]]:
    """Split a schema error path into the step it is in (label) and the field inside it."""
    if len(path) >= 2 and path[0] == "steps" and isinstance(path[1], int):
        steps = data.get("steps") if isinstance(data, dict) else None
        name = None
        if isinstance(steps, list) and path[1] < len(steps) and isinstance(steps[path[1]], dict):
            name = steps[path[1]].get("name")
        return step_label(path[1] + 1, name), list(path[2:])
    return None, list(path)


def schema_errors(data: Any, file: str) -> list[WorkflowError]:
    """Every structural error of a parsed workflow document, in document order."""
    errors = []

    # Document order: step 10 after step 2 (paths mix ints and strings, so compare typed pairs).
    def order(e: jsonschema.ValidationError) -> list[tuple[int, int | str]]:
        return [(0, p) if isinstance(p, int) else (1, p) for p in e.absolute_path]

    for e in sorted(_VALIDATOR.iter_errors(data), key=order):
        step, field = _locate(data, list(e.absolute_path))
        message = e.message
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            allowed = set(e.schema.get("properties", {}))
            for key in sorted(k for k in e.instance if k not in allowed):
                errors.append(
                    WorkflowError(
                        file,
                        f"unknown key (allowed: {', '.join(sorted(allowed))})",
                        step,
                        _field_path([*field, key]),
                    )
                )
            continue
        if e.validator == "required":
            message = e.message.replace("is a required property", "is required")
        elif e.validator == "oneOf" and field and field[-1] == "loop":
            message = "must be a list or a template expression ('{{ ... }}') yielding a list"
        elif e.validator == "pattern" and field and field[-1] == "register":
            message = f"{e.instance!r} is not a valid name (letters, digits, '_'; not starting with a digit)"
        errors.append(WorkflowError(file, message, step, _field_path(field) or None))
    return errors
