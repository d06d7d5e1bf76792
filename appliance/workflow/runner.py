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

Undo works from the store, not from the workflow: the ``completed`` step records, newest first,
with the args and result they were recorded with. It therefore also works for a task whose
workflow file has changed or disappeared since it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jsonschema

from .. import partials
from ..artifacts.resources import ResourceFetcher
from ..config import Config
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
from ..scratch import ScratchSpace, TaskScratch
from ..store import Lease, StepRecord, StepState, Store, Task
from .callbacks import EngineCallbacks
from .hookpoints import next_image
from .loader import WorkflowLoader
from .model import StepSpec, Workflow
from .registry import Registry, StepUnavailable
from .schema import WorkflowError, invalid
from .step import StepContext
from .templating import TemplateProblem, Templater


class RunHost(Protocol):
    """What a task run takes from the engine that starts it (an :class:`~.engine.Engine` is one)."""

    config: Config
    registry: Registry
    templater: Templater
    loader: WorkflowLoader
    #: seconds a step may keep running after its cancel before it is abandoned
    timeout_grace: float

    # read-only: the engine opens its store on first use and fans callbacks out to several
    @property
    def store(self) -> Store: ...

    @property
    def callbacks(self) -> EngineCallbacks: ...


log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

#: step progress is written to the task row at most this often (the last value always wins)
PROGRESS_DB_INTERVAL = 0.5
#: and queued as an event at most this often
PROGRESS_EVENT_INTERVAL = 2.0
#: the task message of a step that raised an exception nobody coded
UNEXPECTED_MESSAGE = (
    "an unexpected internal error (a bug); the operator finds its details in the task's "
    "step.exception event and in the worker log"
)
#: how much of such an exception's text the event keeps
EXCEPTION_TEXT_CHARS = 2000


class TaskVars:
    """``task`` in templates: ``task.id`` and ``task.workdir`` (the scratch dir, created on use)."""

    def __init__(self, run: TaskRun) -> None:
        self._run = run

    @property
    def id(self) -> str:
        return self._run.task_id

    @property
    def workdir(self) -> str:
        return str(self._run.scratch().path)


class StepFailure(ImagingError):
    """Carries the failing step's error and its label to the engine."""

    def __init__(self, error: ImagingError, step: str) -> None:
        super().__init__(f"step {step!r} failed: {error.message}", error.code)
        self.error = error
        self.step = step


