"""Workflow semantics, run in this process: when, loop, include, retries, timeout, undo, ledger, scratch."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import IncorrectState, UsageError
from appliance.partials import is_partial
from appliance.scratch import ScratchSpace
from appliance.steps.util import EchoStep
from appliance.store import StepState, Store, Task, TaskState
from appliance.workflow import Engine, EngineCallbacks
from appliance.workflow.runner import UNEXPECTED_MESSAGE

from .support import Recorder, make_config, make_registry, step_state, wait_until, write_workflow


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = Engine(make_config(tmp_path), registry=make_registry(), poll_interval=0.05, timeout_grace=2.0)
    yield e
    e.store.close()


def run(engine: Engine, name: str, params: dict[str, Any] | None = None) -> Task:
    return engine.run(engine.submit(name, params))


def steps(engine: Engine, task: Task) -> dict[str, Any]:
    return {r.idx: r for r in engine.store.step_results(task.id)}


def ledger(engine: Engine, task: Task) -> list[tuple[str, str]]:
    """The task's ledger without the entries of partial outputs (file.copy's temporary names, checked in
    test_partials.py)."""
    return [(e.action, e.resource) for e in engine.store.ledger(task.id) if not is_partial(e.resource)]


def test_when_false_skips_and_records_the_step(tmp_path: Path, engine: Engine) -> None:
    write_workflow(
        tmp_path,
        "cond",
        {
            "params": {"raw": {"type": "boolean"}},
            "steps": [
                {
                    "name": "if-raw",
                    "action": "util.echo",
                    "with": {"m": "raw"},
                    "when": "raw",
                    "register": "a",
                },
                {
                    "name": "if-not",
                    "action": "util.echo",
                    "with": {"m": "other"},
                    "when": "{{ not raw }}",
                    "register": "b",
                },
                # A skipped step's register name stays undefined; `is defined` tells.
                {"name": "after-b", "action": "util.echo", "when": "b is defined", "register": "c"},
            ],
        },
    )
    task = run(engine, "cond", {"raw": True})
    assert task.state is TaskState.COMPLETED
    recs = steps(engine, task)
    assert [recs[i].state for i in ("1", "2", "3")] == [
        StepState.COMPLETED,
        StepState.SKIPPED,
        StepState.SKIPPED,
    ]
    assert recs["2"].result == {"skipped": "when: {{ not raw }}"}
    assert task.result == {"a": {"m": "raw"}}

    task = run(engine, "cond", {"raw": False})
    recs = steps(engine, task)
    assert [recs[i].state for i in ("1", "2", "3")] == [
        StepState.SKIPPED,
        StepState.COMPLETED,
        StepState.COMPLETED,
    ]


def test_loop_over_a_list_registers_the_list_of_results(tmp_path: Path, engine: Engine) -> None:
    write_workflow(
        tmp_path,
        "loop",
        {
            "steps": [
                {
                    "name": "each",
                    "action": "util.echo",
                    "loop": [1, 2, 3],
                    "with": {"n": "{{ item * 10 }}"},
                    "register": "r",
                },
                {
                    "name": "sum",
                    "action": "util.echo",
                    "with": {"total": "{{ r | map(attribute='n') | sum }}"},
                },
            ]
        },
    )
    task = run(engine, "loop")
    recs = steps(engine, task)
    assert task.result["r"] == [{"n": 10}, {"n": 20}, {"n": 30}]  # native ints, not "10"
    assert [recs[f"1.loop{i}"].args for i in (1, 2, 3)] == [{"n": 10}, {"n": 20}, {"n": 30}]
    assert recs["2"].result == {"total": 60}


def test_loop_over_an_expression_with_a_per_item_condition(tmp_path: Path, engine: Engine) -> None:
    write_workflow(
        tmp_path,
        "loopexpr",
        {
            "params": {"count": {"type": "integer", "default": 4}},
            "steps": [
                {
                    "name": "mk",
                    "action": "util.echo",
                    "with": {"names": "{{ range(count) | list }}"},
                    "register": "mk",
                },
                {
                    "name": "even",
                    "action": "util.echo",
                    "loop": "{{ mk.names }}",
                    "when": "item % 2 == 0",
                    "with": {"i": "{{ item }}"},
                    "register": "evens",
                },
            ],
        },
    )
    task = run(engine, "loopexpr")
    recs = steps(engine, task)
    assert task.result["evens"] == [{"i": 0}, None, {"i": 2}, None]
    assert recs["2.loop2"].state is StepState.SKIPPED and recs["2.loop3"].state is StepState.COMPLETED


def test_include_passes_params_and_exposes_nested_results(tmp_path: Path, engine: Engine) -> None:
    write_workflow(
        tmp_path,
        "leaf",
        {
            "params": {"value": {"type": "integer", "required": True}},
            "steps": [
                {
                    "name": "double",
                    "action": "util.echo",
                    "with": {"v": "{{ value * 2 }}"},
                    "register": "doubled",
                }
            ],
        },
    )
    write_workflow(
        tmp_path,
        "middle",
        {
            "params": {"start": {"type": "integer", "default": 1}},
            "steps": [
                {"name": "plus", "action": "util.echo", "with": {"v": "{{ start + 1 }}"}, "register": "plus"},
                {"name": "go-leaf", "include": "leaf", "with": {"value": "{{ plus.v }}"}, "register": "leaf"},
            ],
        },
    )
    write_workflow(
        tmp_path,
        "top",
        {
            "steps": [
                {"name": "mid", "include": "middle.yaml", "with": {"start": 20}, "register": "mid"},
                {
                    "name": "show",
                    "action": "util.echo",
                    "with": {"deep": "{{ mid.leaf.doubled.v }}"},
                    "register": "out",
                },
            ]
        },
    )
    task = run(engine, "top")
    assert task.state is TaskState.COMPLETED, task.error_message
    assert task.result["out"] == {"deep": 42}
    assert task.result["mid"] == {"plus": {"v": 21}, "leaf": {"doubled": {"v": 42}}}
    recs = steps(engine, task)
    assert recs["1"].action == "include:middle.yaml" and recs["1"].args == {"start": 20}
    assert recs["1/include/2/include/1"].result == {"v": 42}  # included steps are distinct records


def test_retries_until_success_counting_attempts(tmp_path: Path, engine: Engine) -> None:
    counter = tmp_path / "count"
    write_workflow(
        tmp_path,
        "flaky",
        {
            "params": {"retries": {"type": "integer"}},
            "steps": [
                {
                    "name": "flaky",
                    "action": "test.flaky",
                    "with": {"counter": str(counter), "fail_times": 2},
                    "retries": 2,
                    "retry_delay": 0.01,
                }
            ],
        },
    )
    task = run(engine, "flaky")
    assert task.state is TaskState.COMPLETED
    assert counter.read_text() == "3"
    assert steps(engine, task)["1"].attempts == 3
    assert [e.data["attempt"] for e in engine.store.events(task_id=task.id) if e.kind == "step.retry"] == [
        1,
        2,
    ]


def test_retries_exhausted_fail_with_the_steps_code(tmp_path: Path, engine: Engine) -> None:
    counter = tmp_path / "count"
    write_workflow(
        tmp_path,
        "flaky1",
        {
            "steps": [
                {
                    "name": "flaky",
                    "action": "test.flaky",
                    "with": {"counter": str(counter), "fail_times": 5},
                    "retries": 1,
                }
            ]
        },
    )
    task = run(engine, "flaky1")
    assert (task.state, task.error_code) == (TaskState.FAILED, "Test.Flaky")
    assert task.error_message == "step 'flaky' failed: attempt 2 fails on purpose"
    assert counter.read_text() == "2"


def test_uncoded_exception_in_a_step_becomes_step_failed(tmp_path: Path, engine: Engine) -> None:
    write_workflow(tmp_path, "crash", {"steps": [{"name": "bug", "action": "test.crash"}]})
    task = run(engine, "crash")
    assert (task.state, task.error_code) == (TaskState.FAILED, "StepFailed")
    # the exception's text is for the operator (an event, the log), never the task's message, which
    # EC2 clients read as the StatusMessage
    assert task.error_message == "step 'bug' failed: " + UNEXPECTED_MESSAGE
    assert "boom" not in task.error_message and "KeyError" not in task.error_message
    [event] = [e for e in engine.store.events(task_id=task.id) if e.kind == "step.exception"]
    assert event.data == {"step": "1", "name": "bug", "type": "builtins.KeyError", "message": "'boom'"}


def test_rejection_keeps_every_finding_on_the_task(tmp_path: Path, engine: Engine) -> None:
    write_workflow(tmp_path, "reject", {"steps": [{"name": "inspect", "action": "test.reject"}]})
    task = run(engine, "reject")
    assert (task.state, task.error_code) == (TaskState.FAILED, "UnsafeImage.BackingFile")
    assert task.error_message == "step 'inspect' failed: the image has a backing file"
    assert [f["code"] for f in task.findings] == ["Image.Sparse", "UnsafeImage.BackingFile"]


def test_worker_without_the_plugin_fails_the_task_naming_the_step(tmp_path: Path, engine: Engine) -> None:
    write_workflow(tmp_path, "plugin", {"steps": [{"name": "extra", "action": "test.extra"}]})
    with_plugin = make_registry()
    with_plugin.register("test.extra", EchoStep)
    submitter = Engine(engine.config, engine.store, registry=with_plugin)
    task_id = submitter.submit("plugin")
    task = engine.run(task_id)  # this engine's registry has no test.extra
    assert (task.state, task.error_code) == (TaskState.FAILED, "WorkflowInvalid")
    assert "step 'extra' (#1): action: unknown action 'test.extra'" in task.error_message


def test_timeout_fails_the_step_and_undoes_earlier_ones(tmp_path: Path, engine: Engine) -> None:
    src, copy = tmp_path / "src", tmp_path / "copy"
    src.write_text("data")
    write_workflow(
        tmp_path,
        "slow",
        {
            "steps": [
                {"name": "copy", "action": "file.copy", "with": {"src": str(src), "dst": str(copy)}},
                {"name": "nap", "action": "util.sleep", "with": {"seconds": 30}, "timeout": 1},
            ]
        },
    )
    task = run(engine, "slow")
    assert (task.state, task.error_code) == (TaskState.FAILED, "StepTimeout")
    assert "timed out after 1 s" in task.error_message
    assert not copy.exists()
    recs = steps(engine, task)
    assert recs["1"].state is StepState.UNDONE and recs["2"].state is StepState.FAILED
    assert recs["2"].error["code"] == "StepTimeout"
    stopping = [e.data for e in engine.store.events(task_id=task.id) if e.kind == "step.stopping"]
    assert stopping == [{"step": "2", "name": "nap", "reason": "timeout"}]


def test_failure_undoes_completed_steps_in_reverse_with_a_ledger(tmp_path: Path, engine: Engine) -> None:
    src = tmp_path / "src"
    src.write_text("data")
    out = tmp_path / "out"
    out.mkdir()
    write_workflow(
        tmp_path,
        "undo",
        {
            "steps": [
                *[
                    {
                        "name": f"copy-{n}",
                        "action": "file.copy",
                        "with": {"src": str(src), "dst": str(out / n)},
                    }
                    for n in ("a", "b", "c")
                ],
                {"name": "skipped", "action": "util.echo", "when": False},
                {"name": "boom", "action": "util.fail", "with": {"code": "Test.Boom", "message": "no"}},
            ]
        },
    )
    task = run(engine, "undo")
    assert (task.state, task.error_code, task.error_message) == (
        TaskState.FAILED,
        "Test.Boom",
        "step 'boom' failed: no",
    )
    assert list(out.iterdir()) == []
    a, b, c = (str(out / n) for n in "abc")
    assert ledger(engine, task) == [
        ("created", a),
        ("created", b),
        ("created", c),
        ("removed", c),
        ("removed", b),
        ("removed", a),
    ]
    recs = steps(engine, task)
    assert [recs[i].state for i in "12345"] == [StepState.UNDONE] * 3 + [StepState.SKIPPED, StepState.FAILED]
    assert [e.data["name"] for e in engine.store.events(task_id=task.id) if e.kind == "step.undo"] == [
        "copy-c",
        "copy-b",
        "copy-a",
    ]


def test_undo_inside_includes_and_loops_runs_too(tmp_path: Path, engine: Engine) -> None:
    src = tmp_path / "src"
    src.write_text("data")
    out = tmp_path / "out"
    out.mkdir()
    write_workflow(
        tmp_path,
        "copies",
        {
            "params": {"dir": {"type": "string", "required": True}},
            "steps": [
                {
                    "name": "copy",
                    "action": "file.copy",
                    "loop": ["x", "y"],
                    "with": {"src": str(src), "dst": "{{ dir }}/{{ item }}"},
                }
            ],
        },
    )
    write_workflow(
        tmp_path,
        "outer-undo",
        {
            "steps": [
                {"name": "inc", "include": "copies", "with": {"dir": str(out)}},
                {"name": "boom", "action": "util.fail"},
            ]
        },
    )
    task = run(engine, "outer-undo")
    assert task.state is TaskState.FAILED and list(out.iterdir()) == []
    assert [a for a, _ in ledger(engine, task)] == ["created", "created", "removed", "removed"]
    assert ledger(engine, task)[2][1] == str(out / "y")  # newest first
    assert steps(engine, task)["1/include/1.loop2"].state is StepState.UNDONE


def test_failed_undo_is_ledgered_as_leaked_and_the_task_still_ends(tmp_path: Path, engine: Engine) -> None:
    leak = tmp_path / "leak"
    write_workflow(
        tmp_path,
        "leaky",
        {
            "steps": [
                {"name": "make", "action": "test.leaky", "with": {"path": str(leak)}},
                {"name": "boom", "action": "util.fail"},
            ]
        },
    )
    task = run(engine, "leaky")
    assert task.state is TaskState.FAILED and task.error_code == "StepFailed"
    assert "undo of step 'make' failed" in task.error_message and "Permission denied" in task.error_message
    assert ledger(engine, task) == [("created", str(leak)), ("leaked", str(leak))]
    assert steps(engine, task)["1"].state is StepState.UNDO_FAILED


def test_cancel_whose_undo_fails_ends_failed_with_cleanup_failed(tmp_path: Path, engine: Engine) -> None:
    leak = tmp_path / "leak"
    write_workflow(
        tmp_path,
        "leaky-cancel",
        {
            "steps": [
                {"name": "make", "action": "test.leaky", "with": {"path": str(leak)}},
                {"name": "nap", "action": "util.sleep", "with": {"seconds": 60}},
            ]
        },
    )
    task_id = engine.submit("leaky-cancel")

    def cancel_when_napping() -> None:
        wait_until(lambda: step_state(engine.store, task_id, "2") is StepState.RUNNING, 30, "the nap")
        with Store(engine.config.store) as other:
            other.request_cancel(task_id)

    canceller = threading.Thread(target=cancel_when_napping)
    canceller.start()
    task = engine.run(task_id)
    canceller.join(timeout=30)
    assert (task.state, task.error_code) == (TaskState.FAILED, "CleanupFailed")
    assert task.error_message.startswith("cancelled, but cleanup failed:")
    assert "undo of step 'make' failed" in task.error_message
    assert [e.action for e in engine.store.ledger(task_id)] == ["created", "leaked"]


def test_undo_false_keeps_what_the_step_made(tmp_path: Path, engine: Engine) -> None:
    src, kept = tmp_path / "src", tmp_path / "kept"
    src.write_text("data")
    write_workflow(
        tmp_path,
        "keep",
        {
            "steps": [
                {
                    "name": "copy",
                    "action": "file.copy",
                    "with": {"src": str(src), "dst": str(kept)},
                    "undo": False,
                },
                {"name": "boom", "action": "util.fail"},
            ]
        },
    )
    task = run(engine, "keep")
    assert task.state is TaskState.FAILED and kept.exists()
    assert ledger(engine, task) == [("created", str(kept))]
    assert any(e.kind == "resource.kept" for e in engine.store.events(task_id=task.id))


def test_scratch_is_reserved_used_and_removed_on_success(tmp_path: Path, engine: Engine) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 5000)
    write_workflow(
        tmp_path,
        "scratchy",
        {
            "steps": [
                {
                    "name": "reserve",
                    "action": "scratch.reserve",
                    "with": {"bytes": "1MiB"},
                    "register": "res",
                },
                {
                    "name": "copy",
                    "action": "file.copy",
                    "with": {"src": str(src), "dst": "{{ task.workdir }}/disk.img"},
                    "register": "copy",
                },
            ]
        },
    )
    task = run(engine, "scratchy")
    assert task.state is TaskState.COMPLETED
    workdir = Path(task.result["res"]["path"])
    assert workdir == tmp_path / "scratch" / task.id
    assert task.result["res"]["bytes"] == 1024 * 1024
    assert task.result["copy"]["path"] == str(workdir / "disk.img")
    assert not workdir.exists()
    assert ScratchSpace(tmp_path / "scratch", quota=1).reserved() == 0
    assert ledger(engine, task) == [
        ("created", str(workdir)),
        ("created", str(workdir / "disk.img")),
        ("removed", str(workdir)),
    ]


def test_scratch_is_removed_and_released_on_failure(tmp_path: Path, engine: Engine) -> None:
    write_workflow(
        tmp_path,
        "scratchfail",
        {
            "steps": [
                {"name": "reserve", "action": "scratch.reserve", "with": {"bytes": 4096}},
                {"name": "too-much", "action": "scratch.reserve", "with": {"bytes": "1GiB"}},
            ]
        },
    )
    task = run(engine, "scratchfail")
    assert (task.state, task.error_code) == (TaskState.FAILED, "InsufficientScratch")
    assert not (tmp_path / "scratch" / task.id).exists()
    assert ScratchSpace(tmp_path / "scratch", quota=1).reserved() == 0
    assert steps(engine, task)["1"].state is StepState.UNDONE


class Raising(EngineCallbacks):
    def on_task_state(self, task: Task) -> None:
        raise RuntimeError("broken reporter")

    def on_step_end(self, task_id: str, step: Any) -> None:
        raise RuntimeError("broken reporter")


def test_callbacks_see_states_steps_progress_and_events(tmp_path: Path) -> None:
    recorder = Recorder()
    engine = Engine(make_config(tmp_path), registry=make_registry(), callbacks=[Raising(), recorder])
    src = tmp_path / "src"
    src.write_bytes(b"y" * 3 * 1024 * 1024)
    write_workflow(
        tmp_path,
        "cb",
        {
            "steps": [
                {"name": "hello", "action": "util.echo", "with": {"message": "hi"}},
                {
                    "name": "copy",
                    "action": "file.copy",
                    "with": {"src": str(src), "dst": str(tmp_path / "dst")},
                },
            ]
        },
    )
    task = run(engine, "cb")
    assert task.state is TaskState.COMPLETED  # a raising callback does not break the task
    calls = recorder.calls
    assert [c[1] for c in calls if c[0] == "state"] == ["pending", "running", "completed"]
    assert [c[1:] for c in calls if c[0] in ("start", "end")] == [
        ("1",),
        ("1", "completed"),
        ("2",),
        ("2", "completed"),
    ]
    assert ("event", "echo", {"step": "1", "message": "hi"}) in calls
    progress = [c[2] for c in calls if c[0] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == 3 * 1024 * 1024
    assert progress[-1]["phase"] == "copy src"
    # the last step's phase ("copy src") stays in its progress; the finished task's phase says it finished
    assert engine.store.get_task(task.id).phase == "completed"


def test_runtime_template_error_names_step_and_field(tmp_path: Path, engine: Engine) -> None:
    write_workflow(
        tmp_path,
        "late",
        {
            "steps": [
                {"name": "maybe", "action": "util.echo", "when": False, "register": "m"},
                {"name": "use", "action": "util.echo", "with": {"x": "{{ m.value }}"}},
            ]
        },
    )
    task = run(engine, "late")
    assert (task.state, task.error_code) == (TaskState.FAILED, "WorkflowInvalid")
    assert "step 'use' (#2): with.x: undefined variable: 'm' is undefined" in task.error_message


def test_rendered_arguments_are_validated_against_the_schema(tmp_path: Path, engine: Engine) -> None:
    write_workflow(
        tmp_path,
        "argtype",
        {
            "params": {"s": {"type": "string", "default": "soon"}},
            "steps": [{"name": "nap", "action": "util.sleep", "with": {"seconds": "{{ s }}"}}],
        },
    )
    task = run(engine, "argtype")
    assert task.state is TaskState.FAILED
    expected = "step 'nap' (#1): with.seconds: 'soon' is not of type 'number'"
    assert expected in task.error_message


@pytest.mark.parametrize(
    "template",
    ["{{ ''.__class__.__mro__ }}", "{{ task.__init__.__globals__ }}", "{{ lst.append(1) }}"],
)
def test_templates_cannot_reach_python_internals(tmp_path: Path, engine: Engine, template: str) -> None:
    write_workflow(
        tmp_path,
        "escape",
        {
            "params": {"lst": {"type": "array", "default": [1]}},
            "steps": [{"name": "evil", "action": "util.echo", "with": {"x": template}}],
        },
    )
    task = run(engine, "escape")
    assert task.state is TaskState.FAILED and "step 'evil' (#1): with.x:" in task.error_message
    assert "unsafe" in task.error_message or "not allowed" in task.error_message


def test_only_pending_tasks_can_be_run(tmp_path: Path, engine: Engine) -> None:
    write_workflow(tmp_path, "one", {"steps": [{"name": "a", "action": "util.echo"}]})
    task = run(engine, "one")
    with pytest.raises(IncorrectState, match="only a pending task"):
        engine.run(task.id)
    cancelled = engine.submit("one")
    engine.store.request_cancel(cancelled)
    with pytest.raises(IncorrectState):
        engine.run(cancelled)
    assert engine.store.step_results(cancelled) == []


def test_task_whose_workflow_broke_after_submit_fails_cleanly(tmp_path: Path, engine: Engine) -> None:
    path = write_workflow(tmp_path, "fragile", {"steps": [{"name": "a", "action": "util.echo"}]})
    task_id = engine.submit("fragile")
    path.write_text("name: fragile\nsteps: [{name: a, action: util.echo, bogus: 1}]\n")
    task = engine.run(task_id)
    assert (task.state, task.error_code) == (TaskState.FAILED, "WorkflowInvalid")
    assert "bogus: unknown key" in task.error_message and task.started_at is None


def test_submit_validates_params_and_stores_paths_resolved(
    tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_workflow(
        tmp_path,
        "p",
        {
            "params": {"n": {"type": "integer", "required": True}},
            "steps": [{"name": "a", "action": "util.echo"}],
        },
    )
    with pytest.raises(UsageError, match="missing required parameter 'n'"):
        engine.submit("p")
    assert engine.store.list_tasks() == []
    by_name = engine.store.get_task(engine.submit("p", {"n": "3"}, coerce_strings=True))
    assert (by_name.workflow, by_name.params) == ("p", {"n": 3})
    monkeypatch.chdir(tmp_path)
    by_path = engine.store.get_task(engine.submit("workflows/p.yaml", {"n": 1}))
    assert by_path.workflow == str(path)  # absolute, so a resume from elsewhere finds it
