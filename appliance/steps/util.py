"""Utility steps: ``util.echo``, ``util.fail``, ``util.sleep``.

Useful to operators while writing workflows (print a rendered value, stop a branch with a coded
error, wait) and to tests of the engine itself.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import StepFailed
from ..workflow.step import Step, StepContext


class EchoStep(Step):
    """Return the arguments as the step's result (and emit ``message`` as an ``echo`` event)."""

    schema = {"type": "object"}

    def run(self, ctx: StepContext, **args: Any) -> Any:
        if "message" in args:
            ctx.event("echo", message=args["message"])
        return args


class FailStep(Step):
    """Fail with a coded error: ``code`` (default ``StepFailed``) and ``message``."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "message": {"type": "string"},
            "code": {"type": "string", "pattern": r"^[A-Za-z][A-Za-z0-9.]*$"},
        },
    }

    def run(
        self, ctx: StepContext, message: str = "failed on purpose (util.fail)", code: str = "StepFailed"
    ) -> Any:
        raise StepFailed(message, code)


class SleepStep(Step):
    """Sleep ``seconds``, waking within 0.1 s when cancelled; reports percent progress."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["seconds"],
        "properties": {"seconds": {"type": "number", "minimum": 0}},
    }

    #: how long one uninterruptible slice is at most (the reaction time to a cancel)
    SLICE = 0.1

    def run(self, ctx: StepContext, seconds: float) -> Any:
        start = time.monotonic()
        end = start + seconds
        last_report = start
        while (now := time.monotonic()) < end:
            ctx.sleep(min(self.SLICE, end - now))
            if now - last_report >= 1.0:
                last_report = now
                ctx.progress({"phase": "sleep", "percent": 100.0 * (now - start) / seconds})
        ctx.progress({"phase": "sleep", "percent": 100.0})
        return {"slept": seconds}

    def plan(self, ctx: StepContext, seconds: float) -> dict[str, Any]:
        return {"seconds": seconds}
