"""Loading and validating workflow files (found and read by :mod:`appliance.workflow.finder`).

Loading validates everything that can be known without running: the schema (unknown keys,
types), one of ``action``/``include``/``hooks`` per step, that actions exist and their arguments match
their schema (values that are templates are checked after rendering instead), template syntax
and that every name a template uses is a parameter, an earlier step's ``register`` name, ``item``
(in a ``loop`` step) or ``task``; includes are loaded recursively and cycles are refused. All
problems are reported together, each naming file, step and field.
"""

from __future__ import annotations

import builtins
import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jsonschema

from ..artifacts.refs import TEMPLATE_NAME as RESOURCES
from ..artifacts.refs import (
    ArtifactError,
    ArtifactRef,
    ResourceSpec,
    is_artifact_uri,
    parse_resource,
    resource_names_used,
)
from ..artifacts.store import ArtifactStore
from ..config import Config, HooksConfig
from ..errors import UsageError, WorkflowInvalid
from .finder import SHIPPED_DIR, WorkflowFinder, read_document
from .hookpoints import expand as expand_point
from .model import MISSING, ParamSpec, StepSpec, Workflow, is_type
from .registry import Registry, StepUnavailable, default_registry
from .schema import WorkflowError, invalid, schema_errors, step_label
from .templating import TemplateProblem, Templater, contains_template, touches_template

#: names the engine binds in every template scope; params and registers may not use them
RESERVED_NAMES = frozenset({"item", "task", RESOURCES})


