"""The workflow engine: submit, run, resume, recover and dry-run tasks.

Lifecycle of a task run by :meth:`Engine.run`::

    pending --claim--> running --steps ok--> completed
                          |--step fails--> (undo) --> failed
                          `--cancel------> cancelling --(undo)--> cancelled  (failed if an undo fails)

On every ending the task's scratch directory is removed. On failure or cancel the completed
steps are undone newest first, and the cleanup ledger records what was created, removed and
leaked. A cancel is requested from anywhere with ``Store.request_cancel`` (the engine's
supervisor notices within ``poll_interval``) or by SIGINT/SIGTERM to the engine's process.

If the engine's process dies, :meth:`Engine.recover` (run at worker start) finds the task by
its dead owner or expired lease and resumes it (the partial outputs the dead process left are
removed and the scratch its interrupted steps reserved is given back first): a ``running`` task
continues after its last completed step (re-running the interrupted one), a ``cancelling`` one
is undone and ends ``cancelled``, and a task of a workflow declaring ``resumable: false`` is
undone and ends ``failed`` with a message naming the interrupted step. No task is left ``running`` forever.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..artifacts.refs import ArtifactError
from ..artifacts.store import ArtifactStore
from ..config import Config, HooksConfig
from ..errors import (
    Cancelled,
    ImagingError,
    IncorrectState,
    LeaseLost,
    StepFailed,
    StoreUnavailable,
    UsageError,
    WorkflowInvalid,
)
from ..store import REPORTER_RECORD, Lease, Store, Task, TaskState, new_task_id
from .callbacks import CompositeCallbacks, EngineCallbacks
from .hookpoints import points_used, record_hooks, recorded_hooks
from .loader import WorkflowLoader
from .model import Workflow
from .planner import Planner
from .plugins import ensure_plugins
from .registry import Registry, default_registry
from .runner import TaskRun
from .supervisor import find_orphans, orphan_reason, owner_id, supervised
from .templating import Templater

log = logging.getLogger(__name__)

#: the error code of a task whose worker died in a workflow that cannot be resumed
INTERRUPTED = "TaskInterrupted"
#: the error code of a cancelled task whose undo did not fully succeed
CLEANUP_FAILED = "CleanupFailed"


class Engine:
    """Runs workflow tasks recorded in a :class:`Store`.

    ``callbacks`` (one or several :class:`EngineCallbacks`) receive every state change, step
    start/progress/end and event. ``poll_interval`` is how often a running task checks the store
    for a cancel request; ``timeout_grace`` how long a step may take to stop once asked (after
    its timeout or a cancel) before it is abandoned.
    """

    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        *,
        registry: Registry | None = None,
        loader: WorkflowLoader | None = None,
        callbacks: EngineCallbacks | Iterable[EngineCallbacks] | None = None,
        poll_interval: float = 0.3,
        timeout_grace: float = 10.0,
        on_lease_lost: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._store = store
        self._owns_store = store is None
        self.registry = registry or (loader.registry if loader else default_registry())
        self.templater = loader.templater if loader else Templater()
        self.loader = loader or WorkflowLoader(
            config.workflow_dirs,
            registry=self.registry,
            templater=self.templater,
            artifacts=ArtifactStore.from_config(config),
            hooks=config.hooks,
        )
        ensure_plugins(self.registry, config)
        if callbacks is None:
            callbacks = []
        elif isinstance(callbacks, EngineCallbacks):
            callbacks = [callbacks]
        self.callbacks = CompositeCallbacks(*callbacks)
        self.poll_interval = poll_interval
        self.timeout_grace = timeout_grace
        #: called when a run learns that another worker claimed its task (the worker's task
        #: process kills itself and what it started; in-process runs just stop)
        self.on_lease_lost = on_lease_lost

    @property
    def store(self) -> Store:
        """The task store (``config.store`` unless given), opened on first use: a dry run never
        creates a database."""
        if self._store is None:
            self._store = Store(self.config.store)
        return self._store

    @property
    def owner(self) -> str:
        """This engine as a task owner (``hostname:pid``; computed each time, so forks differ)."""
        return owner_id()

    def close(self) -> None:
        """Close the store if this engine opened it."""
        if self._store is not None and self._owns_store:
            self._store.close()
            self._store = None

    # -- entry points --------------------------------------------------------------------------

    def load(self, workflow_ref: str | Path) -> Workflow:
        """Load and validate a workflow by name or path."""
        return self.loader.load(workflow_ref)

    def submit(
        self,
        workflow_ref: str | Path,
        params: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
        kind: str = "workflow",
        coerce_strings: bool = False,
        max_active: int | None = None,
        client_token: str | None = None,
        client_account: str = "",
    ) -> str:
        """Validate the workflow and params and create a ``pending`` task; returns its id.

        A path reference is stored resolved (absolute), a name as the name, so a resumed task
        finds the same file. ``max_active``, ``client_token`` and ``client_account`` are
        :meth:`Store.create_task`'s: with a token already used for the same request, the id of
        the task created then.
        """
        workflow = self.loader.load(workflow_ref)
        resolved = workflow.resolve_params(params, coerce_strings=coerce_strings)
        ref = str(workflow.source) if self.loader.is_path(workflow_ref) else str(workflow_ref)
        task_id = task_id or new_task_id()
        task = self.store.create_task(
            kind,
            ref,
            resolved,
            task_id=task_id,
            max_active=max_active,
            client_token=client_token,
            client_account=client_account,
        )
        if task.id != task_id:
            return task.id  # a repeated request: its task was recorded (hooks and all) the first time
        points = points_used(workflow)
        if points:
            # The task runs (and resumes) with the hooks configured now, whatever the config says later.
            recorded = {
                p: h for p, h in (self.loader.hooks or HooksConfig()).to_dict().items() if p in points
            }
            record_hooks(self.store, task.id, recorded)
        self.callbacks.on_task_state(task)
        return task.id

    def run(self, task_id: str, *, lease: Lease | None = None) -> Task:
        """Run a ``pending`` task in this process until it ends; returns the final task.

        With ``lease``, the task was claimed already (by the worker, :meth:`Store.claim_pending`):
        this process takes that lease over (:meth:`Store.adopt`, :class:`LeaseLost` if another
        worker claimed the task meanwhile) and runs it."""
        if lease is not None:
            return self._run_adopted(task_id, lease)
        task = self.store.get_task(task_id)
        if task.state is not TaskState.PENDING:
            raise IncorrectState(
                f"task {task_id} is {task.state}; only a pending task can be run "
                "(an interrupted one is resumed)"
            )
        try:
            workflow = self._task_workflow(task)
            params = workflow.resolve_params(task.params)
        except (WorkflowInvalid, UsageError, ArtifactError) as exc:
            failed = self.store.set_state(
                task_id,
                TaskState.FAILED,
                expected=TaskState.PENDING,
                error_code=exc.code,
                error_message=exc.message,
            )
            self.callbacks.on_task_state(failed)
            return failed
        task = self.store.claim(task_id, self.owner, self.config.lease_seconds)
        self.callbacks.on_task_state(task)
        return self._drive(TaskRun(self, task), workflow, params)

    def _run_adopted(self, task_id: str, lease: Lease) -> Task:
        task = self.store.adopt(task_id, lease, self.owner, self.config.lease_seconds)
        self.callbacks.on_task_state(task)
        run = TaskRun(self, task)
        if task.state is TaskState.CANCELLING:
            return self._drive(run, None, {}, abort=Cancelled("cancelled before it started"))
        try:
            workflow = self._task_workflow(task)
            params = workflow.resolve_params(task.params)
        except (WorkflowInvalid, UsageError, ArtifactError) as exc:
            return self._drive(run, None, {}, abort=exc)
        return self._drive(run, workflow, params)

    def resume(self, task_id: str, *, reason: str | None = None) -> Task:
        """Take over an orphaned ``running``/``cancelling`` task and bring it to an end here."""
        task = self.store.get_task(task_id)
        if task.state not in (TaskState.RUNNING, TaskState.CANCELLING):
            raise IncorrectState(
                f"task {task_id} is {task.state}; only a running or cancelling task can be resumed"
            )
        reason = reason or orphan_reason(task)
        if reason is None:
            raise IncorrectState(
                f"task {task_id} is still owned by {task.owner} (lease until {task.lease_expires_at})"
            )
        previous_owner = task.owner
        task = self.store.claim(task_id, self.owner, self.config.lease_seconds, expected_owner=previous_owner)
        self.store.add_event(task_id, "task.resumed", {"previous_owner": previous_owner, "reason": reason})
        self.callbacks.on_event(task_id, "task.resumed", {"previous_owner": previous_owner, "reason": reason})
        run = TaskRun(self, task)
        interrupted = run.mark_interrupted()
        run.sweep_partials()
        if task.state is TaskState.CANCELLING:
            return self._drive(
                run, None, {}, abort=Cancelled("cancel requested before the previous worker died")
            )
        try:
            workflow = self._task_workflow(task)
            params = workflow.resolve_params(task.params)
        except (WorkflowInvalid, UsageError, ArtifactError) as exc:
            return self._drive(run, None, {}, abort=exc)
        if not workflow.resumable:
            where = f"during step {interrupted[-1].name!r}" if interrupted else "between steps"
            message = (
                f"the worker running this task died {where}; workflow {workflow.name!r} is not resumable, "
                "so its completed steps were undone; submit it again"
            )
            return self._drive(run, None, {}, abort=StepFailed(message, INTERRUPTED))
        return self._drive(run, workflow, params)

    def recover(self) -> list[Task]:
        """Resume every orphaned task (dead owner on this host, or expired lease); returns them ended."""
        ended = []
        for task, reason in find_orphans(self.store):
            log.warning("task %s: recovering because %s", task.id, reason)
            try:
                ended.append(self.resume(task.id, reason=reason))
            except IncorrectState as exc:  # another recoverer was faster
                log.info("task %s: not recovered here: %s", task.id, exc.message)
        return ended

    def plan(
        self,
        workflow_ref: str | Path,
        params: Mapping[str, Any] | None = None,
        *,
        coerce_strings: bool = False,
    ) -> dict[str, Any]:
        """Dry run (see :mod:`appliance.workflow.planner`): no task, no scratch, no files."""
        workflow = self.loader.load(workflow_ref)
        resolved = workflow.resolve_params(params, coerce_strings=coerce_strings)
        return Planner(self.config, self.registry, self.templater).plan(workflow, resolved)

    def _task_workflow(self, task: Task) -> Workflow:
        if not task.workflow:
            raise UsageError(f"task {task.id} ({task.kind}) has no workflow to run")
        recorded = recorded_hooks(self.store, task.id)
        loader = self.loader if recorded is None else self.loader.with_hooks(recorded)
        return loader.load(task.workflow)

    # -- driving a run to its end ---------------------------------------------------------------

    def _drive(
        self,
        run: TaskRun,
        workflow: Workflow | None,
        params: dict[str, Any],
        *,
        abort: ImagingError | None = None,
    ) -> Task:
        run.on_lease_lost = self.on_lease_lost
        release = False
        with supervised(run, self.owner, self.config.lease_seconds, self.poll_interval):
            error: ImagingError | None = None
            result: Any = None
            try:
                self._note_reporter(run)
                if abort is not None:
                    raise abort
                assert workflow is not None
                result = run.execute(workflow, params)
                run.check_cancelled()
            except ImagingError as exc:
                error = exc
            except Exception as exc:  # a bug: still end the task and clean up
                log.exception("task %s: internal error", run.task_id)
                error = ImagingError(f"internal error: {type(exc).__name__}: {exc}")
            if isinstance(error, LeaseLost) or run.lost_lease:
                # Another worker claimed the task (this one was stopped or cut off past its lease):
                # it owns the task and its target now. Nothing is undone or recorded here (the store
                # would refuse it anyway), and nothing more is done to the target.
                log.error("task %s: stopped, another worker owns it now", run.task_id)
                raise (
                    error
                    if isinstance(error, LeaseLost)
                    else LeaseLost(f"task {run.task_id}: another worker owns it now; this run stopped")
                )
            if isinstance(error, StoreUnavailable):
                # The task database went away mid-run. Nothing is undone and nothing is recorded
                # (it could not be): the task keeps this process as its owner, and once the
                # database is back the worker finds that owner gone and resumes the task from its
                # last completed step. Stop here.
                log.warning(
                    "task %s: stopping, the task database is unreachable: %s", run.task_id, error.message
                )
                raise error
            if run.suspended and error is not None:
                # The worker is shutting down: nothing is undone; the next recover() resumes the
                # task from its last completed step (the interrupted one runs again). Released once
                # the supervisor stopped (it would take the ownerless task for a lost lease).
                release = True
            else:
                return self._end(run, result, error)
        if release:
            self.store.release(run.task_id, self.owner)
        return self.store.get_task(run.task_id)

    def _note_reporter(self, run: TaskRun) -> None:
        """Record which appliance runs the task now (push reporting): its reporter delivers the task's
        messages from here on, also those another appliance queued and did not get out before this
        one took the task over (:mod:`appliance.report.push`). Fenced like every write of the run."""
        ctl = self.config.controller
        if ctl.mode == "push" and ctl.appliance_id:
            self.store.set_record(run.task_id, REPORTER_RECORD, ctl.appliance_id)

    def _set_state(self, task_id: str, state: TaskState, **kw: Any) -> Task:
        task = self.store.set_state(task_id, state, **kw)
        self.callbacks.on_task_state(task)
        return task

    def _end(self, run: TaskRun, result: Any, error: ImagingError | None) -> Task:
        task_id = run.task_id
        if error is None:
            run.remove_scratch()
            # a partial an earlier run kept for a resume that this run did not take (e.g. its
            # checkpoint did not check out, so the stream started again into a new partial)
            run.sweep_partials(resumable=False)
            try:
                return self._set_state(
                    task_id,
                    TaskState.COMPLETED,
                    expected=TaskState.RUNNING,
                    result=result,
                    status_message="completed",
                )
            except IncorrectState:
                # A cancel arrived after the last step: honour it (undo what was done).
                error = Cancelled("cancelled after the last step finished")
        cancelled = isinstance(error, Cancelled)
        if cancelled:
            if run.signalled is not None:
                error = Cancelled(f"cancelled by {signal.Signals(run.signalled).name}")
            if self.store.get_task(task_id).state is TaskState.RUNNING:
                self.callbacks.on_task_state(self.store.request_cancel(task_id))
        self.store.update_progress(task_id, status_message="undoing completed steps")
        failures = run.undo()
        run.remove_scratch()
        run.sweep_partials(resumable=False)  # e.g. kept by a stopped step for a resume that never came
        run.reconcile()
        if cancelled and not failures:
            return self._set_state(
                task_id,
                TaskState.CANCELLED,
                status_message="cancelled",
                error_code=error.code,
                error_message=error.message,
            )
        message = error.message + ("; " + "; ".join(failures) if failures else "")
        return self._set_state(
            task_id,
            TaskState.FAILED,
            expected=[TaskState.RUNNING, TaskState.CANCELLING],
            status_message="failed",
            error_code=CLEANUP_FAILED if cancelled else error.code,
            error_message=("cancelled, but cleanup failed: " + message) if cancelled else message,
        )


def recover(store: Store, config: Config, **engine_kwargs: Any) -> list[Task]:
    """Resume every orphaned task of ``store`` in this process (see :meth:`Engine.recover`)."""
    return Engine(config, store, **engine_kwargs).recover()
