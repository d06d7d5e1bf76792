"""The ``imaging:`` section of cloud-init user data: its schema, parsing, and mapping to the service config.

Accepted user data (:func:`parse_user_data`):

* ``#cloud-config`` YAML with an ``imaging:`` mapping (other keys belong to cloud-init and are ignored);
* MIME multipart (cloud-init's ``write-mime-multipart``) with a ``text/cloud-config`` part;
* the compact one-liner ``imaging:v1:<appliance-id>:<controller-url>:<secret>`` (see
  :mod:`appliance.boot.rendezvous`): the full section is then fetched from the controller;
* the same line without an id, ``imaging:v1::<controller-url>:<enrolment-secret>``: the appliance
  asks the controller for an identity first (dynamic assignment), then fetches its section;
* any of these gzip-compressed (cloud-init accepts that too).

:func:`render` validates the section against :data:`SCHEMA`, maps it to the service configuration of
:mod:`appliance.config` and validates the *result* with the service schema and the target schemas, so
the file ``imaging configure`` writes always loads. Every problem is a :class:`FieldError` naming the
user-data field (``imaging.controller.url``); messages never carry secret values.
"""

from __future__ import annotations

import copy
import email
import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

from .. import config as config_mod
from .. import schemas
from ..errors import ConfigError
from ..image.formats import compression_of
from ..paths import IMAGE_STATE, IMAGE_STATE_DIR
from ..redact import is_secret_key, redact_text, redact_url, secret_values
from ..workflow.hookpoints import validate_hooks
from ..workflow.loader import WorkflowLoader

DEFAULT_BIND: str = schemas.load("userdata")["properties"]["api"]["properties"]["bind"]["default"]
COMPACT_PREFIX = "imaging:v1:"

#: the schema of the ``imaging:`` section (``appliance/schemas/userdata.json``); it refers to fields of
#: the service configuration's schema by ``$ref``
SCHEMA: dict[str, Any] = schemas.load("userdata")
#: ``api.bind`` as the service configuration's schema checks it
_BIND, _ = schemas.resolve(SCHEMA["properties"]["api"]["properties"]["bind"], SCHEMA["$id"])
#: the settings schema of each target, by (kind, type)
_TARGET_SCHEMAS = {
    ("volume", "file"): "target-file",
    ("volume", "device"): "target-device",
    ("volume", "ec2"): "target-ec2",
    ("image", "file"): "target-file",
    ("image", "s3"): "target-s3",
}

#: service-config path prefix → user-data path prefix (first match wins; identity otherwise)
_FIELD_MAP: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("scratch", "root"), ("limits", "scratch", "path")),
    (("scratch",), ("limits", "scratch")),
    (("worker", "concurrency"), ("limits", "concurrent_tasks")),
    (("tasks", "max_active"), ("limits", "max_active_tasks")),
    (("worker",), ("limits",)),
    (("controller", "appliance_id"), ("appliance_id",)),
]


