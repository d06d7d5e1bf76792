"""Workflow files: locating, schema and semantic validation with located errors, params, registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.errors import UsageError, WorkflowInvalid
from appliance.workflow import Registry, StepUnavailable, WorkflowLoader
from appliance.workflow.finder import SHIPPED_DIR

from .support import make_registry, write_workflow

#: never opens the task database
pytestmark = pytest.mark.backends("sqlite")


@pytest.fixture
def loader(tmp_path: Path) -> WorkflowLoader:
    return WorkflowLoader([tmp_path / "workflows"], registry=make_registry())


def _errors(loader: WorkflowLoader, ref: Any) -> list[str]:
    with pytest.raises(WorkflowInvalid) as exc:
        loader.load(ref)
    return [str(e) for e in exc.value.errors]


def test_loads_a_valid_workflow_with_defaults(tmp_path: Path, loader: WorkflowLoader) -> None:
    path = write_workflow(
        tmp_path,
        "demo",
        {
            "description": "Demo.",
            "params": {"size": {"type": "integer", "default": 3, "description": "how many"}},
            "steps": [
                {"name": "say", "action": "util.echo", "with": {"message": "{{ size }}"}, "register": "said"},
                {
                    "name": "again",
                    "action": "util.echo",
                    "with": {"m": "{{ said.message }}"},
                    "when": "size > 1",
                },
            ],
        },
    )
    wf = loader.load("demo")
    assert (wf.name, wf.description, wf.source, wf.resumable) == ("demo", "Demo.", path, True)
    assert [s.name for s in wf.steps] == ["say", "again"] and wf.steps[0].register == "said"
    assert wf.params["size"].default == 3
    assert loader.load(path).source == path  # by path as well as by name


def test_unknown_key_is_named_with_file_step_and_field(tmp_path: Path, loader: WorkflowLoader) -> None:
    path = write_workflow(
        tmp_path,
        "typo",
        {"steps": [{"name": "nap", "action": "util.sleep", "with": {"seconds": 1}, "tiemout": 3}]},
    )
    [error] = _errors(loader, "typo")
    assert error.startswith(f"{path}: step 'nap' (#1): tiemout: unknown key")


def test_step_without_action_or_include_is_rejected(tmp_path: Path, loader: WorkflowLoader) -> None:
    write_workflow(tmp_path, "noaction", {"steps": [{"name": "ok", "action": "util.echo"}, {"name": "lost"}]})
    [error] = _errors(loader, "noaction")
    assert "step 'lost' (#2)" in error and "exactly one of 'action'" in error


def test_bad_types_name_the_field(tmp_path: Path, loader: WorkflowLoader) -> None:
    write_workflow(
        tmp_path,
        "types",
        {"steps": [{"name": "a", "action": "util.echo", "retries": "two", "when": 3, "loop": 5}]},
    )
    errors = _errors(loader, "types")
    assert any("step 'a' (#1): retries: 'two' is not of type 'integer'" in e for e in errors)
    assert any("step 'a' (#1): when:" in e for e in errors)
    assert any("step 'a' (#1): loop: must be a list or a template expression" in e for e in errors)


def test_unknown_action_lists_the_registered_ones(tmp_path: Path, loader: WorkflowLoader) -> None:
    write_workflow(tmp_path, "unknown", {"steps": [{"name": "x", "action": "nope.step"}]})
    [error] = _errors(loader, "unknown")
    assert "step 'x' (#1): action: unknown action 'nope.step'" in error and "util.echo" in error


def test_undefined_template_variable_is_found_before_running(tmp_path: Path, loader: WorkflowLoader) -> None:
    write_workflow(
        tmp_path,
        "undef",
        {
            "params": {"name": {"type": "string", "default": "x"}},
            "steps": [
                {"name": "early", "action": "util.echo", "with": {"a": "{{ later.value }}"}},
                {
                    "name": "copy",
                    "action": "util.echo",
                    "with": {"dst": "/tmp/{{ nme }}"},
                    "register": "later",
                },
                {"name": "item", "action": "util.echo", "with": {"i": "{{ item }}"}},
            ],
        },
    )
    errors = _errors(loader, "undef")
    assert any("step 'early' (#1): with.a: undefined variable 'later'" in e for e in errors)
    assert any("step 'copy' (#2): with.dst: undefined variable 'nme'" in e for e in errors)
    assert any(
        "step 'item' (#3): with.i: undefined variable 'item'" in e and "only in a step with 'loop'" in e
        for e in errors
    )


def test_template_syntax_error_names_the_field(tmp_path: Path, loader: WorkflowLoader) -> None:
    write_workflow(
        tmp_path, "syntax", {"steps": [{"name": "a", "action": "util.echo", "with": {"x": "{{ 1 + }}"}}]}
    )
    [error] = _errors(loader, "syntax")
    assert "step 'a' (#1): with.x: template syntax error" in error


def test_literal_arguments_are_checked_against_the_action_schema(
    tmp_path: Path, loader: WorkflowLoader
) -> None:
    write_workflow(
        tmp_path,
        "args",
        {
            "params": {"s": {"type": "string", "default": "1"}},
            "steps": [
                {"name": "bad", "action": "util.sleep", "with": {"seconds": "soon"}},
                {"name": "missing", "action": "file.copy", "with": {"src": "/a"}},
                # A template is checked after rendering, not now.
                {"name": "templated", "action": "util.sleep", "with": {"seconds": "{{ s }}"}},
            ],
        },
    )
    errors = _errors(loader, "args")
    assert len(errors) == 2
    expected = "step 'bad' (#1): with.seconds: 'soon' is not of type 'number'"
    assert expected in errors[0]
    assert "step 'missing' (#2): with: 'dst' is required" in errors[1]


def test_duplicate_yaml_keys_and_bad_yaml_are_errors(tmp_path: Path, loader: WorkflowLoader) -> None:
    (tmp_path / "workflows").mkdir()
    dup = tmp_path / "workflows" / "dup.yaml"
    dup.write_text("name: dup\nsteps:\n  - name: a\n    action: util.echo\n    action: util.fail\n")
    [error] = _errors(loader, "dup")
    assert "duplicate key 'action'" in error and "line 5" in error
    broken = tmp_path / "workflows" / "broken.yaml"
    broken.write_text("name: broken\nsteps: [\n")
    assert "not valid YAML" in _errors(loader, "broken")[0]


def test_names_and_registers_must_be_unique_and_not_reserved(tmp_path: Path, loader: WorkflowLoader) -> None:
    write_workflow(
        tmp_path,
        "dups",
        {
            "params": {"size": {"type": "integer", "default": 1}},
            "steps": [
                {"name": "a", "action": "util.echo", "register": "r"},
                {"name": "a", "action": "util.echo", "register": "r"},
                {"name": "b", "action": "util.echo", "register": "size"},
                {"name": "c", "action": "util.echo", "register": "item"},
            ],
        },
    )
    errors = "\n".join(_errors(loader, "dups"))
    assert "step 'a' (#2): name: another step has the same name" in errors
    assert "step 'a' (#2): register: 'r' is already registered" in errors
    assert "step 'b' (#3): register: 'size' is already a parameter name" in errors
    assert "step 'c' (#4): register: 'item' is reserved" in errors


def test_include_cycle_is_detected(tmp_path: Path, loader: WorkflowLoader) -> None:
    write_workflow(tmp_path, "a", {"steps": [{"name": "to-b", "include": "b"}]})
    write_workflow(tmp_path, "b", {"steps": [{"name": "to-a", "include": "a.yaml"}]})
    errors = "\n".join(_errors(loader, "a"))
    assert "include cycle: a.yaml -> b.yaml -> a.yaml" in errors


def test_include_params_are_checked_statically(tmp_path: Path, loader: WorkflowLoader) -> None:
    write_workflow(
        tmp_path,
        "inner",
        {
            "params": {"n": {"type": "integer", "required": True}},
            "steps": [{"name": "x", "action": "util.echo"}],
        },
    )
    write_workflow(
        tmp_path,
        "outer",
        {
            "steps": [
                {"name": "missing", "include": "inner"},
                {"name": "extra", "include": "inner", "with": {"n": 1, "m": 2}},
                {"name": "badtype", "include": "inner", "with": {"n": "three"}},
                {"name": "notallowed", "include": "inner", "with": {"n": 1}, "retries": 2},
                {"name": "nowhere", "include": "does-not-exist"},
            ]
        },
    )
    errors = "\n".join(_errors(loader, "outer"))
    assert "step 'missing' (#1): with: 'inner' needs parameter 'n'" in errors
    assert "step 'extra' (#2): with.m: 'inner' has no parameter 'm'" in errors
    assert "step 'badtype' (#3): with.n: must be integer" in errors
    assert "step 'notallowed' (#4): retries: not allowed on an include step" in errors
    assert "step 'nowhere' (#5): include: no workflow named 'does-not-exist'" in errors


def test_errors_inside_an_included_file_name_that_file(tmp_path: Path, loader: WorkflowLoader) -> None:
    inner = write_workflow(tmp_path, "inner", {"steps": [{"name": "x", "action": "util.echo", "bogus": 1}]})
    write_workflow(tmp_path, "outer", {"steps": [{"name": "inc", "include": "inner"}]})
    [error] = _errors(loader, "outer")
    assert "step 'inc' (#1): include: included workflow is invalid" in error
    assert f"{inner}: step 'x' (#1): bogus: unknown key" in error


def test_params_are_validated_and_defaulted(tmp_path: Path, loader: WorkflowLoader) -> None:
    write_workflow(
        tmp_path,
        "params",
        {
            "params": {
                "src": {"type": "string", "required": True},
                "size": {"type": "integer", "default": 10},
                "fast": {"type": "boolean", "default": False},
                "tags": {"type": "array"},
            },
            "steps": [{"name": "a", "action": "util.echo"}],
        },
    )
    wf = loader.load("params")
    assert wf.resolve_params({"src": "/x"}) == {"src": "/x", "size": 10, "fast": False}
    with pytest.raises(UsageError, match="missing required parameter 'src'"):
        wf.resolve_params({})
    with pytest.raises(UsageError, match="unknown parameter 'sise'"):
        wf.resolve_params({"src": "/x", "sise": 1})
    with pytest.raises(UsageError, match="parameter 'size' must be integer"):
        wf.resolve_params({"src": "/x", "size": "ten"})
    with pytest.raises(UsageError, match="parameter 'size' must be integer"):
        wf.resolve_params({"src": "/x", "size": True})  # a bool is not a number
    # Command-line values arrive as strings.
    coerced = wf.resolve_params(
        {"src": "/x", "size": "12", "fast": "yes", "tags": '["a"]'}, coerce_strings=True
    )
    assert coerced == {"src": "/x", "size": 12, "fast": True, "tags": ["a"]}


def test_param_declarations_are_validated(tmp_path: Path, loader: WorkflowLoader) -> None:
    write_workflow(
        tmp_path,
        "badtype",
        {"params": {"c": {"type": "float"}}, "steps": [{"name": "a", "action": "util.echo"}]},
    )
    assert "params.c.type: 'float' is not one of" in _errors(loader, "badtype")[0]
    write_workflow(
        tmp_path,
        "decl",
        {
            "params": {
                "a": {"type": "integer", "default": "x"},
                "b": {"type": "string", "required": True, "default": "y"},
                "task": {"type": "string"},
            },
            "steps": [{"name": "a", "action": "util.echo"}],
        },
    )
    errors = "\n".join(_errors(loader, "decl"))
    assert "params.a.default: default 'x' is not integer" in errors
    assert "params.b: a required parameter cannot have a default" in errors
    assert "params.task: 'task' is reserved" in errors


def test_operator_directories_come_before_shipped_workflows(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for d, text in ((first, "from first"), (second, "from second")):
        d.mkdir()
        (d / "same.yaml").write_text(
            f"name: same\ndescription: {text}\nsteps: [{{name: a, action: util.echo}}]\n"
        )
    (second / "other.yml").write_text("name: other\nsteps: [{name: a, action: util.echo}]\n")
    (second / "mismatch.yaml").write_text("name: different\nsteps: [{name: a, action: util.echo}]\n")
    loader = WorkflowLoader([first, second], registry=make_registry(), shipped_dir=None)
    assert loader.load("same").description == "from first"
    infos = {i.name: i for i in loader.list()}
    assert set(infos) == {"same", "other", "mismatch"}
    assert infos["same"].source == first / "same.yaml" and infos["same"].description == "from first"
    assert infos["other"].error is None and "does not match" in infos["mismatch"].error
    with pytest.raises(UsageError, match="no workflow named 'absent'"):
        loader.load("absent")


def test_shipped_directory_is_searched_last() -> None:
    loader = WorkflowLoader([], registry=make_registry())
    assert loader.search_dirs == [SHIPPED_DIR]
    assert SHIPPED_DIR.name == "workflows" and SHIPPED_DIR.parent.name == "appliance"


def test_registry_loads_builtin_steps_from_entry_points() -> None:
    registry = Registry()
    for name in ("util.echo", "util.fail", "util.sleep", "file.copy", "file.remove", "scratch.reserve"):
        assert name in registry
        assert callable(registry.get(name).run)
    assert registry.get("file.copy").schema["required"] == ["src", "dst"]
    with pytest.raises(StepUnavailable, match=r"unknown action 'no\.such'"):
        registry.get("no.such")


@pytest.fixture
def broken_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real installed distribution whose ``imaging.steps`` entry point cannot be imported."""
    site = tmp_path / "site"
    dist = site / "broken_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[imaging.steps]\nbroken.step = broken_plugin_missing_module:Step\n"
    )
    monkeypatch.syspath_prepend(str(site))


