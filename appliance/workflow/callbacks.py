"""The one interface through which the engine reports what happens while a task runs.

The CLI prints through it, controller reporting plugs in through it, tests record through it.
Subclass :class:`EngineCallbacks` (every method is a no-op) and override what you need; combine
several with :class:`CompositeCallbacks`. Callbacks run on the engine's threads (step progress on
the step's thread), must be quick, and must not raise: a raising callback is logged and ignored,
because a broken reporter must never break the work it reports on.
"""

from __future__ import annotations

import logging
from typing import Any

from ..store import StepRecord, Task

log = logging.getLogger(__name__)


class EngineCallbacks:
    """No-op base of engine callbacks."""

    def on_task_state(self, task: Task) -> None:
        """The task changed state (``task`` is the row after the change)."""

    def on_step_start(self, task_id: str, step: StepRecord) -> None:
        """A step (or a loop item, or an include) starts; ``step.args`` are the rendered args."""

    def on_step_progress(self, task_id: str, step: StepRecord, progress: dict[str, Any]) -> None:
        """A running step reported progress (``phase, done, total, percent``, maybe ``rate, eta``)."""

    def on_step_end(self, task_id: str, step: StepRecord) -> None:
        """A step finished: ``step.state`` is completed, failed, skipped, undone or undo_failed."""

    def on_event(self, task_id: str, kind: str, data: dict[str, Any]) -> None:
        """Anything else worth telling: step events, ledger entries, retries, warnings."""


class CompositeCallbacks(EngineCallbacks):
    """Fans every call out to several callbacks, isolating their failures from each other."""

    def __init__(self, *callbacks: EngineCallbacks) -> None:
        self.callbacks = list(callbacks)

    def _each(self, method: str, *args: Any) -> None:
        for cb in self.callbacks:
            try:
                getattr(cb, method)(*args)
            except Exception:
                log.exception("engine callback %s.%s failed", type(cb).__name__, method)

    def on_task_state(self, task: Task) -> None:
        self._each("on_task_state", task)

    def on_step_start(self, task_id: str, step: StepRecord) -> None:
        self._each("on_step_start", task_id, step)

    def on_step_progress(self, task_id: str, step: StepRecord, progress: dict[str, Any]) -> None:
        self._each("on_step_progress", task_id, step, progress)

    def on_step_end(self, task_id: str, step: StepRecord) -> None:
        self._each("on_step_end", task_id, step)

    def on_event(self, task_id: str, kind: str, data: dict[str, Any]) -> None:
        self._each("on_event", task_id, kind, data)