@dataclass(frozen=True)
class FieldError:
    """One problem in the user data: the user-data ``field`` (dotted) and a secret-free ``message``."""

    field: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class UserDataInvalid(ConfigError):
    """The user data cannot configure the appliance; ``errors`` says where and why."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class CompactUserData:
    """The one-line form ``imaging:v1:<appliance-id>:<controller-url>:<secret>``."""

    appliance_id: str
    controller_url: str
    secret: str


@dataclass(frozen=True)
class EnrolUserData:
    """The one-line form without an id, ``imaging:v1::<controller-url>:<enrolment-secret>``: the
    appliance is assigned an id and a secret by the controller (dynamic assignment)."""

    controller_url: str
    enrol_secret: str


@dataclass(frozen=True)
class Rendered:
    """A validated service configuration and the extra files (TLS PEMs, mode 0600) it refers to."""

    config: dict[str, Any]
    files: dict[Path, str]
    appliance_id: str


# --- parsing --------------------------------------------------------------------------------------


def parse_user_data(raw: bytes | str) -> dict[str, Any] | CompactUserData | EnrolUserData:
    """The ``imaging:`` section of user data, or a compact form; :class:`UserDataInvalid` otherwise."""
    data = raw.encode() if isinstance(raw, str) else raw
    if compression_of(data) == "gzip":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise _invalid("user-data", f"gzip-compressed user data is corrupt: {exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid("user-data", "user data is not UTF-8 text") from exc
    stripped = text.strip()
    if not stripped:
        raise _invalid("user-data", "user data is empty")
    if re.match(r"^imaging:v\d+:", stripped) and "\n" not in stripped:
        return parse_compact(stripped)
    head = stripped[:200].lower()
    if head.startswith(("content-type:", "mime-version:")):
        text = _cloud_config_from_mime(text)
    elif not stripped.startswith("#cloud-config"):
        first = stripped.splitlines()[0]
        what = f" (it starts with {first[:40]!r})" if first.startswith("#") else ""
        raise _invalid(
            "user-data",
            f"user data is neither '#cloud-config' YAML nor the compact "
            f"'{COMPACT_PREFIX}<appliance-id>:<controller-url>:<secret>' line{what}",
        )
    return imaging_section(_load_yaml(text))


def _load_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # the problem text, not str(exc): the latter quotes the offending line, which may hold a secret
        problem = getattr(exc, "problem", None) or "syntax error"
        raise _invalid("user-data", f"#cloud-config is not valid YAML{where}: {problem}") from exc


def _cloud_config_from_mime(text: str) -> str:
    msg = email.message_from_string(text)
    for part in msg.walk():
        if part.get_content_type() == "text/cloud-config":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return payload.decode("utf-8", errors="replace")
    raise _invalid("user-data", "MIME multipart user data has no text/cloud-config part")


def imaging_section(doc: Any) -> dict[str, Any]:
    """The ``imaging:`` mapping of a parsed ``#cloud-config`` document (or a mapping holding one)."""
    if not isinstance(doc, dict) or "imaging" not in doc:
        raise _invalid("imaging", "the #cloud-config user data has no 'imaging:' section")
    section = doc["imaging"]
    if not isinstance(section, dict):
        raise _invalid("imaging", f"must be a mapping, not {type(section).__name__}")
    return section


def parse_compact(line: str) -> CompactUserData | EnrolUserData:
    """Split ``imaging:v1:<id>:<url>:<secret>``: the id ends at the first ':' after the prefix, the
    URL at the *last* ':' (URLs hold ':' themselves), so the secret cannot contain ':'. An empty id
    is the enrolment form (:class:`EnrolUserData`)."""
    m = re.match(r"^imaging:v(\d+):", line)
    if m is None or m.group(1) != "1":
        version = f"v{m.group(1)}" if m else "unknown"
        raise _invalid("user-data", f"compact user data version {version} is not supported (use v1)")
    appliance_id, _, rest = line[len(COMPACT_PREFIX) :].partition(":")
    url, _, secret = rest.rpartition(":")
    enrol = appliance_id == ""
    # the enrolment form is checked with a stand-in id: its URL and secret follow the same rules
    probe = {"appliance_id": "x" if enrol else appliance_id, "controller": {"url": url, "secret": secret}}
    errors = _check_section(probe)
    if errors:
        raise UserDataInvalid(errors)
    if enrol:
        return EnrolUserData(url.rstrip("/"), secret)
    return CompactUserData(appliance_id, url.rstrip("/"), secret)


def _invalid(field: str, message: str) -> UserDataInvalid:
    return UserDataInvalid([FieldError(field, message)])


# --- validation -----------------------------------------------------------------------------------


