"""The workflow data model: a loaded workflow, its parameters and its steps.

Plain frozen dataclasses with no behaviour beyond describing themselves and checking parameters, so
that every part of the engine (runner, planner, hook points) and the artifact resources can use the
types without importing the loader.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts.refs import ResourceSpec
from ..errors import UsageError
from .schema import step_label

_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
}

MISSING = object()


@dataclass(frozen=True)
class ParamSpec:
    """A declared workflow parameter."""

    name: str
    type: str
    description: str = ""
    required: bool = False
    default: Any = MISSING

    @property
    def has_default(self) -> bool:
        return self.default is not MISSING

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "required": self.required, "description": self.description}
        if self.has_default:
            d["default"] = self.default
        return d


@dataclass(frozen=True)
class StepSpec:
    """One step as written in a workflow file (templates not yet rendered)."""

    index: int  # 1-based position in its workflow
    name: str
    action: str | None = None
    include: Workflow | None = None
    include_ref: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    when: str | bool | None = None
    register: str | None = None
    loop: list[Any] | str | None = None
    timeout: float | None = None
    retries: int = 0
    retry_delay: float = 0.0
    undo: bool = True
    description: str = ""
    #: an insertion point (``hooks: after_fetch``) and the configured hooks it runs
    hooks: str | None = None
    hook_steps: tuple[StepSpec, ...] = ()

    @property
    def label(self) -> str:
        return step_label(self.index, self.name)

    def to_dict(self) -> dict[str, Any]:
        """The step as loaded: what it runs (action, include, or a hook point with its hooks)."""
        d: dict[str, Any] = {"index": self.index, "name": self.name}
        if self.action:
            d["action"] = self.action
        if self.include is not None:
            d["include"] = self.include_ref or self.include.name
        if self.hooks:
            d["hooks"] = self.hooks
            d["hook_steps"] = [h.to_dict() for h in self.hook_steps]
        d["with"] = self.args
        for key in ("when", "register", "loop", "timeout"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.retries:
            d["retries"], d["retry_delay"] = self.retries, self.retry_delay
        if not self.undo:
            d["undo"] = False
        return d


@dataclass(frozen=True)
class Workflow:
    """A validated workflow with its includes loaded."""

    name: str
    description: str
    source: Path
    params: dict[str, ParamSpec]
    steps: tuple[StepSpec, ...]
    resumable: bool = True
    #: ``resources:`` by name (fetched before the first step; templates see ``resources.NAME``)
    resources: dict[str, ResourceSpec] = field(default_factory=dict)
    #: the artifact this workflow was loaded from (``artifact://NAME@VERSION``), if any
    origin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``imaging workflows show --json``: params, resources and steps as loaded
        (includes named, configured hooks expanded)."""
        return {
            "name": self.name,
            "description": self.description,
            "source": str(self.source),
            "origin": self.origin,
            "resumable": self.resumable,
            "params": {name: p.to_dict() for name, p in self.params.items()},
            "resources": {name: {"uri": r.uri, "sha256": r.sha256} for name, r in self.resources.items()},
            "steps": [step.to_dict() for step in self.steps],
        }

    def walk(self) -> Iterator[Workflow]:
        """This workflow and every workflow it includes (each once)."""
        seen: set[int] = set()
        todo: list[Workflow] = [self]
        while todo:
            wf = todo.pop(0)
            if id(wf) in seen:
                continue
            seen.add(id(wf))
            yield wf
            todo.extend(step.include for step in wf.steps if step.include is not None)

    def resolve_params(
        self, given: Mapping[str, Any] | None, *, coerce_strings: bool = False
    ) -> dict[str, Any]:
        """Check ``given`` against the declared params and apply defaults (:class:`UsageError`).

        With ``coerce_strings`` (command-line ``-p key=value``), string values are converted to
        the declared type first: ``"10"`` → 10, ``"true"`` → True, JSON for objects and arrays.
        """
        given = dict(given or {})
        problems = []
        unknown = sorted(set(given) - set(self.params))
        for name in unknown:
            known = ", ".join(sorted(self.params)) or "none"
            problems.append(f"unknown parameter {name!r} (parameters: {known})")
        out: dict[str, Any] = {}
        for name, spec in self.params.items():
            if name in given:
                value = given[name]
                if coerce_strings and isinstance(value, str) and spec.type != "string":
                    value = coerce(value, spec.type)
                if not is_type(value, spec.type):
                    problems.append(f"parameter {name!r} must be {spec.type}, not {value!r}")
                    continue
                out[name] = value
            elif spec.has_default:
                out[name] = spec.default
            elif spec.required:
                problems.append(f"missing required parameter {name!r} ({spec.description or spec.type})")
        if problems:
            raise UsageError(f"workflow {self.name!r}: " + "; ".join(problems))
        return out


@dataclass(frozen=True)
class WorkflowInfo:
    """One entry of :meth:`WorkflowLoader.list`."""

    name: str
    description: str
    source: Path
    error: str | None = None  # why the file cannot be used (full validation is not done by list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": str(self.source),
            "error": self.error,
        }


def is_type(value: Any, type_name: str) -> bool:
    if type_name in ("integer", "number") and isinstance(value, bool):
        return False
    if type_name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES[type_name])


def coerce(value: str, type_name: str) -> Any:
    text = value.strip()
    try:
        if type_name == "integer":
            return int(text, 0)
        if type_name == "number":
            return float(text)
        if type_name == "boolean":
            lowered = text.lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            return value
        return json.loads(text)
    except ValueError:
        return value  # left as a string; the type check reports it
