"""What a step class is, and the context the engine hands it.

A step class needs only ``run(self, ctx, **args)`` returning JSON data (its registered result).
Optional: a class attribute ``schema`` (jsonschema of its ``with`` arguments), ``undo(self, ctx,
args, result)`` to reverse what a completed run did, and ``plan(self, ctx, **args)`` describing
what it would do in a dry run (``scratch_bytes`` in that dict is summed into the plan's total).
Deriving from :class:`Step` is optional but documents the contract.

Steps must watch ``ctx.cancel`` (or call ``ctx.check_cancelled()``/``ctx.sleep()``) and raise
:class:`~appliance.errors.Cancelled` promptly when it is set: it is set when the task is cancelled
and when the step's ``timeout`` expires.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ..config import Config
from ..errors import Cancelled, UsageError
from ..scratch import TaskScratch
from ..store import Store

#: what ``ctx.workdir`` and ``{{ task.workdir }}`` are in a dry run (nothing is created then)
DRY_RUN_WORKDIR = "<scratch dir>"


class Step:
    """Base class for workflow steps."""

    #: jsonschema of the ``with`` arguments (validated after rendering; statically when possible)
    schema: ClassVar[dict[str, Any] | None] = None

    # ``*_: Any, **args: Any`` lets a step declare the arguments it takes (``def run(self, ctx,
    # seconds: float)``): mypy accepts any such override of this signature
    def run(self, ctx: StepContext, *_: Any, **args: Any) -> Any:
        raise NotImplementedError

    def plan(self, ctx: StepContext, *_: Any, **args: Any) -> dict[str, Any]:
        """What the step would do; by default its rendered arguments. Must have no side effects."""
        return dict(args)


class StepHooks(Protocol):
    """What a :class:`StepContext` reports to (implemented by the engine and the planner)."""

    def progress(self, ctx: StepContext, progress: dict[str, Any]) -> None: ...

    def event(self, ctx: StepContext, kind: str, data: dict[str, Any]) -> None: ...

    def ledger(self, ctx: StepContext, action: str, resource: str) -> None: ...

    def scratch(self) -> TaskScratch: ...

    def fence(self, ctx: StepContext) -> None: ...

    def save_checkpoint(self, ctx: StepContext, data: dict[str, Any]) -> None: ...

    def load_checkpoint(self, ctx: StepContext) -> dict[str, Any] | None: ...


def progress_dict(progress: Any) -> dict[str, Any]:
    """Accept an :class:`appliance.progress.Progress`, anything with ``to_dict()``, or a dict."""
    if hasattr(progress, "to_dict"):
        progress = progress.to_dict()
    if not isinstance(progress, dict):
        raise TypeError(f"progress must be a Progress or a dict, not {type(progress).__name__}")
    return dict(progress)


class StepContext:
    """Everything a running step may use: ids, config, store, scratch, cancel, reporting."""

    def __init__(
        self,
        *,
        task_id: str,
        config: Config,
        store: Store | None,
        cancel: threading.Event,
        idx: str,
        name: str,
        hooks: StepHooks,
        dry_run: bool = False,
    ) -> None:
        self.task_id = task_id
        self.config = config
        self.store = store
        self.cancel = cancel
        #: the step's path in the task (``"3"``, ``"2.loop1"``, ``"4/include/1"``)
        self.idx = idx
        self.name = name
        self.dry_run = dry_run
        self._hooks = hooks

    @property
    def scratch(self) -> TaskScratch:
        """The task's scratch directory and reservations (created on first use). Reservations made
        through it belong to this step: the engine releases them when an attempt of the step fails or
        is interrupted, and they stay while the step's result does (until its undo or the task's end)."""
        if self.dry_run:
            raise UsageError("scratch space is not available in a dry run")
        return self._hooks.scratch().for_step(self.idx)

    @property
    def workdir(self) -> Path:
        """The task's private scratch directory (created on first use; a placeholder in a dry run)."""
        if self.dry_run:
            return Path(DRY_RUN_WORKDIR)
        return self.scratch.path

    def progress(self, progress: Any) -> None:
        """Report progress: an ``appliance.progress.Progress`` or a dict with
        ``phase, done, total, percent`` (bytes; any may be missing) and, for work that writes
        the result, ``converted``: bytes written to the target so far (monotonic over the task)."""
        self._hooks.progress(self, progress_dict(progress))

    def event(self, kind: str, **data: Any) -> None:
        """Emit a task event (queued for the controller, shown by the CLI)."""
        self._hooks.event(self, kind, data)

    def ledger_created(self, resource: str | Path) -> None:
        """Record that this step created ``resource`` (a path or another resource id)."""
        self._hooks.ledger(self, "created", str(resource))

    def ledger_removed(self, resource: str | Path) -> None:
        """Record that this step (or its undo) removed ``resource``."""
        self._hooks.ledger(self, "removed", str(resource))

    def fence(self) -> None:
        """Raise :class:`~appliance.errors.LeaseLost` unless this run still holds the task's lease.
        Call it right before a point of no return on the target (finalising a volume, publishing an
        object): an owner that lost the task to another worker must not finalise anything."""
        self._hooks.fence(self)

    def save_checkpoint(self, data: dict[str, Any]) -> None:
        """Keep where this step got to (a JSON object: the last verified part, an offset) in the task
        database, fenced by the run's lease (:meth:`appliance.store.Store.save_checkpoint`); the
        worker that resumes the task, here or on another appliance, reads it with
        :meth:`load_checkpoint`. Raises :class:`~appliance.errors.LeaseLost` if the lease is lost."""
        self._hooks.save_checkpoint(self, data)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """This step's last checkpoint in this task (from an earlier attempt or owner), or None."""
        return self._hooks.load_checkpoint(self)

    @property
    def suspending(self) -> bool:
        """Whether the run is being suspended (the worker shuts down and the task resumes later), not
        cancelled: a step stopped by :attr:`cancel` may then keep what its next run continues."""
        return bool(getattr(self._hooks, "suspended", False))

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` if the step should stop."""
        if self.cancel.is_set():
            raise Cancelled(f"step {self.name!r} was cancelled")

    def sleep(self, seconds: float) -> None:
        """Sleep, waking at once (with :class:`Cancelled`) if the step is cancelled."""
        if self.cancel.wait(max(0.0, seconds)):
            raise Cancelled(f"step {self.name!r} was cancelled")
