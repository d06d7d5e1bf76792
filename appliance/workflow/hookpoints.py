"""Insertion points: workflow steps ``hooks: POINT`` and the configured hooks they run.

A step ``{name, hooks: POINT, with: {image: ...}, register?, when?}`` is expanded when the workflow
is loaded: the loader turns the hooks the configuration lists for POINT into child steps (plain
:class:`~appliance.workflow.model.StepSpec` with the hook's action, ``with``, timeout and retries),
so validation, dry-run plans, records, undo and resume treat them as ordinary steps. A child's
``with`` is the hook's configured arguments plus ``image: "{{ image }}"``; configured values may
use the templates ``{{ image.* }}`` and ``{{ task.* }}``.

When run (:meth:`TaskRun.run_point <appliance.workflow.runner.TaskRun.run_point>`; dry runs:
:meth:`Planner.plan_point <appliance.workflow.planner.Planner.plan_point>`), the point records
itself at ``<idx>`` (args ``{image, hooks}``, never undone) and each hook at ``<idx>/hook/<n>``; the
image is chained by :func:`next_image`: a hook returning ``{"image": IMAGE}`` hands that image to the
next one, None leaves it unchanged. The point registers ``{"image": final IMAGE, "hooks": [names]}``;
with no hooks configured it passes ``image`` through. This module only expands points into steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jsonschema

from ..config import HOOK_POINTS, HookConfig, HooksConfig, hooks_from_dict
from ..errors import StepFailed
from ..store import Store
from .model import StepSpec, Workflow
from .registry import Registry, StepUnavailable
from .schema import WorkflowError
from .templating import TemplateProblem, Templater, touches_template


class HookSource(Protocol):
    """What expanding a point needs: the configured hooks, the actions and the templates (a
    :class:`~appliance.workflow.loader.WorkflowLoader` is one)."""

    hooks: HooksConfig | None
    registry: Registry
    templater: Templater


#: the task event announcing, at submit, the hooks of the points its workflow uses (redacted)
HOOKS_EVENT = "task.hooks"
#: the task record (:meth:`appliance.store.Store.set_record`) keeping those hooks to run with
HOOKS_RECORD = "hooks"
#: what every hook's ``image`` argument is bound to (the engine supplies the chained image)
IMAGE_ARG = "{{ image }}"
#: names a configured hook's ``with`` templates may use
HOOK_SCOPE = frozenset({"image", "task"})
#: step keys a ``hooks`` step may not have (they belong to each hook, in the configuration)
NOT_ON_POINT = ("timeout", "retries", "retry_delay", "undo", "loop")


def expand(
    loader: HookSource, raw: Mapping[str, Any], file: str, label: str
) -> tuple[tuple[StepSpec, ...], list[WorkflowError]]:
    """The child steps of the point step ``raw`` for ``loader.hooks``, and every problem found."""

    errors: list[WorkflowError] = []
    point = raw["hooks"]
    if point not in HOOK_POINTS:
        errors.append(
            WorkflowError(
                file, f"unknown insertion point {point!r} (points: {', '.join(HOOK_POINTS)})", label, "hooks"
            )
        )
        return (), errors
    given = raw.get("with")
    if not isinstance(given, Mapping) or set(given) != {"image"}:
        errors.append(WorkflowError(file, "a hooks step takes exactly 'with: {image: ...}'", label, "with"))
    for key in NOT_ON_POINT:
        if key in raw:
            errors.append(
                WorkflowError(file, "not allowed on a hooks step (configure it on the hook)", label, key)
            )
    children, problems = hook_steps(loader, point, label)
    return children, errors + problems


def hook_steps(
    loader: HookSource, point: str, label: str | None = None
) -> tuple[tuple[StepSpec, ...], list[WorkflowError]]:
    """The configured hooks of ``point`` as steps; problems name the config file and field."""
    errors: list[WorkflowError] = []
    hooks: HooksConfig = loader.hooks or HooksConfig()
    children = []
    for n, hook in enumerate(hooks.at(point), start=1):
        where = f"hooks.points.{point}[{n - 1}]"

        def config_err(message: str, field: str, where: str = where) -> None:
            errors.append(WorkflowError(hooks.source, message, label, f"{where}.{field}"))

        if "image" in hook.args:
            config_err("'image' is given by the engine (the image at the point)", "with.image")
        schema = _action_schema(loader, hook.hook, hook.action, config_err)
        # Any action may be a hook; one whose run() takes no `image` (util.fail) runs without it, and so does
        # a local `run` command (its `image` is the guest to chroot into): it may use {{ image.path }}.
        takes_image = (
            schema is not False and _takes_image(loader.registry.get(hook.action)) and not _local_run(hook)
        )
        args = {**hook.args, "image": IMAGE_ARG} if takes_image else dict(hook.args)
        if isinstance(schema, dict):
            _check_args(schema, args, config_err)
        try:
            found = loader.templater.referenced_names(hook.args, "with")
        except TemplateProblem as exc:
            config_err(exc.message, exc.field)
        else:
            allowed = HOOK_SCOPE | loader.templater.global_names
            for field, names in found.items():
                for name in sorted(names - allowed):
                    config_err(f"undefined variable {name!r} (hook templates may use image and task)", field)
        children.append(
            StepSpec(
                index=n,
                name=hook.name,
                action=hook.action,
                args=args,
                timeout=hook.timeout,
                retries=hook.retries,
                description=f"hook {hook.hook!r} at {point}",
            )
        )
    return tuple(children), errors


def _local_run(hook: HookConfig) -> bool:
    """Whether ``hook`` is a ``run`` command on the appliance itself (not in the guest)."""
    return hook.action == "run" and hook.args.get("where", "local") == "local"


def _takes_image(cls: type) -> bool:
    try:
        # the registry holds only classes with a callable run (registry._check_class)
        params = inspect.signature(cls.run).parameters.values()  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return True
    return any(p.name == "image" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def validate_hooks(loader: HookSource) -> list[WorkflowError]:
    """Every problem of the hooks configured for any point (``imaging config validate``)."""
    errors: list[WorkflowError] = []
    for point in HOOK_POINTS:
        errors += hook_steps(loader, point)[1]
    return errors


def _action_schema(
    loader: HookSource, hook: str, action: str, err: Callable[[str, str], None]
) -> dict[str, Any] | bool | None:
    """The action's argument schema (None: it has none; False: the action is unusable, reported)."""
    registry = loader.registry
    if action not in registry:
        kind = f"hook {hook!r} (action {action!r})" if action != hook else f"action {action!r}"
        shipped = sorted(n.removeprefix("hook.") for n in registry.names() if n.startswith("hook."))
        problems = "".join(f"; plugin not loaded: {e}" for e in registry.plugin_errors.values())
        err(
            f"unknown {kind}; shipped hooks: {', '.join(shipped) or 'none'}, or any action name{problems}",
            "hook",
        )
        return False
    try:
        return registry.schema(action)
    except StepUnavailable as exc:
        err(exc.message, "hook")
        return False


