"""Configuration: one YAML file, validated with jsonschema, merged over embedded defaults.

Sizes may be given as integers (bytes) or strings with binary/decimal units (``20GiB``, ``500M``).
Relative paths in a file are resolved against the file's directory. Without a file the embedded
defaults apply: state and scratch under ``$XDG_STATE_HOME/imaging`` (``~/.local/state/imaging``).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from . import redact
from .errors import ConfigError
from .paths import SYSTEM_CONFIG, StatePaths, default_state_dir

ENV_CONFIG = "IMAGING_CONFIG"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?)B?\s*$", re.IGNORECASE)

#: actions without a dot that a hook may name as they are (not as ``hook.<name>``)
PLAIN_HOOK_ACTIONS = frozenset({"run"})

#: the insertion points of the import workflows, in the order an import reaches them
HOOK_POINTS = ("after_fetch", "after_inspect", "after_convert", "before_write")

SIZE = {
    "oneOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([KMGTPkmgtp]i?)?[Bb]?\s*$"},
    ]
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": True,  # later sections (api, controller, …) validate their own keys
    "properties": {
        "state_dir": {"type": "string", "minLength": 1},
        "log_level": {"enum": ["debug", "info", "warning", "error"]},
        "scratch": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "root": {"type": "string", "minLength": 1},
                "quota": SIZE,
                "min_free": SIZE,
            },
        },
        "limits": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_virtual_size": SIZE,
                "max_decompressed_size": SIZE,
                "qemu_img_info_cpu_seconds": {"type": "integer", "minimum": 1},
                "qemu_img_check_cpu_seconds": {"type": "integer", "minimum": 1},
                "qemu_img_address_space": SIZE,
                "guest_probe_cpu_seconds": {"type": "integer", "minimum": 1},
                "guest_probe_address_space": SIZE,
            },
        },
        "safety": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "vmdk_allowed_types": {
                    "type": "array",
                    "items": {"enum": ["monolithicSparse", "streamOptimized"]},
                    "uniqueItems": True,
                },
                "banned_formats": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                "iso_policy": {"enum": ["reject", "allow", "allow-hybrid"]},
            },
        },
        "workflows": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "extra_dirs": {"type": "array", "items": {"type": "string"}},
            },
        },
        # Operator hooks (appliance.hooks): steps run at named insertion points of the import workflows.
        "hooks": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "plugins_dir": {"type": ["string", "null"], "minLength": 1},
                "points": {
                    "type": "object",
                    "propertyNames": {"enum": list(HOOK_POINTS)},
                    "additionalProperties": {"type": "array", "items": {"$ref": "#/$defs/hook"}},
                },
            },
        },
        "tasks": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "lease_seconds": {"type": "integer", "minimum": 5},
                "max_active": {"type": "integer", "minimum": 1},
                "expiration_hours": {"type": "integer", "minimum": 1},
            },
        },
        "api": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "bind": {"type": "string", "pattern": r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$"},
                "workers": {"type": "integer", "minimum": 1, "maximum": 64},
                "timeout": {"type": "integer", "minimum": 1},
                "region": {"type": "string", "minLength": 1},
                "credentials": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["access_key", "secret_key"],
                        "properties": {
                            "access_key": {"type": "string", "pattern": "^[A-Za-z0-9]{16,128}$"},
                            "secret_key": {"type": "string", "minLength": 16},
                        },
                    },
                },
                "sigv2": {"type": "boolean"},
                "max_clock_skew": {"type": "integer", "minimum": 1},
                "max_request_bytes": SIZE,
                "tls": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["cert", "key"],
                    "properties": {"cert": {"type": "string"}, "key": {"type": "string"}},
                },
            },
        },
        "sources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                # scheme://host[:port] prefixes that may be fetched even when private/loopback
                "allowed_endpoints": {
                    "type": "array",
                    "items": {"type": "string", "pattern": "^(https?|s3)://"},
                },
                "allowed_ports": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1, "maximum": 65535},
                },
                "connect_timeout": {"type": "number", "exclusiveMinimum": 0},
                "read_timeout": {"type": "number", "exclusiveMinimum": 0},
                "retries": {"type": "integer", "minimum": 0, "maximum": 50},
                "manifest_poll_interval": {"type": "number", "exclusiveMinimum": 0},
                "manifest_poll_max_interval": {"type": "number", "exclusiveMinimum": 0},
                "s3": {"$ref": "#/$defs/s3"},
            },
        },
        "targets": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "volume": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"enum": ["file", "device", "ec2"]}},
                },
                "image": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"enum": ["file", "s3"]}},
                },
            },
        },
        "worker": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "concurrency": {"type": "integer", "minimum": 1, "maximum": 64},
                "poll_interval": {"type": "number", "exclusiveMinimum": 0},
                # per-task resource caps for the task processes (systemd CPUQuota= / IOWeight= /
                # IOReadBandwidthMax= / IOWriteBandwidthMax= semantics); recorded, not yet enforced
                "task_cpu_quota": {"type": "string", "pattern": r"^[1-9]\d{0,4}%$"},
                "task_io_weight": {"type": "integer", "minimum": 1, "maximum": 10000},
                "task_io_read_bandwidth": SIZE,
                "task_io_write_bandwidth": SIZE,
            },
        },
        # Reporting to the controlling cloud (appliance.report): push signed messages or pull work.
        "controller": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "url": {"type": "string", "pattern": r"^https?://\S+$"},
                "secret": {"type": "string", "minLength": 16},
                "appliance_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
                "mode": {"enum": ["push", "pull", "off"]},
                "report_interval": {"type": "number", "exclusiveMinimum": 0},
                "progress_interval": {"type": "number", "minimum": 0},
                "timeout": {"type": "number", "exclusiveMinimum": 0},
                "max_backoff": {"type": "number", "exclusiveMinimum": 0},
            },
            # a reporting appliance needs somewhere to report to, a key to sign with and a name
            "if": {"properties": {"mode": {"enum": ["push", "pull"]}}, "required": ["mode"]},
            "then": {"required": ["url", "secret", "appliance_id"]},
        },
        # The artifact store (appliance.artifacts): workflows and their resources by digest in S3.
        "artifacts": {
            "type": "object",
            "additionalProperties": False,
            "dependentRequired": {"access_key": ["secret_key"], "secret_key": ["access_key"]},
            "properties": {
                "bucket": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"},
                "prefix": {"type": "string"},
                "endpoint_url": {"type": "string", "pattern": "^https?://"},
                "region": {"type": "string", "minLength": 1},
                "access_key": {"type": "string", "minLength": 1},
                "secret_key": {"type": "string", "minLength": 1},
                "addressing_style": {"enum": ["auto", "path", "virtual"]},
                "cache_dir": {"type": "string", "minLength": 1},
                "max_resource_size": SIZE,
            },
        },
    },
    "$defs": {
        "hook": {
            "type": "object",
            "additionalProperties": False,
            "required": ["hook"],
            "properties": {
                # a shipped hook (decompress → action hook.decompress) or any action name (with a dot)
                "hook": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
                "name": {"type": "string", "minLength": 1},
                "with": {"type": "object"},
                "timeout": {"type": "number", "exclusiveMinimum": 0},
                "retries": {"type": "integer", "minimum": 0, "maximum": 100},
            },
        },
        "s3": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "endpoint_url": {"type": "string", "pattern": "^https?://"},
                "region": {"type": "string"},
                "access_key": {"type": "string"},
                "secret_key": {"type": "string"},
                "addressing_style": {"enum": ["auto", "path", "virtual"]},
            },
        },
    },
}

DEFAULTS: dict[str, Any] = {
    "log_level": "info",
    "scratch": {"quota": "50GiB", "min_free": "1GiB"},
    "limits": {
        "max_virtual_size": "2TiB",
        "max_decompressed_size": "2TiB",
        # Glance uses 2 s / 1 GiB for `qemu-img info`; check walks metadata and needs more CPU.
        "qemu_img_info_cpu_seconds": 8,
        "qemu_img_check_cpu_seconds": 300,
        "qemu_img_address_space": "1GiB",
        # the guest reader (appliance.guest.probe) is pure Python; measured ~40 MiB of AS for small guests
        "guest_probe_cpu_seconds": 60,
        "guest_probe_address_space": "1GiB",
    },
    "safety": {
        "vmdk_allowed_types": ["monolithicSparse", "streamOptimized"],
        "banned_formats": ["qed"],
        # A bootable "hybrid" ISO carries an MBR too; accept it as ISO, reject other polyglots.
        "iso_policy": "allow-hybrid",
    },
    "workflows": {"extra_dirs": []},
    "hooks": {"plugins_dir": None, "points": {}},
    # AWS allows 5 concurrent conversion tasks per region by default
    "tasks": {"lease_seconds": 30, "max_active": 5, "expiration_hours": 168},
    "api": {
        "bind": "127.0.0.1:8773",
        "workers": 2,
        "timeout": 60,
        "region": "us-east-1",
        "credentials": [],
        "sigv2": False,
        "max_clock_skew": 300,
        "max_request_bytes": "1MiB",
    },
    "sources": {
        "allowed_endpoints": [],
        "allowed_ports": [80, 443],
        "connect_timeout": 10,
        "read_timeout": 60,
        "retries": 5,
        "manifest_poll_interval": 5,
        "manifest_poll_max_interval": 60,
        "s3": {},
    },
    "targets": {"volume": {"type": "file"}, "image": {"type": "file"}},
    "worker": {"concurrency": 2, "poll_interval": 1.0},
    # Eucalyptus workers reported every 30 s (EXTANT_STATUS_REPORT_INTERVAL)
    "controller": {
        "mode": "off",
        "report_interval": 30,
        "progress_interval": 5,
        "timeout": 10,
        "max_backoff": 60,
    },
}


def parse_size(value: int | str) -> int:
    """Bytes for ``value``: an int, or a string like ``20GiB`` / ``500M`` / ``1.5G``.

    ``K/M/G/T/P`` with ``i`` are powers of 1024, without ``i`` powers of 1000.
    """
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"not a size: {value!r} (use bytes or e.g. '20GiB')")
    number, unit, binary = m.groups()
    base = 1024 if binary else 1000
    power = " KMGTP".index(unit.upper()) if unit else 0
    return int(float(number) * base**power)


@dataclass(frozen=True)
class ScratchConfig:
    root: Path
    quota: int
    min_free: int


@dataclass(frozen=True)
class Limits:
    max_virtual_size: int
    max_decompressed_size: int
    qemu_img_info_cpu_seconds: int
    qemu_img_check_cpu_seconds: int
    qemu_img_address_space: int
    guest_probe_cpu_seconds: int = 60
    guest_probe_address_space: int = 1 << 30


@dataclass(frozen=True)
class SafetyPolicy:
    vmdk_allowed_types: tuple[str, ...]
    banned_formats: tuple[str, ...]
    iso_policy: str


@dataclass(frozen=True)
class ApiConfig:
    bind: str
    workers: int
    timeout: int
    region: str
    #: access key → secret key
    credentials: dict[str, str]
    sigv2: bool
    max_clock_skew: int
    max_request_bytes: int
    tls_cert: Path | None
    tls_key: Path | None


@dataclass(frozen=True)
class SourcesConfig:
    allowed_endpoints: tuple[str, ...]
    allowed_ports: tuple[int, ...]
    connect_timeout: float
    read_timeout: float
    retries: int
    manifest_poll_interval: float
    manifest_poll_max_interval: float
    #: boto3 settings for s3:// and UserBucket sources (endpoint_url, region, access_key, secret_key)
    s3: dict[str, Any]


@dataclass(frozen=True)
class WorkerConfig:
    concurrency: int
    poll_interval: float
    #: per-task caps (``"50%"`` of one CPU, IO weight 1..10000, bytes/s); None = unlimited
    task_cpu_quota: str | None = None
    task_io_weight: int | None = None
    task_io_read_bandwidth: int | None = None
    task_io_write_bandwidth: int | None = None


@dataclass(frozen=True)
class ControllerConfig:
    """Where and how the appliance reports (see :mod:`appliance.report`); ``mode`` off disables it."""

    url: str | None
    #: HMAC-SHA256 key shared with the controller; never logged
    secret: str | None = field(repr=False)
    appliance_id: str | None
    mode: str
    report_interval: float
    #: minimum seconds between two progress ticks of one task
    progress_interval: float
    #: seconds one HTTP request to the controller may take
    timeout: float
    #: cap of the exponential back-off between failed deliveries, in seconds
    max_backoff: float


@dataclass(frozen=True)
class ArtifactsConfig:
    """The artifact store and the resource cache (see :mod:`appliance.artifacts`)."""

    #: None: no store configured (``artifact://`` refuses; other resource URIs still work)
    bucket: str | None = None
    prefix: str = "artifacts"
    #: boto3 settings for the store and for ``s3://`` resources (endpoint_url, region, keys)
    s3: dict[str, Any] = field(default_factory=dict, repr=False)
    #: verified resources by digest (``<cache_dir>/sha256/<hex>``); None: ``<state_dir>/cache``
    cache_dir: Path | None = None
    max_resource_size: int = 1 << 30


@dataclass(frozen=True)
class HookConfig:
    """One configured hook: ``hook`` as written, the ``action`` it runs, its display ``name``."""

    hook: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    retries: int = 0

    @property
    def action(self) -> str:
        """A bare name is a shipped hook (``decompress`` → ``hook.decompress``), or the ``run`` step
        (itself a hook: a command locally or in the guest chroot); a dotted one any action."""
        return self.hook if "." in self.hook or self.hook in PLAIN_HOOK_ACTIONS else f"hook.{self.hook}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"hook": self.hook, "name": self.name, "with": copy.deepcopy(self.args)}
        if self.timeout is not None:
            d["timeout"] = self.timeout
        if self.retries:
            d["retries"] = self.retries
        return d


@dataclass(frozen=True)
class HooksConfig:
    """``hooks``: the operator's plugins directory and the hooks of each insertion point, in order."""

    plugins_dir: Path | None = None
    points: dict[str, tuple[HookConfig, ...]] = field(default_factory=dict)
    #: where the hooks were configured (the config file), for error messages
    source: str = "<config>"

    def at(self, point: str) -> tuple[HookConfig, ...]:
        return self.points.get(point, ())

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """The points as JSON data (recorded on a task at submit, read by :func:`hooks_from_dict`)."""
        return {p: [h.to_dict() for h in hooks] for p, hooks in self.points.items() if hooks}