def _url_problem(url: str) -> str | None:
    """What is wrong with a controller URL beyond its scheme, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry user info (the shared secret authenticates)"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    if len(text) <= 60:
        return text
    if isinstance(value, str):
        return f"<a string of {len(value)} characters>"
    return f"<a {type(value).__name__}>"


def _describe(e: jsonschema.ValidationError, prefix: tuple[str, ...], secrets: set[str]) -> list[FieldError]:
    path = [*prefix, *(str(p) for p in e.absolute_path)]
    field = ".".join(path)
    if e.validator == "additionalProperties" and isinstance(e.instance, dict) and isinstance(e.schema, dict):
        allowed = sorted(e.schema.get("properties", {}))
        return [
            FieldError(f"{field}.{k}", f"unknown key (allowed: {', '.join(allowed)})")
            for k in sorted(set(e.instance) - set(allowed), key=str)
        ]
    if (
        "propertyNames" in e.relative_schema_path
        and e.validator == "enum"
        and isinstance(e.instance, str)
        and isinstance(e.validator_value, list)
    ):
        # a bad key of a mapping whose keys are an enum (hooks.points): name the key as the field
        names = ", ".join(map(str, e.validator_value))
        key = redact_text(e.instance, secrets)
        return [FieldError(f"{field}.{key}", f"unknown key (allowed: {names})")]
    if e.validator == "required" and isinstance(e.instance, dict) and isinstance(e.validator_value, list):
        return [
            FieldError(f"{field}.{k}", "required field is missing")
            for k in e.validator_value
            if k not in e.instance
        ]
    if e.validator == "oneOf" and e.schema is config_mod.SIZE:
        return [FieldError(field, f"{_short(e.instance)} is not a size (use bytes or e.g. '20GiB')")]
    secret_field = len(path) > 1 and is_secret_key(path[-1], path[-2])
    if secret_field or (isinstance(e.instance, str) and e.instance in secrets):
        # never echo a secret value, not even a wrong one
        what = {
            "minLength": f"is too short (at least {e.validator_value} characters)",
            "type": f"must be of type {e.validator_value}",
            "pattern": f"does not match {e.validator_value!r}",
        }.get(str(e.validator), f"is not valid ({e.validator})")
        return [FieldError(field, f"the value {what}")]
    message = e.message
    shown = repr(e.instance)
    if len(shown) > 60:
        message = message.replace(shown, _short(e.instance))
    return [FieldError(field, redact_text(message, secrets))]


def _schema_errors(
    data: Any, schema: dict[str, Any], prefix: tuple[str, ...], secrets: set[str]
) -> list[FieldError]:
    validator = schemas.validator_for(schema)
    out: list[FieldError] = []
    for e in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        out.extend(_describe(e, prefix, secrets))
    return out


def _check_section(section: dict[str, Any]) -> list[FieldError]:
    secrets = secret_values(section)
    errors = _schema_errors(section, SCHEMA, ("imaging",), secrets)
    url = (
        (section.get("controller") or {}).get("url") if isinstance(section.get("controller"), dict) else None
    )
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        problem = _url_problem(url)
        if problem:
            errors.append(FieldError("imaging.controller.url", f"{redact_url(url)!r} {problem}"))
    return errors


def validate_section(section: dict[str, Any]) -> list[FieldError]:
    """Problems of an ``imaging:`` section against :data:`SCHEMA` (empty when valid)."""
    return _check_section(section)


def _user_field(service_path: list[str]) -> str:
    for svc, user in _FIELD_MAP:
        if tuple(service_path[: len(svc)]) == svc:
            return ".".join(["imaging", *user, *service_path[len(svc) :]])
    return ".".join(["imaging", *service_path])


# --- mapping --------------------------------------------------------------------------------------


def to_service_config(section: dict[str, Any], config_dir: Path) -> Rendered:
    """Map a *valid* ``imaging:`` section to the service config; TLS PEMs go to ``config_dir/tls``."""
    limits = section.get("limits", {})
    api_in = section.get("api", {})
    api: dict[str, Any] = {
        "bind": api_in.get("bind", DEFAULT_BIND),
        "credentials": [dict(c) for c in api_in.get("credentials", [])],
    }
    if "region" in api_in:
        api["region"] = api_in["region"]
    files: dict[Path, str] = {}
    if "tls" in api_in:
        cert, key = config_dir / "tls" / "cert.pem", config_dir / "tls" / "key.pem"
        files = {cert: api_in["tls"]["cert"], key: api_in["tls"]["key"]}
        api["tls"] = {"cert": str(cert), "key": str(key)}
    scratch_in = limits.get("scratch", {})
    scratch: dict[str, Any] = {"root": scratch_in.get("path", str(IMAGE_STATE.scratch))}
    if "quota" in scratch_in:
        scratch["quota"] = scratch_in["quota"]
    worker = {k: limits[k] for k in limits if k.startswith("task_")}
    tasks = {"max_active": limits["max_active_tasks"]} if "max_active_tasks" in limits else {}
    if "concurrent_tasks" in limits:
        worker["concurrency"] = limits["concurrent_tasks"]
    controller: dict[str, Any] = {"appliance_id": section["appliance_id"], "mode": "off"}
    if "controller" in section:
        c = section["controller"]
        controller.update(url=c["url"].rstrip("/"), mode=c.get("mode", "push"))
        for name in ("secret", "cloud_cert", "cloud_cert_file", "metadata_url", "signature_version"):
            if name in c:
                controller[name] = c[name]
        if "report_interval" in c:
            controller["report_interval"] = c["report_interval"]
    out: dict[str, Any] = {
        "state_dir": str(IMAGE_STATE_DIR),
        "log_level": section.get("log_level", "info"),
        "scratch": scratch,
        "api": api,
        "controller": controller,
    }
    if worker:
        out["worker"] = worker
    if tasks:
        out["tasks"] = tasks
    if "sources" in section:
        out["sources"] = dict(section["sources"])
    if "bundles" in section:
        out["bundles"] = dict(section["bundles"])
    if "targets" in section:
        out["targets"] = {k: dict(v) for k, v in section["targets"].items()}
    if "hooks" in section:
        out["hooks"] = copy.deepcopy(section["hooks"])
    if "artifacts" in section:
        out["artifacts"] = dict(section["artifacts"])
    if "store" in section:
        out["store"] = dict(section["store"])
    return Rendered(out, files, section["appliance_id"])


def _target_errors(cfg: config_mod.Config, secrets: set[str]) -> list[FieldError]:
    """Check each target's settings against its implementation's own schema."""
    errors: list[FieldError] = []
    for kind, settings in cfg.targets.items():
        name = _TARGET_SCHEMAS.get((kind, settings["type"]))
        if name is not None:
            plain = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
            errors += _schema_errors(plain, schemas.load(name), ("imaging", "targets", kind), secrets)
    return errors


def _hook_errors(cfg: config_mod.Config, secrets: set[str]) -> list[FieldError]:
    """Check each hook against the shipped actions and their argument schemas, as the worker will.

    Skipped with a plugins directory: its actions are only known once the operator's code is
    loaded, which the worker does, not ``imaging configure`` (it runs as root at boot)."""
    if cfg.hooks.plugins_dir is not None or not cfg.hooks.points:
        return []
    errors = []
    for e in validate_hooks(WorkflowLoader((), hooks=cfg.hooks)):
        # hooks.points.after_convert[0].with.x → imaging.hooks.points.after_convert.0.with.x
        field = re.sub(r"\[(\d+)\]", r".\1", e.field or "hooks")
        errors.append(FieldError(f"imaging.{field}", redact_text(e.message, secrets)))
    return errors


def render(section: dict[str, Any], config_dir: Path) -> Rendered:
    """Validate ``section``, map it, and validate the result as the service will; raise
    :class:`UserDataInvalid` listing every problem by user-data field."""
    errors = _check_section(section)
    if errors:
        raise UserDataInvalid(errors)
    rendered = to_service_config(section, config_dir)
    secrets = secret_values(section)
    errors = [
        FieldError(_user_field(e.field.split(".")[1:]), e.message)
        for e in _schema_errors(rendered.config, config_mod.SCHEMA, ("service",), secrets)
    ]
    if not errors:
        try:
            cfg = config_mod.from_dict(rendered.config, base_dir=config_dir)
        except ConfigError as exc:
            errors = [FieldError("imaging", redact_text(exc.message, secrets))]
        else:
            errors = _target_errors(cfg, secrets) + _hook_errors(cfg, secrets)
    if errors:
        raise UserDataInvalid(errors)
    return rendered


def best_effort_bind(section: Any) -> str:
    """``api.bind`` of a possibly invalid section when it is well-formed, else :data:`DEFAULT_BIND`."""
    try:
        bind = section["api"]["bind"]
    except (KeyError, TypeError):
        return DEFAULT_BIND
    return bind if schemas.validator_for(_BIND).is_valid(bind) else DEFAULT_BIND