@pytest.mark.usefixtures("broken_plugin")
def test_broken_entry_point_is_reported_when_used_not_at_load(tmp_path: Path) -> None:
    registry = Registry()  # listing entry points imports nothing, so this does not fail
    assert "broken.step" in registry.names()
    with pytest.raises(StepUnavailable) as exc:
        registry.get("broken.step")
    assert "broken_plugin_missing_module:Step" in exc.value.message
    assert "ModuleNotFoundError" in exc.value.message
    assert registry.get("util.echo")  # the others still work
    status = {i.name: i for i in registry.describe()}
    assert not status["broken.step"].ok and status["util.echo"].ok

    write_workflow(tmp_path, "uses", {"steps": [{"name": "b", "action": "broken.step"}]})
    loader = WorkflowLoader([tmp_path / "workflows"], registry=registry)
    [error] = _errors(loader, "uses")
    assert "step 'b' (#1): action: action 'broken.step' cannot be loaded" in error


def test_in_process_registration_rejects_non_steps_and_duplicates() -> None:
    registry = Registry(entry_points=False)

    class Good:
        schema = {"type": "object"}

        def run(self, ctx: Any) -> None:
            return None

    registry.register("x.good", Good)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("x.good", Good)
    with pytest.raises(TypeError, match="run"):
        registry.register("x.bad", object)
    assert registry.names() == ["x.good"]
