"""Executing one task's workflow: steps, loops, includes, retries, timeouts, undo, scratch.

A :class:`TaskRun` walks the workflow and records every step in the store under its path
(``"3"``, ``"2.loop1"``, ``"4/include/1"``). Loop and include steps get a record of their own
(the registered list or mapping) and one per item or included step. A step already ``completed``
in the store is not run again: its stored result is registered instead. That is how a resumed
task continues after the step that was interrupted.

Each step runs in its own thread so the engine can stop waiting for it: the main thread watches
the task's cancel event and the step's timeout and sets the step's ``ctx.cancel``; a step that
does not return within the grace period after that is abandoned (recorded in an event).

An exception a step did not mean to raise (a plugin's bug, a library's own error) fails the step
as ``StepFailed`` with a fixed message: its type and text go to the worker log and to the task's
``step.exception`` event for the operator, never into the task's message, which EC2 clients read
as the ``StatusMessage``.

A task run's state, its step records and the hooks its steps report through are
:mod:`.runstate`'s; undo and the cleanup after a failed or cancelled run are :mod:`.cleanup`'s.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import jsonschema

from ..artifacts.resources import ResourceFetcher
from ..errors import (
    Cancelled,
    Finding,
    ImageRejected,
    ImagingError,
    LeaseLost,
    StepFailed,
    StepTimeout,
    StoreUnavailable,
    UsageError,
    WorkflowInvalid,
)
from ..store import StepState
from .cleanup import RunCleanup
from .hookpoints import next_image
from .model import StepSpec, Workflow
from .runstate import PROGRESS_DB_INTERVAL as PROGRESS_DB_INTERVAL
from .runstate import PROGRESS_EVENT_INTERVAL as PROGRESS_EVENT_INTERVAL
from .runstate import RunHost as RunHost
from .runstate import TaskVars
from .schema import WorkflowError, invalid
from .templating import TemplateProblem

log = logging.getLogger(__name__)

#: the task message of a step that raised an exception nobody coded
UNEXPECTED_MESSAGE = (
    "an unexpected internal error (a bug); the operator finds its details in the task's "
    "step.exception event and in the worker log"
)
#: how much of such an exception's text the event keeps
EXCEPTION_TEXT_CHARS = 2000


class StepFailure(ImagingError):
    """Carries the failing step's error and its label to the engine."""

    def __init__(self, error: ImagingError, step: str) -> None:
        super().__init__(f"step {step!r} failed: {error.message}", error.code)
        self.error = error
        self.step = step


