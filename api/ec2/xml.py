"""Model-driven XML serializer for EC2 Query responses.

Walks the operation's output shape from botocore's model, so element names, nesting and list
wrapping are exactly what botocore's ``EC2QueryParser`` expects:

- root ``<{Action}Response xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">``, ``<requestId>`` first;
- members by ``locationName`` (falling back to the member name);
- lists as ``<listName><item>…</item></listName>`` — never an extra wrapper inside ``<item>``
  (AWS's own DescribeConversionTasks sample has one, and botocore parses it to ``[{}]``);
- booleans ``true``/``false``, timestamps ``2026-11-22T04:00:00.000Z``, empty lists ``<x/>``.

Operations without an output shape (CancelConversionTask) answer ``<return>true</return>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from botocore.model import ListShape, Shape, StructureShape

from . import model

# Characters XML 1.0 cannot carry at all; a task message could contain them (e.g. from a tool's
# output), and one of them would make the whole document unparseable for the client.
_INVALID_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def escape_text(value: str) -> str:
    """``value`` made safe as XML character data."""
    value = _INVALID_XML_CHARS.sub("\ufffd", value)
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def format_timestamp(value: datetime | str) -> str:
    """ISO-8601 UTC with milliseconds and ``Z`` (``2026-11-22T04:00:00.000Z``), as EC2 sends."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def render(action: str, data: Mapping[str, Any] | None, request_id: str) -> bytes:
    """The success document for ``action`` with output ``data`` (botocore member names).

    Raises ``ValueError`` when ``data`` has a member the output shape does not define, or a
    value of the wrong type: that is a bug in the caller, never something a client can cause.
    """
    op = model.operation(action)
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        f'<{action}Response xmlns="{model.XML_NAMESPACE}">',
        f"<requestId>{escape_text(request_id)}</requestId>",
    ]
    shape = op.output_shape
    if shape is None:
        if data:
            raise ValueError(f"{action} has no output shape but data was given: {sorted(data)}")
        out.append("<return>true</return>")
    else:
        _members(out, shape, data or {}, action)
    out.append(f"</{action}Response>")
    return "".join(out).encode("utf-8")


def _members(out: list[str], shape: StructureShape, data: Mapping[str, Any], path: str) -> None:
    members = shape.members
    unknown = set(data) - set(members)
    if unknown:
        raise ValueError(f"{path}: {shape.name} has no member(s) {sorted(unknown)}")
    # Model order, so the document is stable whatever order the caller built the dict in.
    for name, member in members.items():
        value = data.get(name)
        if value is None:
            continue
        tag = model.response_name(name, member)
        _element(out, tag, member, value, f"{path}.{name}")


def _element(out: list[str], tag: str, shape: Shape, value: Any, path: str) -> None:
    kind = shape.type_name
    if isinstance(shape, StructureShape):
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a mapping for {shape.name}, got {type(value).__name__}")
        out.append(f"<{tag}>")
        _members(out, shape, value, path)
        out.append(f"</{tag}>")
    elif isinstance(shape, ListShape):
        if isinstance(value, str | bytes | Mapping):
            raise ValueError(f"{path}: expected a list, got {type(value).__name__}")
        items = list(value)
        if not items:
            out.append(f"<{tag}/>")
            return
        item_tag = shape.member.serialization.get("name", "member")
        out.append(f"<{tag}>")
        for i, item in enumerate(items):
            _element(out, item_tag, shape.member, item, f"{path}[{i}]")
        out.append(f"</{tag}>")
    else:
        out.append(f"<{tag}>{escape_text(_scalar(kind, value, path))}</{tag}>")


def _scalar(kind: str, value: Any, path: str) -> str:
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected a bool, got {value!r}")
        return "true" if value else "false"
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: expected an int, got {value!r}")
        return str(value)
    if kind in ("double", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{path}: expected a finite number, got {value!r}")
        return repr(float(value))
    if kind == "timestamp":
        if not isinstance(value, datetime | str):
            raise ValueError(f"{path}: expected a datetime, got {value!r}")
        return format_timestamp(value)
    if kind in ("string", "blob"):
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a str, got {value!r}")
        return value
    raise ValueError(f"{path}: unsupported shape type {kind}")