def _check_args(schema: dict[str, Any], args: dict[str, Any], err: Any) -> None:
    for e in jsonschema.Draft202012Validator(schema).iter_errors(args):
        if touches_template(args, list(e.absolute_path)):
            continue  # `image` and templated values are checked when the hook runs
        field = ".".join(["with", *(str(p) for p in e.absolute_path)])
        err(e.message.replace("is a required property", "is required"), field)


def next_image(name: str, image: dict[str, Any], result: Any) -> dict[str, Any]:
    """The image after a hook that returned ``result`` (None or without ``image``: unchanged)."""
    if not isinstance(result, Mapping) or result.get("image") is None:
        return image
    new = result["image"]
    if not isinstance(new, Mapping) or not isinstance(new.get("path"), str) or not new["path"]:
        raise StepFailed(f"hook {name!r} returned an image without a 'path': {new!r}")
    return dict(new)


def points_used(workflow: Workflow) -> set[str]:
    """The insertion points ``workflow`` and its includes contain."""
    found: set[str] = set()
    for step in workflow.steps:
        if step.hooks is not None:
            found.add(step.hooks)
        elif step.include is not None:
            found |= points_used(step.include)
    return found


def record_hooks(store: Store, task_id: str, points: dict[str, Any]) -> None:
    """Record the hooks a task runs (and resumes) with: kept as given, arguments and all (they may
    hold secrets), and announced by a :data:`HOOKS_EVENT` event, which is stored redacted."""
    store.set_record(task_id, HOOKS_RECORD, points)
    store.add_event(task_id, HOOKS_EVENT, {"points": points})


def recorded_hooks(store: Store, task_id: str) -> HooksConfig | None:
    """The hooks recorded on the task at submit (None for a task submitted without a record)."""
    points = store.record(task_id, HOOKS_RECORD)
    if points is not None:
        return hooks_from_dict(points, source=f"the hooks recorded on task {task_id}")
    # Tasks submitted before records existed kept them in their first events (unredacted then).
    for event in store.events(task_id=task_id, limit=20):
        if event.kind == HOOKS_EVENT:
            return hooks_from_dict(
                event.data.get("points") or {}, source=f"the hooks recorded on task {task_id}"
            )
    return None
