"""``imaging run``, ``imaging tasks …`` and ``imaging workflows …``: the workflow side of the CLI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from ..config import Config
from ..errors import UsageError, WorkflowInvalid, is_rejection
from ..progress import Progress
from ..redact import redact, redact_text
from ..service.sweeps import cleanup_scratch
from ..store import StepRecord, Task, TaskState
from ..workflow.callbacks import EngineCallbacks
from ..workflow.engine import Engine
from .artifacts import add_commands as add_artifact_commands
from .artifacts import cmd_workflows_list_store
from .common import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REJECTED,
    PROGRESS_MODES,
    print_json,
    progress_callback,
)


def _print_json(obj: Any) -> None:
    """``obj`` as JSON on stdout, redacted: task params and step arguments hold presigned URLs."""
    print_json(redact(json.loads(json.dumps(obj, default=str))))


def _engine(cfg: Config, callbacks: EngineCallbacks | None = None) -> Engine:
    return Engine(cfg, callbacks=callbacks)


def _parse_params(pairs: list[str], files: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for f in files:
        data = yaml.safe_load(Path(f).read_text())
        if not isinstance(data, dict):
            raise UsageError(f"{f}: a params file must hold a mapping")
        params.update(data)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"parameter {pair!r} is not key=value")
        params[key] = value
    return params


def task_exit_status(task: Task) -> int:
    """Exit status for a finished task (see the README's table)."""
    if task.state is TaskState.COMPLETED:
        return EXIT_OK
    if task.state is TaskState.CANCELLED:
        return EXIT_CANCELLED
    return EXIT_REJECTED if is_rejection(task.error_code) else EXIT_FAILED


class ConsoleCallbacks(EngineCallbacks):
    """Prints step starts/ends to stderr and step progress through the progress printer."""

    def __init__(self, progress_mode: str) -> None:
        self.printer = progress_callback(progress_mode)
        self.quiet_steps = progress_mode == "json"

    def _say(self, text: str) -> None:
        if not self.quiet_steps:
            print(redact_text(text), file=sys.stderr, flush=True)

    def on_task_state(self, task: Task) -> None:
        self._say(
            f"task {task.id}: {task.state}" + (f" ({task.status_message})" if task.status_message else "")
        )

    def on_step_start(self, task_id: str, step: StepRecord) -> None:
        self._say(f"  step {step.idx} {step.name}: running")

    def on_step_end(self, task_id: str, step: StepRecord) -> None:
        detail = f" — {step.error}" if step.error else ""
        self._say(f"  step {step.idx} {step.name}: {step.state}{detail}")

    def on_step_progress(self, task_id: str, step: StepRecord, progress: dict[str, Any]) -> None:
        if self.printer is None:
            return
        total = progress.get("total")
        done = int(progress.get("done") or 0)
        percent = progress.get("percent")
        if percent is None and total:
            percent = 100.0 * done / total
        self.printer(
            Progress(
                phase=progress.get("phase") or step.name,
                done=done,
                total=total,
                percent=percent,
                rate=progress.get("rate"),
                eta=progress.get("eta"),
            )
        )


# --- commands ------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    params = _parse_params(args.param, args.params_file)
    if args.dry_run:
        plan = _engine(cfg).plan(args.workflow, params, coerce_strings=True)
        if args.json:
            _print_json(plan)
        else:
            _print_plan(plan)
        return EXIT_OK

    engine = _engine(cfg, ConsoleCallbacks(args.progress))
    engine.recover()  # a task orphaned by an earlier crash is finished before new work starts
    cleanup_scratch(cfg, engine.store)
    task_id = engine.submit(args.workflow, params, task_id=args.task_id, coerce_strings=True)
    task = engine.run(task_id)
    if args.json:
        _print_json(task.to_dict())
    elif task.state is TaskState.COMPLETED:
        print(f"task {task.id} completed")
    else:
        message = redact_text(task.error_message or task.status_message)
        print(f"imaging: {task.error_code or task.state}: {message}", file=sys.stderr)
    return task_exit_status(task)


def _print_plan(plan: dict[str, Any]) -> None:
    print(f"plan for workflow {plan.get('workflow')} (dry run: nothing was done)")
    for step in plan.get("steps", []):
        status = step.get("status")
        line = (
            f"  {step.get('idx')} {step.get('name')} [{step.get('action') or step.get('include')}] {status}"
        )
        if step.get("reason"):
            line += f": {step['reason']}"
        print(line)
        if status == "run":
            for key, value in (step.get("args") or {}).items():
                print(f"      {key} = {json.dumps(redact(value), default=str)}")
            if step.get("scratch_bytes"):
                print(f"      scratch ≈ {step['scratch_bytes']} bytes")
            if step.get("note"):
                print(f"      note: {step['note']}")
            findings = (step.get("plan") or {}).get("findings")
            if findings is not None:  # a step that judged the input already (guest.validate)
                verdict = "would fail" if step["plan"].get("would_fail") else "would pass"
                print(f"      verdict: {verdict}")
                for f in findings:
                    print(f"      {f['severity']:7} {f['code']}: {f['message']}")
    print(
        f"  scratch needed: {plan.get('scratch_bytes', 0)} bytes"
        + (f" (at most {plan['scratch_bytes_max']})" if plan.get("scratch_bytes_max") else "")
    )


def cmd_tasks_list(args: argparse.Namespace, cfg: Config) -> int:
    tasks = _engine(cfg).store.list_tasks(args.state, limit=args.limit)
    if args.json:
        _print_json([t.to_dict() for t in tasks])
        return EXIT_OK
    # as wide as the longest id: EC2 task ids (import-snap- and 17 hex digits) overflow a fixed column
    width = max([16, *(len(t.id) for t in tasks)])
    print(f"{'ID':{width}} {'STATE':10} {'PROGRESS':>8}  {'UPDATED':20}  WORKFLOW / MESSAGE")
    for t in tasks:
        pct = "" if t.percent is None else f"{t.percent:.0f}%"
        msg = redact_text(t.error_message or t.status_message or "")
        print(f"{t.id:{width}} {t.state!s:10} {pct:>8}  {t.updated_at:20}  {t.workflow} {msg}".rstrip())
    return EXIT_OK


def cmd_tasks_show(args: argparse.Namespace, cfg: Config) -> int:
    store = _engine(cfg).store
    task = store.get_task(args.id)
    detail = {
        "task": task.to_dict(),
        "steps": [s.to_dict() for s in store.step_results(task.id)],
        "ledger": [e.to_dict() for e in store.ledger(task.id)],
        "events": [e.to_dict() for e in store.events(task_id=task.id, limit=args.events)],
    }
    if args.json:
        _print_json(detail)
        return EXIT_OK
    for key in (
        "id",
        "workflow",
        "state",
        "phase",
        "percent",
        "status_message",
        "error_code",
        "error_message",
        "created_at",
        "started_at",
        "finished_at",
        "owner",
    ):
        value = getattr(task, key)
        if value not in (None, ""):
            print(f"{key + ':':16}{redact_text(str(value))}")
    print(f"{'params:':16}{json.dumps(redact(task.params), default=str)}")
    shown = redact(json.loads(json.dumps(detail, default=str)))
    for f in shown["task"]["findings"]:
        print(f"finding:        {f.get('severity')} {f.get('code')}: {f.get('message')}")
    print("steps:")
    for s in shown["steps"]:
        print(f"  {s['idx']:10} {s['name']:24} {s['state']}" + (f" — {s['error']}" if s.get("error") else ""))
    if shown["ledger"]:
        print("cleanup ledger:")
        for e in shown["ledger"]:
            print(
                f"  {e['time']} {e['action']:8} {e['resource']}"
                + (f" (step {e['step']})" if e.get("step") else "")
            )
    return EXIT_OK


def cmd_tasks_cancel(args: argparse.Namespace, cfg: Config) -> int:
    task = _engine(cfg).store.request_cancel(args.id)
    print(f"task {task.id}: {task.state}")
    return EXIT_OK


def cmd_tasks_recover(args: argparse.Namespace, cfg: Config) -> int:
    ended = _engine(cfg, ConsoleCallbacks("none")).recover()
    for t in ended:
        print(f"task {t.id}: {t.state}" + (f" ({t.error_message})" if t.error_message else ""))
    if not ended:
        print("no orphaned tasks")
    return EXIT_OK


def cmd_tasks_resume(args: argparse.Namespace, cfg: Config) -> int:
    task = _engine(cfg, ConsoleCallbacks(args.progress)).resume(args.id)
    print(f"task {task.id}: {task.state}")
    return task_exit_status(task)


def cmd_workflows_list(args: argparse.Namespace, cfg: Config) -> int:
    if args.store:
        return cmd_workflows_list_store(args, cfg)
    infos = _engine(cfg).loader.list()
    if args.json:
        _print_json([i.to_dict() for i in infos])
        return EXIT_OK
    for i in infos:
        summary = (i.description or "").split(". ")[0].rstrip(".")
        print(f"{i.name:24} {summary}  [{i.source}]")
    return EXIT_OK


def cmd_workflows_show(args: argparse.Namespace, cfg: Config) -> int:
    wf = _engine(cfg).load(args.workflow)
    if args.json:
        _print_json(wf.to_dict())
    else:
        sys.stdout.write(Path(wf.source).read_text())
    return EXIT_OK


def cmd_workflows_validate(args: argparse.Namespace, cfg: Config) -> int:
    loader = _engine(cfg).loader
    status = EXIT_OK
    for f in args.files:
        try:
            loader.validate_file(f)
            print(f"{f}: valid")
        except WorkflowInvalid as exc:
            print(f"imaging: {exc.code}: {exc.message}", file=sys.stderr)
            status = EXIT_ERROR
    return status


def add_commands(sub: Any) -> None:
    """Add ``run``, ``tasks`` and ``workflows`` to the top-level subparsers."""
    s = sub.add_parser(
        "run",
        help="run a workflow as a task (or plan it with --dry-run)",
        description="Run WORKFLOW (a name from `imaging workflows list`, a YAML file, or "
        "artifact://NAME@VERSION from the artifact store) "
        "as a recorded task in this process. Ctrl-C cancels it: completed steps are undone.",
    )
    s.add_argument("workflow")
    s.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a workflow parameter (repeatable; converted to the declared type)",
    )
    s.add_argument(
        "--params-file", action="append", default=[], metavar="FILE", help="YAML mapping of params"
    )
    s.add_argument(
        "--dry-run", action="store_true", help="print the plan (steps, rendered args, scratch) and do nothing"
    )
    s.add_argument("--task-id", help="use this task id instead of a generated one")
    s.add_argument("--progress", choices=PROGRESS_MODES, default="auto")
    s.add_argument("--json", action="store_true", help="print the final task (or the plan) as JSON")
    s.set_defaults(func=cmd_run)

    t = sub.add_parser("tasks", help="list, show, cancel and recover tasks").add_subparsers(
        dest="tasks_command", required=True, metavar="ACTION"
    )
    s = t.add_parser("list", help="recent tasks, newest first")
    s.add_argument("--state", choices=[str(x) for x in TaskState], help="only tasks in this state")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tasks_list)
    s = t.add_parser("show", help="a task with its steps, cleanup ledger and events")
    s.add_argument("id")
    s.add_argument("--events", type=int, default=50, help="how many events to include")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tasks_show)
    s = t.add_parser("cancel", help="ask a task to stop (its run undoes completed steps)")
    s.add_argument("id")
    s.set_defaults(func=cmd_tasks_cancel)
    s = t.add_parser("recover", help="finish tasks whose process died: resume or fail them cleanly")
    s.set_defaults(func=cmd_tasks_recover)
    s = t.add_parser("resume", help="resume one orphaned task in this process")
    s.add_argument("id")
    s.add_argument("--progress", choices=PROGRESS_MODES, default="auto")
    s.set_defaults(func=cmd_tasks_resume)

    w = sub.add_parser("workflows", help="list, show, validate and upload workflow files").add_subparsers(
        dest="workflows_command", required=True, metavar="ACTION"
    )
    s = w.add_parser("list", help="workflows found in the configured and shipped directories")
    s.add_argument("--json", action="store_true")
    s.add_argument("--store", action="store_true", help="list the artifact store (NAME@VERSION) instead")
    s.set_defaults(func=cmd_workflows_list)
    s = w.add_parser("show", help="print a workflow")
    s.add_argument("workflow")
    s.add_argument("--json", action="store_true", help="the parsed workflow as JSON")
    s.set_defaults(func=cmd_workflows_show)
    s = w.add_parser("validate", help="validate workflow files (errors name file, step and field)")
    s.add_argument("files", nargs="+")
    s.set_defaults(func=cmd_workflows_validate)
    add_artifact_commands(w)
