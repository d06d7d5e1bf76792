"""Jinja2 templating of step arguments, conditions and loops.

Workflow files come from operators but are treated as untrusted-ish: templates render in an
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` (no ``_``-attributes, so no route to
Python internals, and no mutation of registered results) with :class:`~jinja2.StrictUndefined`
(a misspelt name is an error, never an empty string).

A string that is exactly one expression (``"{{ size }}"``) evaluates to the expression's native
value (an int stays an int, a list a list); any other string containing ``{{``/``{%`` renders to
a string. ``when`` is a bare expression (``size > 0``); ``"{{ size > 0 }}"`` is accepted too.

Dry runs bind the results of steps that have not run to :class:`UnknownResult`, a placeholder
that renders as ``<result of step 'inspect'>``, propagates through attribute access, indexing,
comparison and arithmetic (``inspect.size * 2`` → ``<result of step 'inspect'.size * 2>``) and
refuses to be used as a truth value or iterated, which the planner reports as "undetermined".
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jinja2
from jinja2 import StrictUndefined, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..config import parse_size

_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\{\{|\}\}|\{%|%\}|\{#).)*)\}\}\s*$", re.S)


class TemplateProblem(Exception):
    """A template failed to parse or render; ``field`` says where (e.g. ``with.dst``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownValue(Exception):
    """An :class:`UnknownResult` was used where a concrete value is needed (truth test, loop)."""

    def __init__(self, unknown: UnknownResult) -> None:
        super().__init__(str(unknown))
        self.unknown = unknown


class UnknownResult:
    """Placeholder for a value a dry run cannot know (the result of a step that did not run)."""

    __slots__ = ("_label",)

    def __init__(self, label: str) -> None:
        object.__setattr__(self, "_label", label)

    def __str__(self) -> str:
        return f"<{self._label}>"

    __repr__ = __str__

    def __getattr__(self, name: str) -> UnknownResult:
        if name.startswith("_"):
            raise AttributeError(name)
        return UnknownResult(f"{self._label}.{name}")

    def __getitem__(self, key: Any) -> UnknownResult:
        return UnknownResult(f"{self._label}[{key!r}]")

    def _op(symbol: str, reflected: bool = False) -> Callable[[UnknownResult, Any], UnknownResult]:  # type: ignore[misc]
        def op(self: UnknownResult, other: Any) -> UnknownResult:
            other_text = str(other) if isinstance(other, UnknownResult) else repr(other)
            if reflected:
                return UnknownResult(f"{other_text} {symbol} {self._label}")
            return UnknownResult(f"{self._label} {symbol} {other_text}")

        return op

    __eq__ = _op("==")  # type: ignore[assignment]
    __ne__ = _op("!=")  # type: ignore[assignment]
    __lt__ = _op("<")
    __le__ = _op("<=")
    __gt__ = _op(">")
    __ge__ = _op(">=")
    __add__ = _op("+")
    __radd__ = _op("+", True)
    __sub__ = _op("-")
    __rsub__ = _op("-", True)
    __mul__ = _op("*")
    __rmul__ = _op("*", True)
    __truediv__ = _op("/")
    __floordiv__ = _op("//")
    __mod__ = _op("%")
    __contains__ = None  # `x in unknown` → TypeError → "undetermined"
    del _op

    def __hash__(self) -> int:
        return id(self)

    def __bool__(self) -> bool:
        raise UnknownValue(self)

    def __iter__(self) -> Iterator[Any]:
        raise UnknownValue(self)

    def __len__(self) -> int:
        raise UnknownValue(self)

    def __int__(self) -> int:
        raise UnknownValue(self)

    def __float__(self) -> float:
        raise UnknownValue(self)


def _basename(path: Any) -> Any:
    return (
        UnknownResult(f"{path._label} | basename")
        if isinstance(path, UnknownResult)
        else os.path.basename(path)
    )


def _dirname(path: Any) -> Any:
    return (
        UnknownResult(f"{path._label} | dirname")
        if isinstance(path, UnknownResult)
        else os.path.dirname(path)
    )


def _bytes(size: Any) -> Any:
    return UnknownResult(f"{size._label} | bytes") if isinstance(size, UnknownResult) else parse_size(size)


def contains_template(value: Any) -> bool:
    """Whether ``value`` (or anything nested in it) is a string with Jinja markup."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, dict):
        return any(contains_template(v) for v in value.values())
    if isinstance(value, list):
        return any(contains_template(v) for v in value)
    return False


def contains_unknown(value: Any) -> bool:
    """Whether a rendered value still holds a dry-run placeholder."""
    if isinstance(value, UnknownResult):
        return True
    if isinstance(value, dict):
        return any(contains_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(contains_unknown(v) for v in value)
    return False


def placeholders_to_text(value: Any) -> Any:
    """A copy of ``value`` with every :class:`UnknownResult` replaced by its text (JSON-able)."""
    if isinstance(value, UnknownResult):
        return str(value)
    if isinstance(value, dict):
        return {k: placeholders_to_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [placeholders_to_text(v) for v in value]
    return value


class Templater:
    """Renders workflow values; one instance is shared by loader, engine and planner."""

    def __init__(self) -> None:
        self.env = ImmutableSandboxedEnvironment(
            undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
        )
        # Small, side-effect-free helpers operators need for paths and sizes.
        self.env.filters.update(basename=_basename, dirname=_dirname, bytes=_bytes)
        self._expressions: dict[str, Any] = {}
        self._templates: dict[str, jinja2.Template] = {}

    @property
    def global_names(self) -> frozenset[str]:
        """Names every template may use without declaring them (``range``, ``dict``, …)."""
        return frozenset(self.env.globals)

    # -- static analysis ----------------------------------------------------------------------

    def referenced_names(self, value: Any, field: str) -> dict[str, set[str]]:
        """Free variable names per templated field path in ``value`` (raises on syntax errors)."""
        found: dict[str, set[str]] = {}

        def walk(v: Any, path: str) -> None:
            if isinstance(v, str) and contains_template(v):
                try:
                    found[path] = set(meta.find_undeclared_variables(self.env.parse(v)))
                except jinja2.TemplateSyntaxError as exc:
                    raise TemplateProblem(path, f"template syntax error: {exc.message}") from None
            elif isinstance(v, dict):
                for k, item in v.items():
                    walk(item, f"{path}.{k}")
            elif isinstance(v, list):
                for i, item in enumerate(v):
                    walk(item, f"{path}[{i}]")

        walk(value, field)
        return found

    def condition_names(self, expr: str, field: str = "when") -> set[str]:
        """Free variable names of a ``when`` expression (raises on syntax errors)."""
        return self.referenced_names("{{ " + self.condition_source(expr, field) + " }}", field).get(
            field, set()
        )

    @staticmethod
    def condition_source(expr: str, field: str = "when") -> str:
        """The bare expression of a condition, accepting ``x > 1`` and ``{{ x > 1 }}``."""
        m = _SINGLE_EXPRESSION.match(expr)
        if m:
            return m.group("expr").strip()
        if "{{" in expr or "{%" in expr:
            raise TemplateProblem(
                field, "must be one expression (e.g. `size > 0`), not text with templates in it"
            )
        return expr.strip()

    # -- rendering -----------------------------------------------------------------------------

    def render(self, value: Any, variables: Mapping[str, Any], field: str) -> Any:
        """Render every template in ``value`` (nested dicts/lists too) against ``variables``."""
        if isinstance(value, str):
            if not contains_template(value):
                return value
            m = _SINGLE_EXPRESSION.match(value)
            if m:
                return self._check(self._evaluate(m.group("expr"), variables, field), field)
            try:
                template = self._templates.get(value)
                if template is None:
                    template = self._templates[value] = self.env.from_string(value)
                return template.render(variables)
            except UnknownValue:
                raise
            except jinja2.TemplateError as exc:
                raise TemplateProblem(field, _describe(exc)) from None
            except Exception as exc:  # a filter or operator failing on the data (e.g. 1 + 'a')
                raise TemplateProblem(field, f"{type(exc).__name__}: {exc}") from None
        if isinstance(value, dict):
            return {k: self.render(v, variables, f"{field}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.render(v, variables, f"{field}[{i}]") for i, v in enumerate(value)]
        return value

    def condition(self, expr: str | bool, variables: Mapping[str, Any], field: str = "when") -> Any:
        """Evaluate a ``when`` condition to a bool (or an :class:`UnknownResult` in a dry run)."""
        if isinstance(expr, bool):
            return expr
        value = self._evaluate(self.condition_source(expr, field), variables, field)
        if isinstance(value, UnknownResult):
            return value
        self._check(value, field)
        return bool(value)

    def _evaluate(self, source: str, variables: Mapping[str, Any], field: str) -> Any:
        try:
            compiled = self._expressions.get(source)
            if compiled is None:
                compiled = self._expressions[source] = self.env.compile_expression(
                    source, undefined_to_none=False
                )
            return compiled(**variables)
        except UnknownValue:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateProblem(field, _describe(exc)) from None
        except Exception as exc:
            raise TemplateProblem(field, f"{type(exc).__name__}: {exc}") from None

    def _check(self, value: Any, field: str) -> Any:
        """Reject results that are not JSON data (an undefined name, an object, a function)."""
        if isinstance(value, jinja2.Undefined):
            try:
                str(value)  # raises the deferred error: the undefined name, or a sandbox refusal
            except jinja2.TemplateError as exc:
                raise TemplateProblem(field, _describe(exc)) from None
            raise TemplateProblem(field, "undefined value")
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, list):
            return [self._check(v, f"{field}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TemplateProblem(field, f"mapping key {k!r} is not a string")
                out[k] = self._check(v, f"{field}.{k}")
            return out
        if isinstance(value, str):
            return str(value)  # a plain str even if a filter produced Markup
        if value is None or isinstance(value, bool | int | float | UnknownResult):
            return value
        raise TemplateProblem(field, f"evaluates to a {type(value).__name__}, which is not JSON data")


def _describe(exc: jinja2.TemplateError) -> str:
    if isinstance(exc, jinja2.UndefinedError):
        return f"undefined variable: {exc.message}"
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"template syntax error: {exc.message}"
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return f"not allowed in a workflow template: {exc.message}"
    return exc.message or type(exc).__name__


def touches_template(args: Any, path: list[Any]) -> bool:
    """Whether the value at ``path`` inside ``args`` (or any value on the way) is a template."""
    value = args
    for part in path:
        if isinstance(value, str):
            break
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return False
        if isinstance(value, str) and contains_template(value):
            return True
    return isinstance(value, str) and contains_template(value)
