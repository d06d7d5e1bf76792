"""A task run's state, its step records, and the hooks its steps report through.

:class:`RunState` is the part of a :class:`~.runner.TaskRun` that the steps see: the records it
writes for every step (``running``, then ``completed``/``failed``/``skipped``), the events, and the
:class:`~.step.StepHooks` a :class:`~.step.StepContext` calls: progress (throttled into the task
row and the events), ledger entries, lease fencing, checkpoints, and the task's scratch space.
Executing the workflow is :mod:`.runner`'s; cleaning up after it is :mod:`.cleanup`'s.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..config import Config
from ..errors import ImagingError, LeaseLost, StoreUnavailable, UsageError
from ..scratch import ScratchSpace, TaskScratch
from ..store import Lease, StepRecord, StepState, Store, Task
from .callbacks import EngineCallbacks
from .loader import WorkflowLoader
from .model import StepSpec
from .registry import Registry
from .step import StepContext
from .templating import Templater

log = logging.getLogger(__name__)


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


#: step progress is written to the task row at most this often (the last value always wins)
PROGRESS_DB_INTERVAL = 0.5
#: and queued as an event at most this often
PROGRESS_EVENT_INTERVAL = 2.0


class TaskVars:
    """``task`` in templates: ``task.id`` and ``task.workdir`` (the scratch dir, created on use)."""

    def __init__(self, run: RunState) -> None:
        self._run = run

    @property
    def id(self) -> str:
        return self._run.task_id

    @property
    def workdir(self) -> str:
        return str(self._run.scratch().path)


class RunState:
    """A task run's state and records; the :class:`~.step.StepHooks` of its steps' contexts."""

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
        #: when (monotonic) the progress held back now began to be held (None: none is)
        self._held_since: float | None = None
        #: called when progress begins to be held back (the supervisor wakes to write it when it is due)
        self.on_progress_held: Callable[[], None] | None = None
        self._progress_lock = threading.Lock()
        #: id(workflow) -> resource name -> cached file (set by :meth:`_fetch_resources`)
        self._resources: dict[int, dict[str, str]] = {}

    # -- step records and events -------------------------------------------------------------

    def _action_name(self, step: StepSpec) -> str:
        if step.hooks is not None:
            return f"hooks:{step.hooks}"
        return step.action or f"include:{step.include_ref}"

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

    def _write_progress(self, progress: dict[str, Any], idx: str) -> None:
        """The task's progress, and the progress of its step ``idx`` (which reported it)."""
        self.store.update_progress(
            self.task_id,
            step=idx,
            phase=progress.get("phase"),
            bytes_done=progress.get("done"),
            bytes_total=progress.get("total"),
            percent=progress.get("percent"),
            bytes_converted=progress.get("converted"),
        )

    def flush_progress(self) -> None:
        """Write the newest progress that throttling held back (called by the supervisor): a step that
        stalls right after a burst of updates must not leave the task showing old figures. What cannot
        be written (the task database is away) is kept for the next flush, held from now."""
        with self._progress_lock:
            pending, self._pending_progress, self._held_since = self._pending_progress, {}, None
        left = list(pending.items())
        while left:
            idx, progress = left[0]
            try:
                self._write_progress(progress, idx)
            except StoreUnavailable:
                with self._progress_lock:  # a newer figure the step held meanwhile wins over these
                    for held_idx, held in left:
                        self._hold(held_idx, self._pending_progress.get(held_idx, held))
                raise
            left.pop(0)

    def progress_held_since(self) -> float | None:
        """When (monotonic) the progress that throttling holds back began to be held; None: none is.
        The supervisor writes it once it has been held as long as the throttle's interval."""
        with self._progress_lock:
            return self._held_since

    def _hold(self, idx: str, progress: dict[str, Any]) -> None:
        # (under the progress lock)
        if not self._pending_progress:
            self._held_since = time.monotonic()
            if self.on_progress_held is not None:
                self.on_progress_held()  # (an Event's set: never blocks)
        self._pending_progress[idx] = progress

    def _unhold(self, idx: str) -> None:
        # (under the progress lock)
        self._pending_progress.pop(idx, None)
        if not self._pending_progress:
            self._held_since = None

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
                    self._unhold(ctx.idx)
                self._write_progress(progress, ctx.idx)
                last_db = now
            except LeaseLost:
                self.lose_lease()
                raise
            except StoreUnavailable:
                with self._progress_lock:
                    self._hold(ctx.idx, progress)
        else:
            with self._progress_lock:
                self._hold(ctx.idx, progress)
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
