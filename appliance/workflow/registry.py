"""Which step classes the ``action:`` names of workflows refer to.

Steps come from the ``imaging.steps`` entry-point group (built-in steps are registered there the
same way an operator's package registers its own) and from :meth:`Registry.register` in-process.
Entry points are only *listed* when a registry is created; a class is imported the first time a
workflow uses it, so one broken plugin (a missing module, a syntax error) does not stop anything
else: it is reported, with the import error, when a workflow that uses it is loaded or run.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from ..errors import ImagingError

GROUP = "imaging.steps"


class StepUnavailable(ImagingError):
    """A workflow uses an action that is not registered or whose class cannot be loaded."""

    code = "StepUnavailable"


@dataclass(frozen=True)
class StepInfo:
    """What ``imaging steps`` lists about one action."""

    name: str
    target: str  # "module:attr" of the entry point, or "module.Class" for in-process registrations
    ok: bool
    description: str
    error: str | None = None


class Registry:
    """Action name → step class."""

    def __init__(self, *, entry_points: bool = True, group: str = GROUP) -> None:
        self._entry_points: dict[str, importlib.metadata.EntryPoint] = {}
        self._classes: dict[str, type] = {}
        self._broken: dict[str, str] = {}
        #: plugin files (see :mod:`appliance.workflow.plugins`) that could not be loaded: file → why
        self.plugin_errors: dict[str, str] = {}
        if entry_points:
            for ep in importlib.metadata.entry_points(group=group):
                # First one wins, so a plugin cannot silently shadow a built-in of the same name.
                self._entry_points.setdefault(ep.name, ep)

    def register(self, name: str, cls: type, *, replace: bool = False) -> None:
        """Make ``cls`` available as ``action: name`` in this process."""
        if not replace and name in self:
            raise ValueError(f"step {name!r} is already registered")
        _check_class(name, cls)
        self._classes[name] = cls
        self._broken.pop(name, None)

    def names(self) -> list[str]:
        return sorted(set(self._entry_points) | set(self._classes))

    def __contains__(self, name: object) -> bool:
        return name in self._classes or name in self._entry_points

    def get(self, name: str) -> type:
        """The class for ``name``; :class:`StepUnavailable` says why when there is none."""
        cls = self._classes.get(name)
        if cls is not None:
            return cls
        if name in self._broken:
            raise StepUnavailable(self._broken[name])
        ep = self._entry_points.get(name)
        if ep is None:
            known = ", ".join(self.names()) or "none"
            broken = "".join(f"; plugin not loaded: {e}" for e in self.plugin_errors.values())
            raise StepUnavailable(f"unknown action {name!r} (registered: {known}){broken}")
        try:
            cls = ep.load()
            _check_class(name, cls)
        except Exception as exc:
            self._broken[name] = (
                f"action {name!r} cannot be loaded: entry point {ep.value!r} failed: "
                f"{type(exc).__name__}: {exc}"
            )
            raise StepUnavailable(self._broken[name]) from exc
        self._classes[name] = cls
        return cls

    def schema(self, name: str) -> dict[str, Any] | None:
        """The jsonschema of the action's ``with`` arguments, if it declares one."""
        return getattr(self.get(name), "schema", None)

    def describe(self) -> list[StepInfo]:
        """Every action with its status (this imports them all)."""
        out = []
        for name in self.names():
            target = self._entry_points[name].value if name in self._entry_points else ""
            try:
                cls = self.get(name)
            except StepUnavailable as exc:
                out.append(StepInfo(name, target, False, "", exc.message))
                continue
            target = target or f"{cls.__module__}.{cls.__qualname__}"
            doc = (cls.__doc__ or "").strip().splitlines()
            out.append(StepInfo(name, target, True, doc[0] if doc else ""))
        for file, error in sorted(self.plugin_errors.items()):
            out.append(StepInfo(f"<plugin {Path(file).name}>", file, False, "", error))
        return out


def _check_class(name: str, cls: Any) -> None:
    if not isinstance(cls, type) or not callable(getattr(cls, "run", None)):
        raise TypeError(f"step {name!r}: {cls!r} is not a class with a run(ctx, **args) method")
    schema = getattr(cls, "schema", None)
    if schema is not None:
        jsonschema.Draft202012Validator.check_schema(schema)


@functools.cache
def default_registry() -> Registry:
    """The process-wide registry of entry-point steps."""
    return Registry()