def hooks_from_dict(
    points: dict[str, Any], *, plugins_dir: Path | None = None, source: str = "<config>"
) -> HooksConfig:
    """Build the points of a :class:`HooksConfig` from ``{point: [{hook, name?, with?, ...}]}``."""
    out: dict[str, tuple[HookConfig, ...]] = {}
    for point, hooks in points.items():
        out[point] = tuple(
            HookConfig(
                hook=h["hook"],
                name=h.get("name") or h["hook"],
                args=dict(h.get("with") or {}),
                timeout=h.get("timeout"),
                retries=h.get("retries", 0),
            )
            for h in hooks
        )
    return HooksConfig(plugins_dir=plugins_dir, points=out, source=source)


@dataclass(frozen=True)
class Config:
    """Validated configuration with sizes in bytes and paths made absolute."""

    state_dir: Path
    log_level: str
    scratch: ScratchConfig
    limits: Limits
    safety: SafetyPolicy
    workflow_dirs: tuple[Path, ...]
    lease_seconds: int
    max_active_tasks: int
    expiration_hours: int
    api: ApiConfig
    sources: SourcesConfig
    #: target settings by kind (``volume``, ``image``): ``{"type": ..., ...}`` with paths made absolute
    targets: dict[str, dict[str, Any]]
    worker: WorkerConfig
    controller: ControllerConfig = field(
        default_factory=lambda: ControllerConfig(None, None, None, "off", 30.0, 5.0, 10.0, 60.0)
    )
    artifacts: ArtifactsConfig = field(default_factory=ArtifactsConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def paths(self) -> StatePaths:
        """Every file and directory under ``state_dir``."""
        return StatePaths(self.state_dir)

    @property
    def db_path(self) -> Path:
        return self.paths.db


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _message(error: jsonschema.ValidationError, secrets: set[str]) -> str:
    """The schema error's message, never quoting a secret (not even a wrong one)."""
    path = [None, *error.absolute_path]
    if len(path) > 1 and redact.is_secret_key(path[-1], path[-2]):
        return f"the value is not valid ({error.validator}: {error.validator_value!r})"
    return redact.redact_text(error.message, secrets)


def validate(data: Any, source: str = "<config>", schema: dict[str, Any] | None = None) -> None:
    """Raise :class:`ConfigError` naming the file and the field of the first schema violation."""
    validator = jsonschema.Draft202012Validator(schema or SCHEMA)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        secrets = {s for s in redact.secret_values(data) if len(s) >= redact.MIN_REMEMBERED}
        lines = [f"{source}: {_where(e)}: {_message(e, secrets)}" for e in errors]
        raise ConfigError("; ".join(lines))


def from_dict(data: dict[str, Any], base_dir: Path | None = None, source: Path | None = None) -> Config:
    """Build a :class:`Config` from a parsed mapping (validated first)."""
    validate(data, str(source or "<config>"))
    merged = _merge(DEFAULTS, data)
    # whatever surfaces these values (a library's error message, a plugin's event) shows REDACTED
    redact.remember(redact.secret_values(merged))
    base = base_dir or Path.cwd()

    def path(value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (base / p).resolve()

    state_dir = path(merged["state_dir"]) if "state_dir" in merged else default_state_dir()
    scratch = merged["scratch"]
    api = merged["api"]
    sources = merged["sources"]
    limits = merged["limits"]
    safety = merged["safety"]
    return Config(
        state_dir=state_dir,
        log_level=merged["log_level"],
        scratch=ScratchConfig(
            root=path(scratch["root"]) if "root" in scratch else StatePaths(state_dir).scratch,
            quota=parse_size(scratch["quota"]),
            min_free=parse_size(scratch["min_free"]),
        ),
        limits=Limits(
            max_virtual_size=parse_size(limits["max_virtual_size"]),
            max_decompressed_size=parse_size(limits["max_decompressed_size"]),
            qemu_img_info_cpu_seconds=limits["qemu_img_info_cpu_seconds"],
            qemu_img_check_cpu_seconds=limits["qemu_img_check_cpu_seconds"],
            qemu_img_address_space=parse_size(limits["qemu_img_address_space"]),
            guest_probe_cpu_seconds=limits["guest_probe_cpu_seconds"],
            guest_probe_address_space=parse_size(limits["guest_probe_address_space"]),
        ),
        safety=SafetyPolicy(
            vmdk_allowed_types=tuple(safety["vmdk_allowed_types"]),
            banned_formats=tuple(safety["banned_formats"]),
            iso_policy=safety["iso_policy"],
        ),
        workflow_dirs=tuple(path(d) for d in merged["workflows"]["extra_dirs"]),
        lease_seconds=merged["tasks"]["lease_seconds"],
        max_active_tasks=merged["tasks"]["max_active"],
        expiration_hours=merged["tasks"]["expiration_hours"],
        api=ApiConfig(
            bind=api["bind"],
            workers=api["workers"],
            timeout=api["timeout"],
            region=api["region"],
            credentials={c["access_key"]: c["secret_key"] for c in api["credentials"]},
            sigv2=api["sigv2"],
            max_clock_skew=api["max_clock_skew"],
            max_request_bytes=parse_size(api["max_request_bytes"]),
            tls_cert=path(api["tls"]["cert"]) if "tls" in api else None,
            tls_key=path(api["tls"]["key"]) if "tls" in api else None,
        ),
        sources=SourcesConfig(
            allowed_endpoints=tuple(e.rstrip("/") for e in sources["allowed_endpoints"]),
            allowed_ports=tuple(sources["allowed_ports"]),
            connect_timeout=float(sources["connect_timeout"]),
            read_timeout=float(sources["read_timeout"]),
            retries=sources["retries"],
            manifest_poll_interval=float(sources["manifest_poll_interval"]),
            manifest_poll_max_interval=float(sources["manifest_poll_max_interval"]),
            s3=dict(sources["s3"]),
        ),
        targets=_targets(merged["targets"], state_dir, path),
        worker=WorkerConfig(
            concurrency=merged["worker"]["concurrency"],
            poll_interval=float(merged["worker"]["poll_interval"]),
            task_cpu_quota=merged["worker"].get("task_cpu_quota"),
            task_io_weight=merged["worker"].get("task_io_weight"),
            task_io_read_bandwidth=_optional_size(merged["worker"].get("task_io_read_bandwidth")),
            task_io_write_bandwidth=_optional_size(merged["worker"].get("task_io_write_bandwidth")),
        ),
        controller=_controller(merged["controller"]),
        artifacts=_artifacts(merged.get("artifacts") or {}, state_dir, path),
        hooks=hooks_from_dict(
            merged["hooks"].get("points") or {},
            plugins_dir=path(merged["hooks"]["plugins_dir"]) if merged["hooks"].get("plugins_dir") else None,
            source=str(source or "<config>"),
        ),
        source=source,
        raw=merged,
    )


def _artifacts(raw: dict[str, Any], state_dir: Path, path: Any) -> ArtifactsConfig:
    s3_keys = ("endpoint_url", "region", "access_key", "secret_key", "addressing_style")
    return ArtifactsConfig(
        bucket=raw.get("bucket"),
        prefix=str(raw.get("prefix", "artifacts")).strip("/"),
        s3={k: raw[k] for k in s3_keys if raw.get(k)},
        cache_dir=path(raw["cache_dir"]) if raw.get("cache_dir") else StatePaths(state_dir).cache,
        max_resource_size=parse_size(raw.get("max_resource_size", "1GiB")),
    )


def _optional_size(value: int | str | None) -> int | None:
    return None if value is None else parse_size(value)


def _controller(raw: dict[str, Any]) -> ControllerConfig:
    return ControllerConfig(
        url=raw["url"].rstrip("/") if raw.get("url") else None,
        secret=raw.get("secret"),
        appliance_id=raw.get("appliance_id"),
        mode=raw["mode"],
        report_interval=float(raw["report_interval"]),
        progress_interval=float(raw["progress_interval"]),
        timeout=float(raw["timeout"]),
        max_backoff=float(raw["max_backoff"]),
    )


def _targets(raw: dict[str, Any], state_dir: Path, path: Any) -> dict[str, dict[str, Any]]:
    """Target settings with defaults: file targets keep one file per volume/image under state_dir."""
    out: dict[str, dict[str, Any]] = {}
    defaults = StatePaths(state_dir)
    for kind, default_dir in (("volume", defaults.volumes), ("image", defaults.images)):
        t = dict(raw.get(kind) or {"type": "file"})
        if t["type"] == "file":
            t["directory"] = path(t["directory"]) if "directory" in t else default_dir
        out[kind] = t
    return out


def load(path: str | Path | None = None) -> Config:
    """Load the configuration.

    Order: the explicit ``path``; else ``$IMAGING_CONFIG``; else ``/etc/imaging/imaging.yaml`` if
    it exists; else the embedded defaults.
    """
    candidate = path or os.environ.get(ENV_CONFIG)
    if candidate is None and SYSTEM_CONFIG.exists():
        candidate = SYSTEM_CONFIG
    if candidate is None:
        return from_dict({})
    file = Path(candidate)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {file}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: (top level): must be a mapping")
    return from_dict(data, base_dir=file.resolve().parent, source=file)
