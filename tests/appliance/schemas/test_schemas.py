"""The schema files: well-formed, documented, linked by $ref, packaged, and their defaults true."""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from appliance import config, schemas
from appliance.boot import userdata
from appliance.targets.device import DeviceVolumeTarget
from appliance.targets.ec2 import Ec2VolumeTarget
from appliance.targets.file import FileImageTarget, FileVolumeTarget
from appliance.targets.s3 import S3ImageTarget

REPO = Path(__file__).resolve().parents[3]
PACKAGE = Path(schemas.__file__).parent


def fields(node: Any, pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property schema in ``node`` (also inside $defs, items, map values), with its JSON pointer."""
    if not isinstance(node, dict):
        return
    for key, sub in node.get("properties", {}).items():
        yield f"{pointer}/properties/{key}", sub
        yield from fields(sub, f"{pointer}/properties/{key}")
    for key, sub in node.get("$defs", {}).items():
        yield from fields(sub, f"{pointer}/$defs/{key}")
    for keyword in ("items", "additionalProperties"):
        yield from fields(node.get(keyword), f"{pointer}/{keyword}")


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_the_package_holds_exactly_the_named_schema_files() -> None:
    assert sorted(p.stem for p in PACKAGE.glob("*.json")) == sorted(schemas.NAMES)


@pytest.mark.parametrize("name", schemas.NAMES)
def test_each_schema_is_valid_2020_12_with_id_title_and_a_description_on_every_property(name: str) -> None:
    schema = schemas.load(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"{schemas.BASE}{name}.json"
    assert schema["title"] and schema["description"]
    found = list(fields(schema))
    assert found, "a document schema without properties"
    undocumented = [path for path, sub in found if not sub.get("description", "").strip()]
    assert not undocumented, f"{name}.json: properties without a description: {undocumented}"


@pytest.mark.parametrize("name", schemas.NAMES)
def test_every_ref_resolves_in_the_registry(name: str) -> None:
    schema = schemas.load(name)
    resolver = schemas.registry().resolver(schema["$id"])
    for ref in refs(schema):
        assert resolver.lookup(ref).contents, ref


@pytest.mark.parametrize("name", schemas.NAMES)
def test_every_default_is_valid_for_its_own_field(name: str) -> None:
    schema = schemas.load(name)
    checked = 0
    for pointer, sub in fields(schema):
        if "default" in sub:
            field = schemas.validator_for({"$ref": f"{schema['$id']}#{pointer}"})
            errors = [e.message for e in field.iter_errors(sub["default"])]
            assert not errors, f"{name}.json#{pointer}: default {sub['default']!r}: {errors}"
            checked += 1
    assert checked or name in ("artifact-index",)


def test_load_parses_each_file_once_and_refuses_unknown_names() -> None:
    assert schemas.load("config") is schemas.load("config")
    assert schemas.validator("workflow") is schemas.validator("workflow")
    assert config.SCHEMA is schemas.load("config")
    with pytest.raises(KeyError, match="no schema named 'nope'"):
        schemas.load("nope")


def test_user_data_reuses_the_service_configuration_by_ref() -> None:
    props = schemas.load("userdata")["properties"]
    shared = {
        "targets": props["targets"],
        "log_level": props["log_level"],
        "hooks": props["hooks"],
        "artifacts": props["artifacts"],
        "api.credentials": props["api"]["properties"]["credentials"],
        "api.bind": props["api"]["properties"]["bind"],
        "sources.s3": props["sources"]["properties"]["s3"],
        "limits.concurrent_tasks": props["limits"]["properties"]["concurrent_tasks"],
    }
    for field, sub in shared.items():
        assert sub["$ref"].startswith("config.json#/"), field
        assert not {"type", "properties", "enum", "pattern"} & set(sub), f"{field} copies the service schema"


def test_a_size_in_user_data_is_checked_by_the_service_schema_and_named_as_a_size() -> None:
    errors = userdata.validate_section({"appliance_id": "a", "limits": {"scratch": {"quota": "lots"}}})
    assert [(e.field, e.message) for e in errors] == [
        ("imaging.limits.scratch.quota", "'lots' is not a size (use bytes or e.g. '20GiB')")
    ]


def _default(name: str, *path: str) -> Any:
    node = schemas.load(name)
    for key in path:
        node = node["properties"][key]
    return node["default"]


def test_a_configuration_without_a_file_uses_the_documented_defaults() -> None:
    """What the code uses (the typed configuration), not the merged mapping: a value applied in code
    instead of from the schema shows up here."""
    cfg = config.from_dict({})
    size = config.parse_size
    checks = [
        (cfg.log_level, _default("config", "log_level")),
        (cfg.scratch.quota, size(_default("config", "scratch", "quota"))),
        (cfg.scratch.min_free, size(_default("config", "scratch", "min_free"))),
        (cfg.limits.guest_probe_cpu_seconds, _default("config", "limits", "guest_probe_cpu_seconds")),
        (cfg.limits.max_virtual_size, size(_default("config", "limits", "max_virtual_size"))),
        (list(cfg.safety.vmdk_allowed_types), _default("config", "safety", "vmdk_allowed_types")),
        (cfg.max_active_tasks, _default("config", "tasks", "max_active")),
        (cfg.api.bind, _default("config", "api", "bind")),
        (cfg.api.max_request_bytes, size(_default("config", "api", "max_request_bytes"))),
        (list(cfg.sources.allowed_ports), _default("config", "sources", "allowed_ports")),
        (cfg.sources.retries, _default("config", "sources", "retries")),
        (cfg.targets["volume"]["type"], _default("config", "targets", "volume")["type"]),
        (cfg.worker.concurrency, _default("config", "worker", "concurrency")),
        (cfg.controller.mode, _default("config", "controller", "mode")),
        (cfg.controller.max_backoff, _default("config", "controller", "max_backoff")),
        (cfg.artifacts.prefix, _default("config", "artifacts", "prefix")),
        (cfg.artifacts.max_resource_size, size(_default("config", "artifacts", "max_resource_size"))),
        (cfg.hooks.plugins_dir, _default("config", "hooks", "plugins_dir")),
    ]
    for used, documented in checks:
        assert used == documented
    assert cfg.raw == config.DEFAULTS == schemas.defaults(schemas.load("config"))
    assert config.HOOK_POINTS == ("after_fetch", "after_inspect", "after_convert", "before_write")


def _user_defaults(
    node: dict[str, Any], base: str, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, sub in node.get("properties", {}).items():
        resolved, resolved_base = schemas.resolve(sub, base)
        if "default" in resolved:
            yield (*path, key), resolved["default"]
        elif "properties" in resolved and "$ref" not in sub:
            yield from _user_defaults(resolved, resolved_base, (*path, key))


def _service_path(user_path: tuple[str, ...]) -> tuple[str, ...]:
    for service, user in userdata._FIELD_MAP:
        if user_path[: len(user)] == user:
            return service + user_path[len(user) :]
    return user_path


def test_user_data_defaults_are_what_imaging_configure_writes(tmp_path: Path) -> None:
    section = {"appliance_id": "app-1", "controller": {"url": "https://c.example", "secret": "s" * 16}}
    rendered = userdata.render(section, tmp_path)
    effective = config.from_dict(rendered.config, base_dir=tmp_path).raw
    documented = list(_user_defaults(userdata.SCHEMA, userdata.SCHEMA["$id"], ()))
    assert len(documented) >= 8
    for user_path, default in documented:
        value: Any = effective
        for part in _service_path(user_path):
            value = value[part]
        assert value == default, f"imaging.{'.'.join(user_path)}: documented {default!r}, written {value!r}"


def test_target_defaults_are_what_the_targets_use() -> None:
    d = schemas.defaults(schemas.load("target-ec2"))
    ec2 = Ec2VolumeTarget.from_settings({"type": "ec2", "instance_id": "i-0123456789abcdef0"})
    assert ec2.device_dir == Path(d["device_dir"])
    assert ec2.device_names == d["attach_device_names"]
    assert (ec2.wait_timeout, ec2.device_timeout) == (d["wait_timeout"], d["device_timeout"])
    assert (ec2.poll_interval, ec2.max_poll_interval) == (d["poll_interval"], d["max_poll_interval"])

    d = schemas.defaults(schemas.load("target-s3"))
    s3 = S3ImageTarget.from_settings({"type": "s3", "bucket": "images"})
    assert (s3.prefix, s3.part_size, s3.threads) == (
        d["prefix"],
        config.parse_size(d["part_size"]),
        d["threads"],
    )

    d = schemas.defaults(schemas.load("target-file"))
    for cls in (FileVolumeTarget, FileImageTarget):
        assert cls.from_settings({"type": "file", "directory": "/x"}).min_free == config.parse_size(
            d["min_free"]
        )

    d = schemas.defaults(schemas.load("target-device"))
    assert DeviceVolumeTarget.from_settings({"type": "device"}).assume_zeroed is d["assume_zeroed"]


def test_the_wheel_and_the_image_carry_the_schema_files() -> None:
    """The package data globs of pyproject.toml cover every schema file (build.sh builds the
    appliance image from the wheel)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["appliance"]
    files = [f"schemas/{p.name}" for p in PACKAGE.glob("*.json")]
    assert files
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f"{f} is not package data"
    assert resources.files("appliance.schemas").joinpath("config.json").is_file()