class TaskRun:
    """One attempt at running (or cleaning up) a task in this process."""

    def __init__(self, engine: RunHost, task: Task) -> None:
        self.engine = engine
        self.store = engine.store
        self.config = engine.config
        self.registry = engine.registry
        self.templater = engine.templater
        self.callbacks = engine.callbacks
        self.task_id = task.id
        #: set by the supervisor (cancel requested in the store), signals, or a lost lease
        self.cancel = threading.Event()
        self.lost_lease = False
        #: the lease this run writes under (the task's when the run was set up)
        self.lease: Lease | None = task.lease
        #: called once when the run learns it lost the task (the worker's task process stops at once)
        self.on_lease_lost: Callable[[], None] | None = None
        #: set by SIGUSR1: the worker is shutting down; stop the step, keep the task for a resume
        self.suspended = False
        self.signalled: int | None = None
        self._done = {r.idx: r for r in self.store.step_results(task.id)}
        self._running: dict[str, StepRecord] = {}
        self._scratch: TaskScratch | None = None
        self._scratch_lock = threading.Lock()
        self._progress_times: dict[str, tuple[float, float]] = {}
        #: the newest throttled progress per step, written by :meth:`flush_progress`
        self._pending_progress: dict[str, dict[str, Any]] = {}
        self._progress_lock = threading.Lock()
        #: id(workflow) -> resource name -> cached file (set by :meth:`_fetch_resources`)
        self._resources: dict[int, dict[str, str]] = {}

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

    def _action_name(self, step: StepSpec) -> str:
        if step.hooks is not None:
            return f"hooks:{step.hooks}"
        return step.action or f"include:{step.include_ref}"

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

    def _record(self, step: StepSpec, idx: str, state: StepState, **kw: Any) -> StepRecord:
        kw.setdefault("undo", step.undo)
        record = self.store.record_step(
            self.task_id, idx, name=step.name, action=self._action_name(step), state=state, **kw
        )
        if state is StepState.RUNNING:
            self._running[idx] = record
            self._emit("step.start", {"step": idx, "name": step.name, "action": record.action}, notify=False)
        return record

    def _finish(self, step: StepSpec, idx: str, state: StepState, **kw: Any) -> StepRecord:
        record = self._record(step, idx, state, **kw)
        self._running.pop(idx, None)
        self._done[idx] = record
        data: dict[str, Any] = {"step": idx, "name": step.name, "state": str(state)}
        if record.error:
            data["error"] = record.error
        self._emit("step.end", data, notify=False)
        self.callbacks.on_step_end(self.task_id, record)
        return record

    def _skip(self, step: StepSpec, idx: str, reason: str) -> None:
        self._finish(step, idx, StepState.SKIPPED, result={"skipped": reason}, undo=False)

    def _emit(self, kind: str, data: dict[str, Any], *, notify: bool = True) -> None:
        self.store.add_event(self.task_id, kind, data)
        if notify:
            self.callbacks.on_event(self.task_id, kind, data)

    # -- step context hooks --------------------------------------------------------------------

    def context(self, idx: str, name: str, cancel: threading.Event) -> StepContext:
        return StepContext(
            task_id=self.task_id,
            config=self.config,
            store=self.store,
            cancel=cancel,
            idx=idx,
            name=name,
            hooks=self,
        )

    def _write_progress(self, progress: dict[str, Any]) -> None:
        self.store.update_progress(
            self.task_id,
            phase=progress.get("phase"),
            bytes_done=progress.get("done"),
            bytes_total=progress.get("total"),
            percent=progress.get("percent"),
            bytes_converted=progress.get("converted"),
        )

    def flush_progress(self) -> None:
        """Write the newest progress that throttling held back (called by the supervisor's poll):
        a step that stalls right after a burst of updates must not leave the task showing old figures.
        What cannot be written (the task database is away) is kept for the next flush."""
        with self._progress_lock:
            pending, self._pending_progress = self._pending_progress, {}
        for idx, progress in pending.items():
            try:
                self._write_progress(progress)
            except StoreUnavailable:
                with self._progress_lock:
                    self._pending_progress.setdefault(idx, progress)
                raise

    def progress(self, ctx: StepContext, progress: dict[str, Any]) -> None:
        """A step's progress: written to the task (throttled) and as an event (more throttled).
        Progress is worth no interruption: while the task database cannot be reached the figures
        wait for the supervisor's next flush and the step goes on."""
        now = time.monotonic()
        last_db, last_event = self._progress_times.get(ctx.idx, (0.0, 0.0))
        final = progress.get("total") is not None and progress.get("done") == progress.get("total")
        if final or now - last_db >= PROGRESS_DB_INTERVAL:
            try:
                with self._progress_lock:
                    self._pending_progress.pop(ctx.idx, None)
                self._write_progress(progress)
                last_db = now
            except LeaseLost:
                self.lose_lease()
                raise
            except StoreUnavailable:
                with self._progress_lock:
                    self._pending_progress[ctx.idx] = progress
        else:
            with self._progress_lock:
                self._pending_progress[ctx.idx] = progress
        if final or now - last_event >= PROGRESS_EVENT_INTERVAL:
            with contextlib.suppress(StoreUnavailable):
                self.store.add_event(self.task_id, "step.progress", {"step": ctx.idx, **progress})
                last_event = now
        self._progress_times[ctx.idx] = (last_db, last_event)
        record = self._running.get(ctx.idx)
        if record is not None:
            self.callbacks.on_step_progress(self.task_id, record, progress)

    def event(self, ctx: StepContext, kind: str, data: dict[str, Any]) -> None:
        self._emit(kind, {"step": ctx.idx, **data})

    def ledger(self, ctx: StepContext | None, action: str, resource: str) -> None:
        step = ctx.idx if ctx is not None else None
        self.store.add_ledger(self.task_id, action, resource, step)
        self.callbacks.on_event(
            self.task_id, "ledger", {"action": action, "resource": resource, "step": step}
        )

    def fence(self, ctx: StepContext) -> None:
        try:
            self.store.check_lease(self.task_id, self.lease)
        except LeaseLost:
            self.lose_lease()
            raise

    def save_checkpoint(self, ctx: StepContext, data: dict[str, Any]) -> None:
        if self.lease is None:
            raise UsageError(f"task {self.task_id} is not run under a lease: nothing to checkpoint with")
        try:
            self.store.save_checkpoint(
                self.task_id, ctx.idx, data, owner=self.lease.owner, epoch=self.lease.epoch
            )
        except LeaseLost:
            self.lose_lease()
            raise

    def load_checkpoint(self, ctx: StepContext) -> dict[str, Any] | None:
        return self.store.load_checkpoint(self.task_id, ctx.idx)

    def lose_lease(self) -> None:
        """Another worker owns the task now: stop (the step's cancel) and, the first time, tell
        :attr:`on_lease_lost`."""
        first = not self.lost_lease
        self.lost_lease = True
        self.cancel.set()
        if first:
            log.error("task %s: another worker owns it now (lease lost); stopping", self.task_id)
            if self.on_lease_lost is not None:
                self.on_lease_lost()

    def scratch(self) -> TaskScratch:
        with self._scratch_lock:
            if self._scratch is None:
                space = ScratchSpace.from_config(self.config)
                existed = (space.root / self.task_id).exists()
                self._scratch = space.for_task(self.task_id)
                if not existed:
                    self.ledger(None, "created", str(self._scratch.path))
            return self._scratch

    # -- cleaning up ---------------------------------------------------------------------------

    def mark_interrupted(self) -> list[StepRecord]:
        """Mark steps left ``running`` by a dead worker as failed, and give back the scratch they had
        reserved; returns them (innermost last)."""
        interrupted = [r for r in self.store.step_results(self.task_id) if r.state is StepState.RUNNING]
        for r in interrupted:
            error = {"code": "Interrupted", "message": "the worker running this step died"}
            self._done[r.idx] = self.store.set_step_state(self.task_id, r.idx, StepState.FAILED, error=error)
            self._release_reservations(r.idx)
        return interrupted

    def _release_reservations(self, idx: str) -> None:
        """Give back the scratch step ``idx`` reserved: an attempt that failed or was interrupted must not
        count against the quota again when the step runs next (it makes its output anew)."""
        if self._scratch is None and not (Path(self.config.scratch.root) / self.task_id).is_dir():
            return
        try:
            released = self.scratch().release_step(idx)
        except (OSError, ImagingError):
            log.exception("task %s: could not release the scratch of step %s", self.task_id, idx)
            return
        if released:
            self._emit("scratch.released", {"step": idx, "bytes": released}, notify=False)

    def sweep_partials(self) -> list[Path]:
        """Remove the partial outputs a killed process of this task left behind (its ledger names them;
        each removal is ledgered). Only for a task no live process runs: :meth:`Engine.resume` calls it."""
        removed = partials.sweep(self.store, task_id=self.task_id)
        for path in removed:
            self.callbacks.on_event(
                self.task_id,
                "ledger",
                {"action": "removed", "resource": str(path), "step": partials.RECOVERY_STEP},
            )
        return removed

    def undo(self) -> list[str]:
        """Undo completed steps newest first; returns descriptions of undos that failed."""
        failures = []
        records = self.store.step_results(self.task_id)
        for record in reversed(records):
            if record.state is not StepState.COMPLETED or not record.undo:
                continue
            try:
                cls = self.registry.get(record.action)
            except StepUnavailable as exc:
                failures.append(self._undo_failed(record, exc.message))
                continue
            if getattr(cls, "undo", None) is None:
                continue  # nothing to reverse (e.g. util.echo)
            ctx = self.context(record.idx, record.name, threading.Event())
            self._emit("step.undo", {"step": record.idx, "name": record.name})
            try:
                cls().undo(ctx, record.args or {}, record.result)
            except Exception as exc:
                message = exc.message if isinstance(exc, ImagingError) else f"{type(exc).__name__}: {exc}"
                failures.append(self._undo_failed(record, message))
                continue
            undone = self.store.set_step_state(self.task_id, record.idx, StepState.UNDONE)
            self.callbacks.on_step_end(self.task_id, undone)
        return failures

    def _undo_failed(self, record: StepRecord, message: str) -> str:
        failed = self.store.set_step_state(
            self.task_id, record.idx, StepState.UNDO_FAILED, error={"code": "UndoFailed", "message": message}
        )
        self.callbacks.on_step_end(self.task_id, failed)
        outstanding = [r for r in self.outstanding_resources() if r[1] == record.idx]
        for resource, step in outstanding:
            self.ledger_leaked(resource, step)
        if not outstanding:
            self.ledger_leaked(f"undo of step {record.name!r}", record.idx)
        return f"undo of step {record.name!r} failed: {message}"

    def ledger_leaked(self, resource: str, step: str | None) -> None:
        self.store.add_ledger(self.task_id, "leaked", resource, step)
        self.callbacks.on_event(
            self.task_id, "ledger", {"action": "leaked", "resource": resource, "step": step}
        )

    def outstanding_resources(self) -> list[tuple[str, str | None]]:
        """Resources the ledger says were created and not (yet) removed or reported leaked."""
        open_: dict[str, str | None] = {}
        for entry in self.store.ledger(self.task_id):
            if entry.action == "created":
                open_[entry.resource] = entry.step
            else:
                open_.pop(entry.resource, None)
        return list(open_.items())

    def remove_scratch(self) -> None:
        """Remove the task's scratch directory (and every reservation in it), ledgered."""
        path = Path(self.config.scratch.root) / self.task_id
        if self._scratch is None and not path.exists():
            return
        try:
            scratch = self._scratch or ScratchSpace.from_config(self.config).for_task(self.task_id)
            scratch.cleanup()
        except (OSError, ImagingError) as exc:
            self.ledger_leaked(str(path), None)
            self._emit("scratch.cleanup_failed", {"path": str(path), "error": str(exc)})
            return
        self._scratch = None
        self.ledger(None, "removed", str(path))

    def reconcile(self) -> None:
        """After a failed or cancelled run: account for every resource the ledger leaves open.

        A path that no longer exists is settled (files in the scratch dir went with it, and the
        scratch dir's removal is ledgered itself). Anything else still open is reported
        ``leaked``, unless its step had ``undo: false`` (kept on purpose, noted as an event).
        """
        keep = {r.idx for r in self.store.step_results(self.task_id) if not r.undo}
        for resource, step in self.outstanding_resources():
            if resource.startswith(os.sep) and not os.path.lexists(resource):
                continue
            if step in keep:
                self._emit("resource.kept", {"resource": resource, "step": step})
                continue
            self.ledger_leaked(resource, step)
