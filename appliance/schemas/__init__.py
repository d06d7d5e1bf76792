"""The JSON schemas of the appliance's documents, kept as data files and loaded once.

Like cloud-init's ``schema-cloud-config-v1.json``, each document format has one JSON Schema (draft
2020-12) file in this package, ``<name>.json``:

* ``config`` - the service configuration (:mod:`appliance.config`);
* ``userdata`` - the ``imaging:`` section of the user data (:mod:`appliance.boot.userdata`);
* ``workflow`` - a workflow file (:mod:`appliance.workflow.schema`);
* ``target-file``, ``target-device``, ``target-ec2``, ``target-s3`` - a target's settings
  (``targets.volume`` / ``targets.image`` by ``type``, :mod:`appliance.targets`);
* ``artifact-index`` - the ``index.json`` of an artifact version (:mod:`appliance.artifacts.store`).

Each file has an ``$id`` (:data:`BASE` + file name; the ``.invalid`` host never resolves, and
nothing is ever fetched: :func:`registry` holds every file), a ``title``, and a ``description`` on
every property; the README's field tables are generated from them (:mod:`appliance.cli.doc`).
Files share fragments by ``$ref`` (the user data refers to the service configuration's fields, the
targets to its ``size``) rather than by copies, so a validator needs :func:`registry`; build it
with :func:`validator`.

Besides the standard keywords a property may carry ``default`` (the value used when the key is
absent; :func:`defaults` collects them, and the service configuration's embedded defaults are
exactly those of ``config``) and ``x-default``, the default in words where it is computed
(``<state_dir>/scratch``): documentation only.

The loaded schemas are shared: treat them as read-only.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urldefrag, urljoin

import jsonschema
from referencing import Registry, Resource

#: every schema's ``$id`` is this + ``<name>.json``
BASE = "https://imaging-appliance.invalid/schemas/"

#: the schema files of this package, by name (``<name>.json``)
NAMES = (
    "config",
    "userdata",
    "workflow",
    "target-file",
    "target-device",
    "target-ec2",
    "target-s3",
    "artifact-index",
)


@cache
def load(name: str) -> dict[str, Any]:
    """The schema ``<name>.json`` (parsed once; shared, do not modify)."""
    if name not in NAMES:
        raise KeyError(f"no schema named {name!r} (known: {', '.join(NAMES)})")
    text = resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def registry() -> Registry[Any]:
    """Every schema of the package under its ``$id``, so ``$ref`` between the files resolves."""
    return (
        Registry()
        .with_resources((load(name)["$id"], Resource.from_contents(load(name))) for name in NAMES)
        .crawl()
    )


@cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator of the whole document ``name`` (compiled once)."""
    return jsonschema.Draft202012Validator(load(name), registry=registry())


def validator_for(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator of ``schema``, which may ``$ref`` the package's schemas (by their full ``$id``,
    or relative to its own ``$id``)."""
    return jsonschema.Draft202012Validator(schema, registry=registry())


def resolve(schema: dict[str, Any], base: str) -> tuple[dict[str, Any], str]:
    """``schema`` with its ``$ref`` followed (repeatedly; the keywords beside a ``$ref`` win over
    the target's), and the ``$id`` of the file the target lives in. ``base`` is the ``$id`` of the
    file ``schema`` is in."""
    out = dict(schema)
    while "$ref" in out:
        ref = out.pop("$ref")
        target = registry().resolver(base).lookup(ref).contents
        base = urldefrag(urljoin(base, ref)).url  # the files' ``$id`` are their only base URIs
        out = {**target, **out}
    return out, base


def defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """The ``default`` of every property of ``schema``, nested as the document is: a property with
    a ``default`` gives it; an object without one gives its own properties' defaults, if any."""
    out: dict[str, Any] = {}
    for key, sub in schema.get("properties", {}).items():
        if "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        elif "properties" in sub:
            nested = defaults(sub)
            if nested:
                out[key] = nested
    return out
