"""The README's generated tables: the schemas' fields as Markdown, and the guest finding codes.

:func:`field_table` renders one schema as a table (field, type, default, description), from the
``description``, ``default`` / ``x-default`` and validation keywords of each property. A ``$ref``
within the file is expanded (``sources.s3.endpoint_url``); a ``$ref`` to another file is one row whose
description says where its fields are documented (the user data's ``hooks`` is the service
configuration's).

README.md holds each generated block between two markers::

    <!-- BEGIN GENERATED config: python -m appliance.cli.doc -->
    ...
    <!-- END GENERATED config -->

``python -m appliance.cli.doc [README.md]`` rewrites the blocks in place; with ``--check`` it
changes nothing and exits 1 naming the blocks that are out of date. The test suite runs the check.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

import yaml

from ..guest import codes
from ..schemas import load, resolve

#: the target settings schemas, in the order the README lists them
TARGETS = ("target-file", "target-device", "target-ec2", "target-s3")

_BEGIN = "<!-- BEGIN GENERATED {name}: python -m appliance.cli.doc -->"
_END = "<!-- END GENERATED {name} -->"


def _code(value: Any) -> str:
    """``value`` as it is written in YAML, in backticks."""
    if isinstance(value, str) and value and not value.startswith(("[", "{", "*", "&", "!", "`")):
        text = value
    else:
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
        text = text.removesuffix("\n...").strip()
    return f"`{text}`"


def _bounds(node: dict[str, Any]) -> str:
    low = node.get("minimum")
    high = node.get("maximum")
    if "exclusiveMinimum" in node:
        return f" > {node['exclusiveMinimum']}"
    if low is not None and high is not None:
        return f", {low}\N{EN DASH}{high}"
    if low is not None:
        return f" ≥ {low}"
    if high is not None:
        return f" ≤ {high}"
    return ""


def type_text(node: dict[str, Any], base: str) -> str:
    """The type column: a type or a list of allowed values, and numeric bounds."""
    node, base = resolve(node, base)
    if "const" in node:
        return _code(node["const"])
    if "enum" in node:
        return "one of " + ", ".join(_code(v) for v in node["enum"])
    if "oneOf" in node and "type" not in node:
        return node.get("title") or " or ".join(type_text(s, base) for s in node["oneOf"])
    kind = node.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        items = node.get("items")
        if not isinstance(items, dict):
            return "list"
        item, _ = resolve(items, base)
        if item.get("type") == "object":
            return f"list of {item.get('title') or 'objects'}"
        return f"list of {type_text(items, base)}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        text = f"map of {type_text(node['additionalProperties'], base)}"
        keys = (node.get("propertyNames") or {}).get("enum")
        return f"{text} (keys: {', '.join(_code(k) for k in keys)})" if keys else text
    if kind in ("integer", "number"):
        return kind + _bounds(node)
    if kind is None:
        return node.get("title") or "any"
    return str(kind)


def _default_text(node: dict[str, Any], required: bool) -> str:
    if "default" in node:
        return _code(node["default"])
    if "x-default" in node:
        return str(node["x-default"])
    return "*required*" if required else ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _other_file(node: dict[str, Any], base: str) -> bool:
    """Whether ``node`` is a ``$ref`` into another schema file."""
    ref = node.get("$ref")
    return ref is not None and urldefrag(urljoin(base, ref)).url != base


def _children(node: dict[str, Any], base: str, path: str) -> Iterator[tuple[str, dict[str, Any], bool, str]]:
    """The documented fields inside ``node`` (resolved): properties, those of list items and of map
    values, as (path, schema, required, base)."""
    required = set(node.get("required", ()))
    for key, sub in node.get("properties", {}).items():
        yield f"{path}.{key}" if path else key, sub, key in required, base
    items = node.get("items")
    if node.get("type") == "array" and isinstance(items, dict):
        item, item_base = resolve(items, base)
        yield from _children(item, item_base, f"{path}[]")
    values = node.get("additionalProperties")
    if isinstance(values, dict) and "properties" not in node:
        key = (node.get("propertyNames") or {}).get("title", "name")
        value, value_base = resolve(values, base)
        yield from _children(value, value_base, f"{path}.<{key}>")


def _rows(node: dict[str, Any], base: str, path: str) -> Iterator[list[str]]:
    for field, sub, required, sub_base in _children(node, base, path):
        resolved, resolved_base = resolve(sub, sub_base)
        description = resolved.get("description", "")
        yield [f"`{field}`", type_text(sub, sub_base), _default_text(resolved, required), description]
        if not _other_file(sub, sub_base):
            yield from _rows(resolved, resolved_base, field)


def field_table(name: str) -> str:
    """Every field of the schema ``name`` as a Markdown table, in the schema's order."""
    schema = load(name)
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for row in _rows(schema, schema["$id"], ""):
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def target_tables() -> str:
    """The settings of each target (its title and description, then its fields)."""
    parts = []
    for name in TARGETS:
        schema = load(name)
        parts.append(f"**{schema['title']}** (`{name}.json`): {schema['description']}\n\n{field_table(name)}")
    return "\n\n".join(parts)


#: the generated blocks of README.md, by name
BLOCKS: dict[str, Callable[[], str]] = {
    "config": lambda: field_table("config"),
    "targets": target_tables,
    "userdata": lambda: field_table("userdata"),
    "guest-codes": codes.markdown_table,
}


def _block(name: str) -> re.Pattern[str]:
    begin, end = re.escape(_BEGIN.format(name=name)), re.escape(_END.format(name=name))
    return re.compile(f"({begin}\n)(.*?)(^{end})", re.DOTALL | re.MULTILINE)


def update(text: str) -> str:
    """``text`` (README.md) with every generated block filled anew; ValueError if one is missing."""
    for name, render in BLOCKS.items():
        pattern = _block(name)
        if len(pattern.findall(text)) != 1:
            raise ValueError(
                f"README needs exactly one block {_BEGIN.format(name=name)} ... {_END.format(name=name)}"
            )
        text = pattern.sub(_filler(render()), text)
    return text


def _filler(content: str) -> Callable[[re.Match[str]], str]:
    """The replacement of a block's match: its markers around ``content``."""
    return lambda m: m.group(1) + content + "\n" + m.group(3)


def stale(text: str) -> list[str]:
    """The names of the blocks of ``text`` that differ from what the sources generate."""
    fresh = update(text)
    return [name for name in BLOCKS if _block(name).findall(text) != _block(name).findall(fresh)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.cli.doc", description="Regenerate the README's generated tables."
    )
    parser.add_argument("readme", nargs="?", default="README.md", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    try:
        out_of_date = stale(text)
    except ValueError as exc:
        print(f"{args.readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for name in out_of_date:
            print(
                f"{args.readme}: block {name!r} is out of date (python -m appliance.cli.doc)",
                file=sys.stderr,
            )
        return 1 if out_of_date else 0
    if out_of_date:
        args.readme.write_text(update(text), encoding="utf-8")
        print(f"{args.readme}: regenerated {', '.join(out_of_date)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
