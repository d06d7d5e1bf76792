"""Shared by the workflow tests: test-only steps, workflow/config builders, an engine runner script.

The steps here are registered in-process (``Registry.register``), the same way an embedding
application would add its own. ``python -m tests.appliance.workflow.support CONFIG_JSON TASK_ID``
runs a task in a separate process, so tests can kill it or cancel it from outside.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from appliance import config as config_mod
from appliance.errors import Finding, ImageRejected, StepFailed, StoreUnavailable
from appliance.store import StepState, Store, Task
from appliance.workflow import Engine, EngineCallbacks, Registry, Step, StepContext
from tests import processes, stores

#: engine tests poll every 50 ms (callers give the timeout)
wait_until = functools.partial(processes.wait_until, interval=0.05)

REPO = Path(__file__).resolve().parents[3]


class AppendLine(Step):
    """Append ``text`` as a line to ``path``; returns how many lines the file has now."""

    schema = {
        "type": "object",
        "required": ["path", "text"],
        "properties": {"path": {"type": "string"}, "text": {"type": "string"}},
    }

    def run(self, ctx: StepContext, path: str, text: str) -> Any:
        with open(path, "a") as f:
            f.write(text + "\n")
        return {"lines": len(Path(path).read_text().splitlines()), "text": text}


class WaitForFile(Step):
    """Log ``started`` to ``log``, then wait (cancellably) until ``path`` exists."""

    def run(self, ctx: StepContext, path: str, log: str) -> Any:
        with open(log, "a") as f:
            f.write("started\n")
        while not os.path.exists(path):
            ctx.sleep(0.05)
        return {"waited_for": path}


class ReportThenWait(WaitForFile):
    """Report progress twice in a row (the second within the throttle's interval: held back), then wait
    as :class:`WaitForFile` does: a step that stalls right after a burst of progress."""

    def run(self, ctx: StepContext, path: str, log: str) -> Any:
        ctx.progress({"phase": "copying", "done": 1, "total": 10})
        ctx.progress({"phase": "copying", "done": 2, "total": 10})
        return super().run(ctx, path, log)


class Flaky(Step):
    """Count attempts in ``counter``; fail until the attempt number exceeds ``fail_times``."""

    def run(self, ctx: StepContext, counter: str, fail_times: int) -> Any:
        p = Path(counter)
        n = int(p.read_text()) + 1 if p.exists() else 1
        p.write_text(str(n))
        if n <= fail_times:
            raise StepFailed(f"attempt {n} fails on purpose", "Test.Flaky")
        return {"attempt": n}


class LeakyCreate(Step):
    """Create ``path`` (ledgered) but fail to undo it."""

    def run(self, ctx: StepContext, path: str) -> Any:
        Path(path).write_text("x")
        ctx.ledger_created(path)
        return {"path": path}

    def undo(self, ctx: StepContext, args: dict[str, Any], result: Any) -> None:
        raise OSError(13, "Permission denied (on purpose)")


class LeavePartial(Step):
    """Leave a ledgered partial output of ``final`` that nothing publishes (as a stream step leaves the
    partial of an earlier run it did not take again)."""

    def run(self, ctx: StepContext, final: str) -> Any:
        path = Path(final).parent / f".{Path(final).name}.partial-0000000a"
        ctx.ledger_created(path)
        path.write_bytes(b"half an image")
        return {"partial": str(path)}


class Reject(Step):
    """Reject the "image" with a backing-file error and a warning, as an inspection would."""

    def run(self, ctx: StepContext) -> Any:
        raise ImageRejected(
            [
                Finding.warning("Image.Sparse", "mostly zeros"),
                Finding.error("UnsafeImage.BackingFile", "the image has a backing file"),
            ]
        )


class StoreGoneOnce(Step):
    """The first time: fail as a step does when the task database went away under it (e.g. its
    ledger could not be written); count the runs in ``counter``."""

    def run(self, ctx: StepContext, counter: str) -> Any:
        p = Path(counter)
        n = int(p.read_text()) + 1 if p.exists() else 1
        p.write_text(str(n))
        if n == 1:
            raise StoreUnavailable("task database postgresql://db.example/imaging cannot be reached: gone")
        return {"run": n}


class Crash(Step):
    """Raise a non-coded exception (as a buggy plugin would)."""

    def run(self, ctx: StepContext) -> Any:
        raise KeyError("boom")


def make_registry() -> Registry:
    """Entry-point steps plus the test steps above."""
    registry = Registry()
    registry.register("test.append", AppendLine)
    registry.register("test.wait_for_file", WaitForFile)
    registry.register("test.report_then_wait", ReportThenWait)
    registry.register("test.flaky", Flaky)
    registry.register("test.leaky", LeakyCreate)
    registry.register("test.crash", Crash)
    registry.register("test.store_gone_once", StoreGoneOnce)
    registry.register("test.reject", Reject)
    registry.register("test.leave_partial", LeavePartial)
    return registry


def config_dict(tmp: Path) -> dict[str, Any]:
    """Configuration for a test: everything under ``tmp``, a small quota, 5 s leases, the test's
    task database (:mod:`tests.stores`)."""
    return stores.with_store(
        {
            "state_dir": str(tmp / "state"),
            "workflows": {"extra_dirs": [str(tmp / "workflows")]},
            "scratch": {"root": str(tmp / "scratch"), "quota": "64MiB", "min_free": 0},
            "tasks": {"lease_seconds": 5},
        }
    )


def make_config(tmp: Path) -> config_mod.Config:
    return config_mod.from_dict(config_dict(tmp), base_dir=tmp)


def write_workflow(tmp: Path, name: str, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as ``workflows/<name>.yaml`` under ``tmp`` (``name`` defaults into the doc)."""
    directory = tmp / "workflows"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **doc}, sort_keys=False))
    return path


class Recorder(EngineCallbacks):
    """Records every callback as a tuple, for assertions."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_task_state(self, task: Task) -> None:
        self.calls.append(("state", str(task.state)))

    def on_step_start(self, task_id: str, step: Any) -> None:
        self.calls.append(("start", step.idx))

    def on_step_progress(self, task_id: str, step: Any, progress: dict[str, Any]) -> None:
        self.calls.append(("progress", step.idx, progress))

    def on_step_end(self, task_id: str, step: Any) -> None:
        self.calls.append(("end", step.idx, str(step.state)))

    def on_event(self, task_id: str, kind: str, data: dict[str, Any]) -> None:
        self.calls.append(("event", kind, data))


def start_engine_process(tmp: Path, task_id: str) -> subprocess.Popen[str]:
    """Run ``task_id`` in a separate Python process (this module's ``main``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.appliance.workflow.support", json.dumps(config_dict(tmp)), task_id],
        cwd=str(tmp),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def step_state(store: Store, task_id: str, idx: str) -> StepState | None:
    for record in store.step_results(task_id):
        if record.idx == idx:
            return record.state
    return None


def main(argv: list[str]) -> int:
    cfg = config_mod.from_dict(json.loads(argv[0]), base_dir=Path.cwd())
    engine = Engine(cfg, registry=make_registry(), poll_interval=0.1)
    task = engine.run(argv[1])
    print(json.dumps(task.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