class WorkflowLoader(WorkflowFinder):
    """Locates (:class:`~appliance.workflow.finder.WorkflowFinder`) and loads workflows; see the
    module docstring for the rules."""

    def __init__(
        self,
        search_dirs: Sequence[Path | str] = (),
        *,
        registry: Registry | None = None,
        templater: Templater | None = None,
        shipped_dir: Path | None = SHIPPED_DIR,
        artifacts: ArtifactStore | None = None,
        hooks: HooksConfig | None = None,
    ) -> None:
        super().__init__(search_dirs, shipped_dir=shipped_dir, artifacts=artifacts)
        #: the hooks ``hooks:`` steps expand to (see :mod:`.hookpoints`); None: every point is empty
        self.hooks = hooks
        self.registry = registry or default_registry()
        self.templater = templater or Templater()

    @classmethod
    def from_config(cls, config: Config, *, registry: Registry | None = None) -> WorkflowLoader:
        return cls(
            config.workflow_dirs,
            registry=registry,
            artifacts=ArtifactStore.from_config(config),
            hooks=config.hooks,
        )

    def with_hooks(self, hooks: HooksConfig | None) -> WorkflowLoader:
        """This loader, expanding insertion points to ``hooks`` (e.g. those recorded on a task)."""
        clone = copy.copy(self)
        clone.hooks = hooks
        return clone

    # -- loading -------------------------------------------------------------------------------

    def load(self, ref: str | Path) -> Workflow:
        """Locate, parse and fully validate a workflow (:class:`WorkflowInvalid` lists every problem)."""
        path = self.resolve(ref)
        workflow = self._load(path, [], {})
        if not self.is_path(ref) and not is_artifact_uri(str(ref)) and workflow.name != path.stem:
            raise invalid(
                [
                    WorkflowError(
                        str(path), f"name {workflow.name!r} does not match the file name", None, "name"
                    )
                ]
            )
        return workflow

    def validate_file(self, path: str | Path) -> Workflow:
        """Validate one file (by path); returns the workflow or raises :class:`WorkflowInvalid`."""
        return self.load(Path(path))

    def _load(self, path: Path, stack: builtins.list[Path], cache: dict[Path, Workflow]) -> Workflow:
        if path in cache:
            return cache[path]
        file = str(path)
        doc = read_document(path)
        if not isinstance(doc, dict):
            raise invalid([WorkflowError(file, "a workflow must be a mapping with 'name' and 'steps'")])
        errors = schema_errors(doc, file)
        if errors:
            raise invalid(errors)
        params, errors = self._params(doc.get("params") or {}, file)
        origin = self._origins.get(path)
        resources, resource_errors = self._resources(doc, path, origin)
        errors += resource_errors
        steps: list[StepSpec] = []
        known = set(params) | {"task"} | self.templater.global_names | ({RESOURCES} if resources else set())
        step_names: set[str] = set()
        for i, raw in enumerate(doc["steps"], start=1):
            step, step_errors = self._step(
                raw, i, path, known, set(params), step_names, [*stack, path], cache
            )
            errors += step_errors
            if step is not None:
                steps.append(step)
            if isinstance(raw.get("register"), str):
                known.add(raw["register"])  # even for a broken step: no cascade of "undefined" errors
        errors += self._resource_uses(doc, file, resources)
        if errors:
            raise invalid(errors)
        workflow = Workflow(
            name=doc["name"],
            description=(doc.get("description") or "").strip(),
            source=path,
            params=params,
            steps=tuple(steps),
            resumable=doc.get("resumable", True),
            resources=resources,
            origin=origin.uri if origin else None,
        )
        cache[path] = workflow
        return workflow

    def _resources(
        self, doc: dict[str, Any], path: Path, origin: ArtifactRef | None
    ) -> tuple[dict[str, ResourceSpec], builtins.list[WorkflowError]]:
        out, errors = {}, []
        for name, value in (doc.get("resources") or {}).items():
            try:
                out[name] = parse_resource(name, value, base_dir=path.parent, origin=origin)
            except ArtifactError as exc:
                errors.append(WorkflowError(str(path), exc.message, None, f"resources.{name}"))
        return out, errors

    def _resource_uses(
        self, doc: dict[str, Any], file: str, resources: dict[str, ResourceSpec]
    ) -> builtins.list[WorkflowError]:
        """``resources.NAME`` in a template must name a declared resource."""
        if not resources:
            return []  # `resources` itself is then an undefined variable, reported per step
        errors = []
        env = self.templater.env
        for i, raw in enumerate(doc["steps"], start=1):
            fields = [("with", raw.get("with"), False), ("loop", raw.get("loop"), False)]
            fields.append(("when", raw.get("when"), True))
            for where, value, expression in fields:
                for name in sorted(resource_names_used(env, value, expression=expression) - set(resources)):
                    errors.append(
                        WorkflowError(
                            file,
                            f"undefined resource {name!r} (resources: {', '.join(sorted(resources))})",
                            step_label(i, raw.get("name")),
                            where,
                        )
                    )
        return errors

    def _params(
        self, raw: dict[str, Any], file: str
    ) -> tuple[dict[str, ParamSpec], builtins.list[WorkflowError]]:
        params, errors = {}, []
        for name, spec in raw.items():
            where = f"params.{name}"
            if name in RESERVED_NAMES:
                errors.append(WorkflowError(file, f"{name!r} is reserved (used by the engine)", None, where))
            p = ParamSpec(
                name,
                spec["type"],
                (spec.get("description") or "").strip(),
                spec.get("required", False),
                spec.get("default", MISSING),
            )
            if p.has_default and not is_type(p.default, p.type):
                errors.append(
                    WorkflowError(file, f"default {p.default!r} is not {p.type}", None, f"{where}.default")
                )
            if p.has_default and p.required:
                errors.append(WorkflowError(file, "a required parameter cannot have a default", None, where))
            params[name] = p
        return params, errors

    def _step(
        self,
        raw: dict[str, Any],
        index: int,
        path: Path,
        known: set[str],
        param_names: set[str],
        step_names: set[str],
        stack: builtins.list[Path],
        cache: dict[Path, Workflow],
    ) -> tuple[StepSpec | None, builtins.list[WorkflowError]]:
        file = str(path)
        label = step_label(index, raw["name"])
        errors: list[WorkflowError] = []

        def err(message: str, where: str | None = None) -> None:
            errors.append(WorkflowError(file, message, label, where))

        if raw["name"] in step_names:
            err("another step has the same name (step names must be unique in a workflow)", "name")
        step_names.add(raw["name"])
        has_action, has_include, has_hooks = "action" in raw, "include" in raw, "hooks" in raw
        if has_action + has_include + has_hooks != 1:
            err(
                "needs exactly one of 'action' (a registered step) or 'include' (another workflow)"
                " or 'hooks' (an insertion point)"
            )
        if has_include:
            for key in ("timeout", "retries", "retry_delay", "undo"):
                if key in raw:
                    err("not allowed on an include step (set it on the included steps)", key)
        register = raw.get("register")
        if register is not None:
            if register in RESERVED_NAMES:
                err(f"{register!r} is reserved (used by the engine)", "register")
            elif register in param_names:
                err(f"{register!r} is already a parameter name", "register")
            elif register in known:
                err(f"{register!r} is already registered by an earlier step", "register")

        # Templates: syntax and names. `item` exists only inside a loop step (not in `loop` itself).
        in_loop = known | ({"item"} if "loop" in raw else set())
        self._check_names(raw.get("with", {}), "with", in_loop, err)
        if isinstance(raw.get("when"), str):
            try:
                names = self.templater.condition_names(raw["when"])
                _report_unknown({"when": names}, in_loop, err)
            except TemplateProblem as exc:
                err(exc.message, exc.field)
        if isinstance(raw.get("loop"), str):
            if not raw["loop"].strip().startswith("{{"):
                err("must be a list or a template expression ('{{ ... }}') yielding a list", "loop")
            self._check_names(raw["loop"], "loop", known, err)
        elif isinstance(raw.get("loop"), list):
            self._check_names(raw["loop"], "loop", known, err)

        include = None
        hook_steps: tuple[StepSpec, ...] = ()
        if has_hooks:
            hook_steps, hook_errors = expand_point(self, raw, file, label)
            errors += hook_errors
        elif has_action and not has_include:
            self._check_action(raw["action"], raw.get("with", {}), err)
        elif has_include:
            include = self._include(raw, path, stack, cache, err)
        if errors:
            return None, errors
        return (
            StepSpec(
                index=index,
                name=raw["name"],
                action=raw.get("action"),
                include=include,
                include_ref=raw.get("include"),
                args=raw.get("with", {}),
                when=raw.get("when"),
                register=register,
                loop=raw.get("loop"),
                timeout=raw.get("timeout"),
                retries=raw.get("retries", 0),
                retry_delay=raw.get("retry_delay", 0.0),
                undo=raw.get("undo", True),
                description=(raw.get("description") or "").strip(),
                hooks=raw.get("hooks"),
                hook_steps=hook_steps,
            ),
            [],
        )

    def _check_names(self, value: Any, where: str, allowed: set[str], err: Any) -> None:
        try:
            found = self.templater.referenced_names(value, where)
        except TemplateProblem as exc:
            err(exc.message, exc.field)
            return
        _report_unknown(found, allowed, err)

    def _check_action(self, action: str, args: dict[str, Any], err: Any) -> None:
        if action not in self.registry:
            err(
                f"unknown action {action!r} (registered: {', '.join(self.registry.names()) or 'none'})",
                "action",
            )
            return
        try:
            schema = self.registry.schema(action)
        except StepUnavailable as exc:
            err(exc.message, "action")
            return
        if schema is None:
            return
        for e in jsonschema.Draft202012Validator(schema).iter_errors(args):
            if touches_template(args, list(e.absolute_path)):
                continue  # checked after rendering, when the value is known
            where = ".".join(["with", *(str(p) for p in e.absolute_path)])
            err(e.message.replace("is a required property", "is required"), where)

    def _include(
        self,
        raw: dict[str, Any],
        path: Path,
        stack: builtins.list[Path],
        cache: dict[Path, Workflow],
        err: Callable[[str, str | None], None],
    ) -> Workflow | None:
        ref = raw["include"]
        if path in self._origins and self.is_path(ref):
            err("a workflow from an artifact includes other workflows by name or artifact:// URI", "include")
            return None
        try:
            target = self.resolve(ref, relative_to=path.parent)
        except (UsageError, ArtifactError) as exc:
            err(exc.message, "include")
            return None
        if target in stack:
            chain = " -> ".join(p.name for p in [*stack[stack.index(target) :], target])
            err(f"include cycle: {chain}", "include")
            return None
        try:
            included = self._load(target, stack, cache)
        except WorkflowInvalid as exc:
            for e in getattr(exc, "errors", []) or [WorkflowError(str(target), exc.message)]:
                err(f"included workflow is invalid: {e}", "include")
            return None
        args = raw.get("with", {})
        for name in sorted(set(args) - set(included.params)):
            known = ", ".join(sorted(included.params)) or "none"
            err(f"{included.name!r} has no parameter {name!r} (parameters: {known})", f"with.{name}")
        for name, spec in included.params.items():
            if name not in args:
                if spec.required and not spec.has_default:
                    err(f"{included.name!r} needs parameter {name!r}", "with")
            elif not contains_template(args[name]) and not is_type(args[name], spec.type):
                err(
                    f"must be {spec.type} (parameter of {included.name!r}), not {args[name]!r}",
                    f"with.{name}",
                )
        return included


def _report_unknown(
    found: dict[str, set[str]], allowed: set[str], err: Callable[[str, str | None], None]
) -> None:
    for where, names in found.items():
        for name in sorted(names - allowed):
            hint = " ('item' exists only in a step with 'loop')" if name == "item" else ""
            err(
                f"undefined variable {name!r}: not a parameter or an earlier step's register name{hint}",
                where,
            )
