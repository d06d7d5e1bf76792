"""Running an import, export or copy task's workflow in the test's own process, with the engine a worker's
task child runs: to its end (:func:`run`), or in a thread while the test holds it mid-step and cancels it
(:class:`Running`)."""

from __future__ import annotations

import threading

from appliance import config as config_mod
from appliance.store import Store, Task
from appliance.workflow.engine import Engine


def run(cfg: config_mod.Config, task: Task) -> Task:
    """``task`` run to its end; the task as it ended."""
    engine = Engine(cfg, poll_interval=0.1)
    try:
        return engine.run(task.id)
    finally:
        engine.store.close()


class Running:
    """``task`` run by :func:`run` in a daemon thread from now on."""

    def __init__(self, cfg: config_mod.Config, task: Task) -> None:
        self.task_id = task.id
        self._out: list[Task] = []
        self._thread = threading.Thread(target=lambda: self._out.append(run(cfg, task)), daemon=True)
        self._thread.start()

    def ended(self, timeout: float = 120.0) -> Task:
        """The task as its run ended; an AssertionError when the run did not end within ``timeout``."""
        self._thread.join(timeout)
        assert self._out, f"the run of {self.task_id} did not end within {timeout:.0f} s"
        return self._out[0]


def abandoned_steps(store: Store, task_id: str) -> list[object]:
    """The task's ``step.abandoned`` events: a step the engine gave up on after its grace, because it did
    not stop by itself when told to."""
    return [e for e in store.events(task_id=task_id, limit=1000) if e.kind == "step.abandoned"]
