"""Configuration: one YAML file, validated with jsonschema, merged over embedded defaults.

Sizes may be given as integers (bytes) or strings with binary/decimal units (``20GiB``, ``500M``).
Relative paths in a file are resolved against the file's directory. Without a file the embedded
defaults apply: state and scratch under ``$XDG_STATE_HOME/imaging`` (``~/.local/state/imaging``).

The sections as typed dataclasses (:class:`Config` and its parts) are :mod:`appliance.config_model`'s;
they are re-exported here, where callers import them from.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from . import redact, schemas
from .config_model import ACCOUNT_RE as ACCOUNT_RE
from .config_model import ADMIN as ADMIN
from .config_model import FRONTEND as FRONTEND
from .config_model import HOOK_POINTS as HOOK_POINTS
from .config_model import PLAIN_HOOK_ACTIONS as PLAIN_HOOK_ACTIONS
from .config_model import ROLES as ROLES
from .config_model import SCHEMA as SCHEMA
from .config_model import SIZE as SIZE
from .config_model import USER as USER
from .config_model import ApiConfig as ApiConfig
from .config_model import ArtifactsConfig as ArtifactsConfig
from .config_model import BundlesConfig as BundlesConfig
from .config_model import Config as Config
from .config_model import ControllerConfig as ControllerConfig
from .config_model import Credential as Credential
from .config_model import HookConfig as HookConfig
from .config_model import HooksConfig as HooksConfig
from .config_model import Limits as Limits
from .config_model import SafetyPolicy as SafetyPolicy
from .config_model import ScratchConfig as ScratchConfig
from .config_model import SourcesConfig as SourcesConfig
from .config_model import UploadConfig as UploadConfig
from .config_model import WorkerConfig as WorkerConfig
from .config_model import hooks_from_dict as hooks_from_dict
from .database import POSTGRESQL, StoreConfig, check_store_url
from .errors import ConfigError
from .paths import SYSTEM_CONFIG, StatePaths, default_state_dir

ENV_CONFIG = "IMAGING_CONFIG"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?)B?\s*$", re.IGNORECASE)

#: the smallest ``worker.task_memory_max``: a task child (Python, the workflow engine) needs about this much
MIN_TASK_MEMORY = 64 << 20

#: the embedded defaults: the schema's ``default`` values (``state_dir`` and ``scratch.root`` are
#: computed; see :func:`from_dict`)
DEFAULTS: dict[str, Any] = schemas.defaults(SCHEMA)


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


#: bounds of ``sources.range_size``
MIN_RANGE_SIZE, MAX_RANGE_SIZE = 1 << 20, 256 << 20


def _range_size(value: int | str) -> int:
    size = parse_size(value)
    if not MIN_RANGE_SIZE <= size <= MAX_RANGE_SIZE:
        raise ConfigError(f"sources.range_size: {value!r} is outside 1MiB..256MiB")
    return size


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
    validator = schemas.validator("config") if schema is None else schemas.validator_for(schema)
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
    cfg = Config(
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
            qemu_img_output=parse_size(limits["qemu_img_output"]),
            guest_probe_cpu_seconds=limits["guest_probe_cpu_seconds"],
            guest_probe_address_space=parse_size(limits["guest_probe_address_space"]),
            qemu_img_convert_cpu_seconds=limits["qemu_img_convert_cpu_seconds"],
            qemu_img_convert_cpu_seconds_per_gib=limits["qemu_img_convert_cpu_seconds_per_gib"],
            qemu_img_convert_address_space=parse_size(limits["qemu_img_convert_address_space"]),
            decompress_cpu_seconds=limits["decompress_cpu_seconds"],
            decompress_cpu_seconds_per_gib=limits["decompress_cpu_seconds_per_gib"],
            decompress_address_space=parse_size(limits["decompress_address_space"]),
        ),
        safety=SafetyPolicy(
            vmdk_allowed_types=tuple(safety["vmdk_allowed_types"]),
            banned_formats=tuple(safety["banned_formats"]),
            iso_policy=safety["iso_policy"],
        ),
        workflow_dirs=tuple(path(d) for d in merged["workflows"]["extra_dirs"]),
        lease_seconds=merged["tasks"].get("lease_seconds") or merged["worker"]["lease_seconds"],
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
            principals={c["access_key"]: _credential(c) for c in api["credentials"]},
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
            parallel_ranges=sources["parallel_ranges"],
            range_size=_range_size(sources["range_size"]),
            stall_seconds=float(sources["stall_seconds"]),
            checkpoint_every=int(sources["checkpoint_every"]),
            methods=tuple(sources["methods"]),
            upload=UploadConfig(
                directory=(
                    path(sources["upload"]["directory"])
                    if "directory" in sources["upload"]
                    else StatePaths(state_dir).uploads
                ),
                max_size=parse_size(sources["upload"]["max_size"]),
                min_free=parse_size(sources["upload"]["min_free"]),
                expire_hours=int(sources["upload"]["expire_hours"]),
                shared=bool(sources["upload"]["shared"]),
            ),
        ),
        targets=_targets(merged["targets"], state_dir, path),
        worker=WorkerConfig(
            concurrency=merged["worker"]["concurrency"],
            poll_interval=float(merged["worker"]["poll_interval"]),
            task_poll_interval=float(merged["worker"]["task_poll_interval"]),
            task_cpu_quota=merged["worker"].get("task_cpu_quota"),
            task_io_weight=merged["worker"].get("task_io_weight"),
            task_io_read_bandwidth=_optional_size(merged["worker"], "task_io_read_bandwidth", 1),
            task_io_write_bandwidth=_optional_size(merged["worker"], "task_io_write_bandwidth", 1),
            task_memory_max=_optional_size(merged["worker"], "task_memory_max", MIN_TASK_MEMORY),
        ),
        controller=_controller(merged["controller"]),
        artifacts=_artifacts(merged["artifacts"], state_dir, path),
        bundles=BundlesConfig(
            cloud_private_key=merged["bundles"].get("cloud_private_key"),
            cloud_private_key_file=(
                path(merged["bundles"]["cloud_private_key_file"])
                if merged["bundles"].get("cloud_private_key_file")
                else None
            ),
            parallel_parts=merged["bundles"]["parallel_parts"],
            signer_certs=merged["bundles"].get("signer_certs"),
            signer_certs_file=(
                path(merged["bundles"]["signer_certs_file"])
                if merged["bundles"].get("signer_certs_file")
                else None
            ),
        ),
        hooks=hooks_from_dict(
            merged["hooks"].get("points") or {},
            plugins_dir=path(merged["hooks"]["plugins_dir"]) if merged["hooks"].get("plugins_dir") else None,
            source=str(source or "<config>"),
        ),
        store_config=_store(merged["store"], StatePaths(state_dir).db, path, str(source or "<config>")),
        source=source,
        raw=merged,
    )
    _check_fleet_targets(cfg, str(source or "<config>"))
    return cfg


def _check_fleet_targets(cfg: Config, source: str) -> None:
    """A PostgreSQL store is shared by appliances, any of which may take a task over: a ``file``
    volume target must then be on a directory they all share, and say so (``shared: true``); so must
    the staged uploads' directory when the ``upload`` method is enabled."""
    upload = cfg.sources.upload
    if (
        cfg.store.backend == POSTGRESQL
        and "upload" in cfg.sources.methods
        and upload is not None
        and not upload.shared
    ):
        raise ConfigError(
            f"{source}: sources.upload: the upload method with a PostgreSQL store needs a directory "
            "every appliance sharing the store mounts at the same path, set with sources.upload.shared: "
            "true (the appliance that runs an import must find the bytes another one received); or "
            "leave upload out of sources.methods"
        )
    volume = cfg.targets["volume"]
    if cfg.store.backend == POSTGRESQL and volume.get("type") == "file" and not volume.get("shared"):
        raise ConfigError(
            f"{source}: targets.volume: a file volume target with a PostgreSQL store must be on a "
            "directory every appliance sharing the store mounts at the same path, set with "
            "targets.volume.shared: true (another appliance that takes a task over must find its "
            "volume); or use the ec2 or device volume target"
        )