class TaskRun(RunCleanup):
    """One attempt at running (or cleaning up) a task in this process."""

    # -- executing -------------------------------------------------------------------------

    def execute(self, workflow: Workflow, params: dict[str, Any]) -> dict[str, Any]:
        """Fetch the workflow's resources, then run its steps in order; returns the top-level
        registered results."""
        self._fetch_resources(workflow)
        return self._run_steps(workflow, self._scope(params, workflow), "")

    def _scope(self, params: dict[str, Any], workflow: Workflow | None = None) -> dict[str, Any]:
        scope = {**params, "task": TaskVars(self)}
        if workflow is not None and workflow.resources:
            scope["resources"] = self._resources.get(id(workflow), {})
        return scope

    def _fetch_resources(self, workflow: Workflow) -> None:
        """Before the first step (and again on resume: then from the cache): every resource of the
        workflow and its includes as a verified local file (``resources.NAME`` in templates)."""
        if not any(wf.resources for wf in workflow.walk()):
            return
        fetcher = ResourceFetcher(self.config, store=self.engine.loader.artifacts)
        fetched = {id(wf): fetcher.fetch_all(wf.resources, cancel=self.cancel) for wf in workflow.walk()}
        self._resources = {key: {n: str(r.path) for n, r in res.items()} for key, res in fetched.items()}
        self._emit(
            "resources.fetched",
            {"resources": [r.to_dict() for res in fetched.values() for r in res.values()]},
        )

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("the task was cancelled")

    def _run_steps(self, workflow: Workflow, scope: dict[str, Any], prefix: str) -> dict[str, Any]:
        registered: dict[str, Any] = {}
        for step in workflow.steps:
            self.check_cancelled()
            ran, value = self._run_step(workflow, step, f"{prefix}{step.index}", scope)
            if ran and step.register:
                scope[step.register] = value
                registered[step.register] = value
        return registered

    def _run_step(self, wf: Workflow, step: StepSpec, idx: str, scope: dict[str, Any]) -> tuple[bool, Any]:
        """Run one step (all its loop items); ``(False, None)`` if it was skipped."""
        previous = self._done.get(idx)
        if previous is not None and previous.state is StepState.COMPLETED:
            return True, previous.result
        if previous is not None and previous.state is StepState.SKIPPED:
            return False, None
        per_item_when = step.when is not None and self._when_uses_item(step)
        if step.when is not None and not per_item_when and not self._condition(wf, step, scope):
            self._skip(step, idx, f"when: {step.when}")
            return False, None
        if step.loop is None:
            return True, self._run_one(wf, step, idx, scope)

        items = self._render(wf, step, step.loop, scope, "loop")
        if not isinstance(items, list):
            raise invalid(
                [WorkflowError(str(wf.source), f"must yield a list, not {items!r}", step.label, "loop")]
            )
        parent = self._record(step, idx, StepState.RUNNING, args={"items": items}, undo=False)
        self.callbacks.on_step_start(self.task_id, parent)
        results: list[Any] = []
        for n, item in enumerate(items, start=1):
            self.check_cancelled()
            child, item_scope = f"{idx}.loop{n}", {**scope, "item": item}
            done = self._done.get(child)
            if done is not None and done.state is StepState.SKIPPED:
                results.append(None)
            elif (
                per_item_when
                and (done is None or done.state is not StepState.COMPLETED)
                and not self._condition(wf, step, item_scope)
            ):
                self._skip(step, child, f"when: {step.when}")
                results.append(None)
            else:
                results.append(self._run_one(wf, step, child, item_scope))
        self._finish(step, idx, StepState.COMPLETED, args={"items": items}, result=results, undo=False)
        return True, results

    def run_point(self, wf: Workflow, step: StepSpec, idx: str, scope: dict[str, Any]) -> dict[str, Any]:
        """Run the hooks of the point ``step`` (recorded at ``idx``); returns its registered result."""
        image = self._render(wf, step, step.args, scope, "with")["image"]
        if not isinstance(image, dict) or not isinstance(image.get("path"), str):
            raise invalid(
                [
                    WorkflowError(
                        str(wf.source),
                        f"must be a mapping with a 'path', not {image!r}",
                        step.label,
                        "with.image",
                    )
                ]
            )
        names = [h.name for h in step.hook_steps]
        args = {"image": image, "hooks": names}
        parent = self._record(step, idx, StepState.RUNNING, args=args, undo=False)
        self.callbacks.on_step_start(self.task_id, parent)
        try:
            for hook in step.hook_steps:
                self.check_cancelled()
                result = self._run_one(
                    wf, hook, f"{idx}/hook/{hook.index}", {"image": image, "task": scope["task"]}
                )
                image = next_image(hook.name, image, result)
        except (StoreUnavailable, LeaseLost):
            raise  # not the hook's failure: the run stops (and resumes, or not here) (Engine._drive)
        except ImagingError as exc:
            error = getattr(exc, "error", exc)  # a StepFailure carries the hook's own error
            self._finish(step, idx, StepState.FAILED, args=args, error=error.to_dict(), undo=False)
            raise
        result = {"image": image, "hooks": names}
        self._finish(step, idx, StepState.COMPLETED, args=args, result=result, undo=False)
        return result

    def _run_one(self, wf: Workflow, step: StepSpec, idx: str, scope: dict[str, Any]) -> Any:
        """Run a single action (with retries) or include; returns its result."""
        previous = self._done.get(idx)
        if previous is not None and previous.state is StepState.COMPLETED:
            return previous.result
        if step.include is not None:
            return self._run_include(wf, step, idx, scope)
        if step.hooks is not None:
            return self.run_point(wf, step, idx, scope)
        try:
            args = self._render(wf, step, step.args, scope, "with")
            assert step.action is not None  # the loader gives every step an action, an include or hooks
            cls = self.registry.get(step.action)
            self._validate_args(wf, step, cls, args)
        except ImagingError as exc:
            self._finish(step, idx, StepState.FAILED, error=exc.to_dict())
            if isinstance(exc, WorkflowInvalid):
                raise  # it names the step already
            raise StepFailure(exc, step.name) from exc
        attempts = step.retries + 1
        for attempt in range(1, attempts + 1):
            record = self._record(step, idx, StepState.RUNNING, args=args, attempts=attempt)
            self.callbacks.on_step_start(self.task_id, record)
            self.store.update_progress(self.task_id, status_message=f"running step {step.name!r}")
            try:
                result, abandoned = self._call(step, idx, cls, args)
            except (StoreUnavailable, LeaseLost):
                # The task database went away under the step (its ledger could not be written), or
                # another worker owns the task now: not the step's failure, and nothing can be
                # recorded. The run stops (Engine._drive); the step runs again when the task resumes.
                raise
            except ImagingError as exc:
                error, abandoned = exc, getattr(exc, "abandoned", False)
            except Exception as exc:  # a plugin's bug or an unexpected OS error: coded as StepFailed
                error, abandoned = self._unexpected(step, idx, exc), False
            else:
                try:
                    return self._finish(
                        step, idx, StepState.COMPLETED, args=args, result=result, attempts=attempt
                    ).result
                except UsageError as exc:  # the result is not JSON data
                    error, abandoned = (
                        StepFailed(f"returned a result that cannot be stored: {exc.message}"),
                        False,
                    )
            failed = self._finish(
                step, idx, StepState.FAILED, args=args, error=error.to_dict(), attempts=attempt
            )
            self._release_reservations(idx)
            if isinstance(error, ImageRejected):
                self._keep_findings(error.findings)
            cancelled = isinstance(error, Cancelled) or self.cancel.is_set()
            if cancelled or attempt == attempts or abandoned:
                if cancelled:
                    self.cancel.set()
                    raise Cancelled(f"the task was cancelled during step {step.name!r}") from error
                raise StepFailure(error, step.name) from error
            self._emit(
                "step.retry", {"step": idx, "name": step.name, "attempt": attempt, "error": failed.error}
            )
            if self.cancel.wait(step.retry_delay):
                raise Cancelled(f"the task was cancelled while step {step.name!r} waited to retry")
        raise AssertionError("unreachable")

    def _run_include(self, wf: Workflow, step: StepSpec, idx: str, scope: dict[str, Any]) -> dict[str, Any]:
        included = step.include
        assert included is not None
        args = self._render(wf, step, step.args, scope, "with")
        try:
            params = included.resolve_params(args)
        except UsageError as exc:
            raise invalid([WorkflowError(str(wf.source), exc.message, step.label, "with")]) from None
        parent = self._record(step, idx, StepState.RUNNING, args=params, undo=False)
        self.callbacks.on_step_start(self.task_id, parent)
        registered = self._run_steps(included, self._scope(params, included), f"{idx}/include/")
        self._finish(step, idx, StepState.COMPLETED, args=params, result=registered, undo=False)
        return registered

    def _call(self, step: StepSpec, idx: str, cls: type, args: dict[str, Any]) -> tuple[Any, bool]:
        """Run ``cls().run`` in a thread, enforcing cancel and timeout; returns (result, abandoned)."""
        step_cancel = threading.Event()
        ctx = self.context(idx, step.name, step_cancel)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = cls().run(ctx, **args)
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"step {self.task_id}/{idx}", daemon=True)
        thread.start()
        deadline = None if step.timeout is None else time.monotonic() + step.timeout
        timed_out = False
        give_up_at: float | None = None
        while thread.is_alive():
            thread.join(0.05)
            now = time.monotonic()
            if self.cancel.is_set() and not step_cancel.is_set():
                step_cancel.set()
                give_up_at = now + self.engine.timeout_grace
                self._stopping(step, idx, "suspend" if self.suspended else "cancel")
            if deadline is not None and not timed_out and now >= deadline:
                timed_out = True
                step_cancel.set()
                give_up_at = now + self.engine.timeout_grace
                self._stopping(step, idx, "timeout")
            if give_up_at is not None and now >= give_up_at and thread.is_alive():
                self._emit(
                    "step.abandoned",
                    {
                        "step": idx,
                        "name": step.name,
                        "message": "the step did not stop when asked; left running",
                    },
                )
                exc: ImagingError = (
                    StepTimeout(f"step {step.name!r} timed out after {step.timeout:g} s and did not stop")
                    if timed_out
                    else Cancelled(f"step {step.name!r} did not stop when cancelled")
                )
                exc.abandoned = True  # type: ignore[attr-defined]
                raise exc
        if "error" not in box:
            return box.get("result"), False
        error = box["error"]
        if timed_out:
            raise StepTimeout(f"step {step.name!r} timed out after {step.timeout:g} s") from error
        if isinstance(error, ImagingError):
            raise error
        if isinstance(error, Exception):
            raise self._unexpected(step, idx, error) from error
        raise StepFailed(f"step raised {type(error).__name__}") from error

    def _stopping(self, step: StepSpec, idx: str, reason: str) -> None:
        """Record that step ``idx`` was asked to stop (``suspend``, ``cancel`` or ``timeout``): what it
        does from here on is its way of stopping (and an abandoned step's event follows this one)."""
        self._emit("step.stopping", {"step": idx, "name": step.name, "reason": reason}, notify=False)

    def _unexpected(self, step: StepSpec, idx: str, exc: Exception) -> StepFailed:
        """``StepFailed`` for an uncoded exception; its type and text only reach the log and the
        ``step.exception`` event (a library's text is for programmers, not for EC2 clients)."""
        log.error("task %s: step %s (%s) raised %r", self.task_id, idx, step.name, exc, exc_info=exc)
        self._emit(
            "step.exception",
            {
                "step": idx,
                "name": step.name,
                "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "message": str(exc)[:EXCEPTION_TEXT_CHARS],
            },
        )
        return StepFailed(UNEXPECTED_MESSAGE)

    # -- helpers -----------------------------------------------------------------------------

    def _keep_findings(self, findings: list[Finding]) -> None:
        """Add a rejection's findings to the task's (a step may have stored them already)."""
        self.store.add_findings(self.task_id, findings)

    def _when_uses_item(self, step: StepSpec) -> bool:
        return isinstance(step.when, str) and "item" in self.templater.condition_names(step.when)

    def _condition(self, wf: Workflow, step: StepSpec, scope: dict[str, Any]) -> bool:
        if step.when is None:
            return True
        try:
            return bool(self.templater.condition(step.when, scope))
        except TemplateProblem as exc:
            raise invalid([WorkflowError(str(wf.source), exc.message, step.label, exc.field)]) from None

    def _render(self, wf: Workflow, step: StepSpec, value: Any, scope: dict[str, Any], field: str) -> Any:
        try:
            return self.templater.render(value, scope, field)
        except TemplateProblem as exc:
            raise invalid([WorkflowError(str(wf.source), exc.message, step.label, exc.field)]) from None

    @staticmethod
    def _validate_args(wf: Workflow, step: StepSpec, cls: type, args: dict[str, Any]) -> None:
        schema = getattr(cls, "schema", None)
        if schema is None:
            return
        errors = [
            WorkflowError(
                str(wf.source),
                e.message.replace("is a required property", "is required"),
                step.label,
                ".".join(["with", *(str(p) for p in e.absolute_path)]),
            )
            for e in jsonschema.Draft202012Validator(schema).iter_errors(args)
        ]
        if errors:
            raise invalid(errors)
