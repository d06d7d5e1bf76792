"""Dry run: what a workflow would do with given params, without doing any of it.

The plan evaluates ``when`` conditions and renders arguments, asks each step's ``plan()`` what it
would do (and how much scratch it would need), and sums the scratch. Nothing is written: no task
row, no scratch directory, no files.

Results of steps cannot be known without running them. A dry run binds every ``register`` name
to an :class:`~appliance.workflow.templating.UnknownResult`, so a template that uses one renders
to a placeholder such as ``<result of step 'inspect'.format>`` instead of failing. A step whose
arguments contain such a placeholder is listed with ``"args_known": false`` and its ``plan()`` is
not called; a condition that depends on one makes the step ``conditional`` (counted in
``scratch_bytes_max`` but not in ``scratch_bytes``); a loop over one is listed once, as
``<idx>.loop*``, for "each item".
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import jsonschema

from ..artifacts.resources import ResourceFetcher
from ..config import Config
from ..errors import UsageError
from ..scratch import TaskScratch
from .model import StepSpec, Workflow
from .registry import Registry
from .schema import WorkflowError, invalid
from .step import DRY_RUN_WORKDIR, StepContext
from .templating import (
    TemplateProblem,
    Templater,
    UnknownResult,
    UnknownValue,
    contains_unknown,
    placeholders_to_text,
)

RUN, SKIP, CONDITIONAL = "run", "skip", "conditional"


@dataclass(frozen=True)
class _PlanTask:
    """``task`` in dry-run templates."""

    id: str = "<task id>"
    workdir: str = DRY_RUN_WORKDIR


class _PlanHooks:
    """Step-context hooks that do nothing: a dry run reports no progress and creates nothing."""

    def progress(self, ctx: StepContext, progress: dict[str, Any]) -> None:
        pass

    def event(self, ctx: StepContext, kind: str, data: dict[str, Any]) -> None:
        pass

    def ledger(self, ctx: StepContext, action: str, resource: str) -> None:
        pass

    def scratch(self) -> TaskScratch:
        raise UsageError("scratch space is not available in a dry run")

    def fence(self, ctx: StepContext) -> None:
        pass

    def save_checkpoint(self, ctx: StepContext, data: dict[str, Any]) -> None:
        pass

    def load_checkpoint(self, ctx: StepContext) -> dict[str, Any] | None:
        return None


def _plan_resources(workflow: Workflow) -> dict[str, Any]:
    """``resources`` in dry-run templates: placeholders (a dry run downloads nothing)."""
    if not workflow.resources:
        return {}
    return {"resources": {name: UnknownResult(f"resource {name!r}") for name in workflow.resources}}


class Planner:
    """Builds the dry-run plan of a workflow."""

    def __init__(self, config: Config, registry: Registry, templater: Templater) -> None:
        self.config = config
        self.registry = registry
        self.templater = templater

    def plan(self, workflow: Workflow, params: dict[str, Any]) -> dict[str, Any]:
        """The plan as JSON data: ``workflow, source, params, steps, scratch_bytes, scratch_bytes_max``.

        Each entry of ``steps`` has ``idx, name, action`` (or ``include``), ``status`` (run,
        skip, conditional), ``reason``, ``args`` (placeholders as text), ``args_known``,
        ``plan`` (the step's ``plan()`` output) and ``scratch_bytes``.
        """
        entries: list[dict[str, Any]] = []
        self._steps(
            workflow, {**params, **_plan_resources(workflow), "task": _PlanTask()}, "", RUN, None, entries
        )
        definite = sum(e.get("scratch_bytes") or 0 for e in entries if e["status"] == RUN)
        maximum = sum(e.get("scratch_bytes") or 0 for e in entries if e["status"] != SKIP)
        return {
            "workflow": workflow.name,
            "source": str(workflow.source),
            "resumable": workflow.resumable,
            "params": params,
            "steps": entries,
            "scratch_bytes": definite,
            "scratch_bytes_max": maximum,
            "resources": self._resources(workflow),
        }

    def _resources(self, workflow: Workflow) -> list[dict[str, Any]]:
        """What a run would fetch before its first step (nothing is fetched in a dry run)."""
        if not any(wf.resources for wf in workflow.walk()):
            return []
        fetcher = ResourceFetcher(self.config)
        return [entry for wf in workflow.walk() for entry in fetcher.plan(wf.name, wf.resources)]

    def _steps(
        self,
        wf: Workflow,
        scope: dict[str, Any],
        prefix: str,
        status: str,
        reason: str | None,
        entries: list[dict[str, Any]],
    ) -> dict[str, Any]:
        registered: dict[str, Any] = {}
        for step in wf.steps:
            idx = f"{prefix}{step.index}"
            step_status, step_reason = status, reason
            per_item = isinstance(step.when, str) and "item" in self.templater.condition_names(step.when)
            if step.when is not None and not per_item:
                verdict = self._condition(wf, step, scope)
                if verdict is False:
                    entries.append(self._entry(step, idx, SKIP, f"when: {step.when} is false"))
                    continue
                if isinstance(verdict, UnknownResult):
                    step_status, step_reason = CONDITIONAL, f"when: {step.when} depends on {verdict}"
            if step.loop is None:
                value = self._one(wf, step, idx, scope, step_status, step_reason, entries)
            else:
                value = self._loop(wf, step, idx, scope, step_status, step_reason, per_item, entries)
            if step.register:
                scope[step.register] = value
                registered[step.register] = value
        return registered

    def _loop(
        self,
        wf: Workflow,
        step: StepSpec,
        idx: str,
        scope: dict[str, Any],
        status: str,
        reason: str | None,
        per_item: bool,
        entries: list[dict[str, Any]],
    ) -> Any:
        items, _known = self._render(wf, step, step.loop, scope, "loop")
        if isinstance(items, UnknownResult):
            item = UnknownResult(f"an item of {items}")
            note = f"once per item of {items}"
            self._one(wf, step, f"{idx}.loop*", {**scope, "item": item}, status, reason or note, entries)
            return UnknownResult(f"result of step {step.name!r}")
        if not isinstance(items, list):
            raise invalid(
                [WorkflowError(str(wf.source), f"must yield a list, not {items!r}", step.label, "loop")]
            )
        for n, item in enumerate(items, start=1):
            item_status, item_reason, child = status, reason, f"{idx}.loop{n}"
            item_scope = {**scope, "item": item}
            if per_item:
                verdict = self._condition(wf, step, item_scope)
                if verdict is False:
                    entries.append(self._entry(step, child, SKIP, f"when: {step.when} is false"))
                    continue
                if isinstance(verdict, UnknownResult):
                    item_status, item_reason = CONDITIONAL, f"when: {step.when} depends on {verdict}"
            self._one(wf, step, child, item_scope, item_status, item_reason, entries)
        return UnknownResult(f"result of step {step.name!r}")

    def plan_point(
        self,
        wf: Workflow,
        step: StepSpec,
        idx: str,
        scope: dict[str, Any],
        status: str,
        reason: str | None,
        entries: list[dict[str, Any]],
    ) -> Any:
        """Dry-run entries for the point and each configured hook; returns what the point would register."""
        args, known = self._render(wf, step, step.args, scope, "with")
        names = [h.name for h in step.hook_steps]
        entries.append(
            {
                "idx": idx,
                "name": step.name,
                "action": f"hooks:{step.hooks}",  # as the run records it
                "hooks": step.hooks,
                "status": status,
                "reason": reason,
                "plan": {"runs": names},
                "scratch_bytes": None,
                "args": placeholders_to_text(args),
                "args_known": known,
            }
        )
        image = args.get("image")
        for hook in step.hook_steps:
            self._one(
                wf,
                hook,
                f"{idx}/hook/{hook.index}",
                {"image": image, "task": scope["task"]},
                status,
                reason,
                entries,
            )
            image = UnknownResult(f"image after hook {hook.name!r}")
        return {"image": image, "hooks": names}

    def _one(
        self,
        wf: Workflow,
        step: StepSpec,
        idx: str,
        scope: dict[str, Any],
        status: str,
        reason: str | None,
        entries: list[dict[str, Any]],
    ) -> Any:
        if step.hooks is not None:
            return self.plan_point(wf, step, idx, scope, status, reason, entries)
        args, known = self._render(wf, step, step.args, scope, "with")
        entry = self._entry(step, idx, status, reason)
        entry.update(args=placeholders_to_text(args), args_known=known)
        entries.append(entry)
        if step.include is not None:
            given = {k: v for k, v in args.items() if not contains_unknown(v)}
            try:
                params = step.include.resolve_params(given)
            except UsageError as exc:
                if known:
                    raise invalid([WorkflowError(str(wf.source), exc.message, step.label, "with")]) from None
                params = dict(given)
            params.update({k: v for k, v in args.items() if contains_unknown(v)})
            inner = {**params, **_plan_resources(step.include), "task": _PlanTask()}
            return self._steps(step.include, inner, f"{idx}/include/", status, reason, entries)

        assert step.action is not None  # the loader gives every step an action, an include or hooks
        cls = self.registry.get(step.action)
        if known:
            schema = getattr(cls, "schema", None)
            if schema is not None:
                problems = [
                    WorkflowError(
                        str(wf.source), e.message, step.label, ".".join(["with", *map(str, e.absolute_path)])
                    )
                    for e in jsonschema.Draft202012Validator(schema).iter_errors(args)
                ]
                if problems:
                    raise invalid(problems)
            ctx = StepContext(
                task_id="<task id>",
                config=self.config,
                store=None,
                cancel=threading.Event(),
                idx=idx,
                name=step.name,
                hooks=_PlanHooks(),
                dry_run=True,
            )
            instance = cls()
            plan_fn = getattr(instance, "plan", None)
            try:
                planned = plan_fn(ctx, **args) if plan_fn is not None else dict(args)
            except Exception as exc:  # a plan() that cannot tell is reported, not fatal
                entry["error"] = str(exc)
                planned = None
            entry["plan"] = planned
            if isinstance(planned, dict) and isinstance(planned.get("scratch_bytes"), int):
                entry["scratch_bytes"] = planned["scratch_bytes"]
        else:
            entry["note"] = "arguments depend on results of earlier steps; plan() not called"
        return UnknownResult(f"result of step {step.name!r}")

    @staticmethod
    def _entry(step: StepSpec, idx: str, status: str, reason: str | None) -> dict[str, Any]:
        entry: dict[str, Any] = {"idx": idx, "name": step.name}
        if step.include is not None:
            entry["include"] = step.include_ref
        else:
            entry["action"] = step.action
        entry.update(status=status, reason=reason, plan=None, scratch_bytes=None)
        if step.include is None:
            entry.update(timeout=step.timeout, retries=step.retries, undo=step.undo)
        return entry

    def _condition(self, wf: Workflow, step: StepSpec, scope: dict[str, Any]) -> bool | UnknownResult:
        if step.when is None:
            return True
        try:
            verdict = self.templater.condition(step.when, scope)
        except UnknownValue as exc:
            return exc.unknown
        except TemplateProblem as exc:
            unknown = self._unknown_names(step.when, scope, "when")
            if unknown:
                return UnknownResult(" and ".join(unknown))
            raise invalid([WorkflowError(str(wf.source), exc.message, step.label, exc.field)]) from None
        return verdict if isinstance(verdict, UnknownResult) else bool(verdict)

    def _unknown_names(self, value: Any, scope: dict[str, Any], field: str) -> list[str]:
        """Labels of the unknown values that a template refers to."""
        if field == "when":
            names = self.templater.condition_names(value)
        else:
            names = set().union(*self.templater.referenced_names(value, field).values() or [set()])
        labels = []
        for name in sorted(names):
            if name in scope and contains_unknown(scope[name]):
                v = scope[name]
                labels.append(str(v)[1:-1] if isinstance(v, UnknownResult) else f"results in {name!r}")
        return labels

    def _render(
        self, wf: Workflow, step: StepSpec, value: Any, scope: dict[str, Any], field: str
    ) -> tuple[Any, bool]:
        """Render for a plan: ``(value, known)``; unknown parts become placeholders."""
        if isinstance(value, dict):
            out, known = {}, True
            for k, v in value.items():
                out[k], ok = self._render(wf, step, v, scope, f"{field}.{k}")
                known = known and ok
            return out, known
        if isinstance(value, list):
            items, known = [], True
            for i, v in enumerate(value):
                rendered, ok = self._render(wf, step, v, scope, f"{field}[{i}]")
                items.append(rendered)
                known = known and ok
            return items, known
        if not isinstance(value, str):
            return value, True
        unknown = self._unknown_names(value, scope, field)
        try:
            rendered = self.templater.render(value, scope, field)
        except UnknownValue as exc:
            return UnknownResult(f"value depending on {str(exc.unknown)[1:-1]}"), False
        except TemplateProblem as exc:
            if unknown:
                return UnknownResult(f"value depending on {' and '.join(unknown)}"), False
            raise invalid([WorkflowError(str(wf.source), exc.message, step.label, exc.field)]) from None
        return rendered, not unknown and not contains_unknown(rendered)
