"""Template rendering: native values, strict undefined, sandbox, conditions, dry-run placeholders."""

from __future__ import annotations

import pytest

from appliance.workflow.templating import (
    TemplateProblem,
    Templater,
    UnknownResult,
    UnknownValue,
    contains_template,
    placeholders_to_text,
)

#: never opens the task database
pytestmark = pytest.mark.backends("sqlite")


@pytest.fixture
def t() -> Templater:
    return Templater()


def test_a_single_expression_keeps_its_native_type(t: Templater) -> None:
    scope = {"size": 10, "names": ["a", "b"], "info": {"format": "raw"}}
    assert t.render("{{ size }}", scope, "with.x") == 10
    assert t.render(" {{ size * 2 }} ", scope, "with.x") == 20
    assert t.render("{{ names }}", scope, "with.x") == ["a", "b"]
    assert t.render("{{ info }}", scope, "with.x") == {"format": "raw"}
    assert t.render("{{ size > 3 }}", scope, "with.x") is True
    assert t.render("{{ (1, 2) }}", scope, "with.x") == [1, 2]  # tuples become JSON lists


def test_text_around_expressions_renders_a_string(t: Templater) -> None:
    scope = {"size": 10, "path": "/a/b/disk.img"}
    assert t.render("{{ size }} bytes", scope, "f") == "10 bytes"
    assert t.render("{{ size }}{{ size }}", scope, "f") == "1010"
    assert t.render("{{ path | basename }} in {{ path | dirname }}", scope, "f") == "disk.img in /a/b"
    assert t.render("{{ '2KiB' | bytes }}", scope, "f") == 2048
    assert t.render("no template", scope, "f") == "no template"


def test_nested_values_are_rendered_with_field_paths_in_errors(t: Templater) -> None:
    value = {"a": ["{{ x }}", {"b": "{{ y }}"}]}
    assert t.render(value, {"x": 1, "y": "z"}, "with") == {"a": [1, {"b": "z"}]}
    with pytest.raises(TemplateProblem) as exc:
        t.render(value, {"x": 1}, "with")
    assert exc.value.field == "with.a[1].b"
    assert exc.value.message == "undefined variable: 'y' is undefined"


@pytest.mark.parametrize("template", ["{{ missing }}", "{{ [missing] }}", "x{{ missing }}", "{{ d.nokey }}"])
def test_undefined_names_are_errors_never_empty_strings(t: Templater, template: str) -> None:
    with pytest.raises(TemplateProblem, match="undefined"):
        t.render(template, {"d": {}}, "with.v")


def test_results_must_be_json_data(t: Templater) -> None:
    with pytest.raises(TemplateProblem, match="not JSON data"):
        t.render("{{ range }}", {}, "with.v")


def test_sandbox_refuses_internals_and_mutation(t: Templater) -> None:
    with pytest.raises(TemplateProblem, match="unsafe"):
        t.render("{{ ''.__class__ }}", {}, "f")
    data = {"lst": [1]}
    with pytest.raises(TemplateProblem, match="unsafe"):
        t.render("{{ lst.append(2) }}", data, "f")
    assert data == {"lst": [1]}


def test_conditions_accept_bare_and_braced_expressions(t: Templater) -> None:
    assert t.condition("size > 3", {"size": 4}) is True
    assert t.condition("{{ size > 3 }}", {"size": 1}) is False
    assert t.condition(True, {}) is True
    assert t.condition("x is defined", {}) is False
    with pytest.raises(TemplateProblem, match="one expression"):
        t.condition("size is {{ size }}", {"size": 1})


def test_referenced_names_drive_the_static_check(t: Templater) -> None:
    names = t.referenced_names(
        {"a": "{{ x.y + z }}", "b": ["{% for i in items %}{{ i }}{% endfor %}"]}, "with"
    )
    assert names == {"with.a": {"x", "z"}, "with.b[0]": {"items"}}
    assert t.condition_names("item.size > limit") == {"item", "limit"}
    assert contains_template({"a": [1, "{{ x }}"]}) and not contains_template({"a": "x"})


def test_unknown_results_render_as_placeholders_and_refuse_truth(t: Templater) -> None:
    scope = {"inspect": UnknownResult("result of step 'inspect'")}
    assert str(t.render("{{ inspect.format }}", scope, "f")) == "<result of step 'inspect'.format>"
    assert t.render("/x/{{ inspect.name }}.img", scope, "f") == "/x/<result of step 'inspect'.name>.img"
    assert str(t.render("{{ inspect.size * 2 }}", scope, "f")) == "<result of step 'inspect'.size * 2>"
    verdict = t.condition("inspect.format == 'raw'", scope)
    assert isinstance(verdict, UnknownResult)
    with pytest.raises(UnknownValue):
        t.condition("inspect.a and inspect.b", scope)
    assert placeholders_to_text({"a": [scope["inspect"]]}) == {"a": ["<result of step 'inspect'>"]}
