"""Cleaning up after a task run: interrupted steps, partial outputs, undo, the scratch directory,
and accounting for every resource the cleanup ledger leaves open.

Undo works from the store, not from the workflow: the ``completed`` step records, newest first,
with the args and result they were recorded with. It therefore also works for a task whose
workflow file has changed or disappeared since it started.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .. import partials
from ..errors import ImagingError
from ..scratch import ScratchSpace
from ..store import StepRecord, StepState
from .registry import StepUnavailable
from .runstate import RunState


class RunCleanup(RunState):
    """What a :class:`~.runner.TaskRun` does after (or instead of) executing its workflow."""

    def mark_interrupted(self) -> list[StepRecord]:
        """Mark steps left ``running`` by a dead worker as failed, and give back the scratch they had
        reserved; returns them (innermost last)."""
        interrupted = [r for r in self.store.step_results(self.task_id) if r.state is StepState.RUNNING]
        for r in interrupted:
            error = {"code": "Interrupted", "message": "the worker running this step died"}
            self._done[r.idx] = self.store.set_step_state(self.task_id, r.idx, StepState.FAILED, error=error)
            self._release_reservations(r.idx)
        return interrupted

    def sweep_partials(self, *, resumable: bool = True) -> list[Path]:
        """Remove the partial outputs a killed process of this task left behind (its ledger names them;
        each removal is ledgered). Only for a task no live process runs: :meth:`Engine.resume` calls it,
        leaving those a step keeps to resume (``resumable``); the task's end calls it for the rest."""
        removed = partials.sweep(self.store, task_id=self.task_id, resumable=resumable)
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