def _store(raw: dict[str, Any], default_db: Path, path: Any, source: str) -> StoreConfig:
    """``store``: the URL checked (no password in it) and made absolute for SQLite, paths resolved."""
    url = raw.get("url") or "sqlite:///" + str(default_db)
    problem = check_store_url(url)
    if problem is not None:
        # the URL is not quoted: it may hold the very password it must not hold
        raise ConfigError(f"{source}: store.url {problem}")
    if "password" in raw and "password_file" in raw:
        raise ConfigError(f"{source}: store: give password or password_file, not both")
    if url.startswith("sqlite:"):
        url = "sqlite:///" + str(path(url.removeprefix("sqlite:///")))

    def optional(key: str) -> Path | None:
        return path(raw[key]) if raw.get(key) else None

    return StoreConfig(
        url=url,
        password=raw.get("password"),
        password_file=optional("password_file"),
        sslmode=raw.get("sslmode"),
        sslrootcert=optional("sslrootcert"),
        sslcert=optional("sslcert"),
        sslkey=optional("sslkey"),
        connect_timeout=float(raw["connect_timeout"]),
        pool_size=int(raw["pool_size"]),
    )


def _credential(raw: dict[str, Any]) -> Credential:
    account = raw.get("account")
    return Credential(
        access_key=raw["access_key"],
        account=account or raw["access_key"],
        role=raw.get("role", USER),
        account_configured=account is not None,
    )


def _artifacts(raw: dict[str, Any], state_dir: Path, path: Any) -> ArtifactsConfig:
    s3_keys = ("endpoint_url", "region", "access_key", "secret_key", "addressing_style")
    return ArtifactsConfig(
        bucket=raw.get("bucket"),
        prefix=str(raw["prefix"]).strip("/"),
        s3={k: raw[k] for k in s3_keys if raw.get(k)},
        cache_dir=path(raw["cache_dir"]) if raw.get("cache_dir") else StatePaths(state_dir).cache,
        max_resource_size=parse_size(raw["max_resource_size"]),
    )


def _optional_size(section: dict[str, Any], key: str, minimum: int) -> int | None:
    """The size ``section[key]`` in bytes (None when unset); at least ``minimum`` or a ConfigError."""
    value = section.get(key)
    if value is None:
        return None
    size = parse_size(value)
    if size < minimum:
        raise ConfigError(f"worker.{key}: {value!r} is below the minimum of {minimum} bytes")
    return size


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
        cloud_cert=raw.get("cloud_cert"),
        cloud_cert_file=Path(raw["cloud_cert_file"]) if raw.get("cloud_cert_file") else None,
        metadata_url=raw["metadata_url"].rstrip("/"),
        signature_version=raw["signature_version"],
        region=raw["region"],
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
