"""The configuration as the code reads it: a frozen dataclass per section, :class:`Config` holding
them, and the vocabulary the configuration's JSON schema defines (hook points, roles, sizes).

Loading, merging over the defaults and validating a file is :mod:`appliance.config`'s (which also
re-exports every name here); a :class:`Config` is only ever built from a validated mapping there,
or by hand in tests.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import schemas
from .database import StoreConfig
from .paths import StatePaths

#: actions without a dot that a hook may name as they are (not as ``hook.<name>``)
PLAIN_HOOK_ACTIONS = frozenset({"run"})

#: the service configuration's JSON schema (``appliance/schemas/config.json``)
SCHEMA: dict[str, Any] = schemas.load("config")

#: the insertion points of the import workflows, in the order an import reaches them
HOOK_POINTS: tuple[str, ...] = tuple(
    SCHEMA["properties"]["hooks"]["properties"]["points"]["propertyNames"]["enum"]
)

#: a size: bytes, or a string with a unit (``20GiB``); step argument schemas embed it
SIZE: dict[str, Any] = SCHEMA["$defs"]["size"]

#: the schema of one ``api.credentials`` entry
_CREDENTIAL: dict[str, Any] = SCHEMA["properties"]["api"]["properties"]["credentials"]["items"]


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
    qemu_img_output: int = 64 << 20
    qemu_img_convert_cpu_seconds: int = 300
    qemu_img_convert_cpu_seconds_per_gib: int = 180
    qemu_img_convert_address_space: int = 2 << 30
    decompress_cpu_seconds: int = 120
    decompress_cpu_seconds_per_gib: int = 240
    decompress_address_space: int = 1 << 30


@dataclass(frozen=True)
class SafetyPolicy:
    vmdk_allowed_types: tuple[str, ...]
    banned_formats: tuple[str, ...]
    iso_policy: str


#: what an API access key may do (``api.credentials[].role``): ``user`` acts for its account,
#: ``frontend`` may act for the account a request names in a header it signs, ``admin`` also sees
#: every account's tasks on the admin API
ROLES: tuple[str, ...] = tuple(_CREDENTIAL["properties"]["role"]["enum"])
USER, FRONTEND, ADMIN = ROLES
#: the form of an account name (``api.credentials[].account``, the front end's account header;
#: use ``fullmatch``: ``$`` also matches before a final newline)
ACCOUNT_RE = re.compile(_CREDENTIAL["properties"]["account"]["pattern"])


@dataclass(frozen=True)
class Credential:
    """Who an API access key is (its secret is in :attr:`ApiConfig.credentials`)."""

    access_key: str
    #: the account the key acts for: as configured, else the access key
    account: str
    role: str = USER
    #: whether ``account`` was configured; a key without one also sees the tasks recorded without
    #: an account (see :class:`appliance.service.importtasks.Caller`)
    account_configured: bool = True


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
    #: access key → its account and role
    principals: dict[str, Credential] = field(default_factory=dict)


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
    #: ranged GETs (or manifest parts) in flight per download
    parallel_ranges: int = 4
    #: bytes per ranged GET
    range_size: int = 8 << 20
    #: seconds without a byte before a range is fetched again (then ``Source.Stalled``)
    stall_seconds: float = 60.0
    #: input bytes between two checkpoints of a streamed decode (the target is flushed at each)
    checkpoint_every: int = 64 << 20
    #: the import methods accepted (``manifest``, ``s3``, ``url``, ``upload``)
    methods: tuple[str, ...] = ("manifest", "s3", "url")
    #: staged uploads (the ``upload`` method); None only for a configuration built by hand
    upload: UploadConfig | None = None


@dataclass(frozen=True)
class UploadConfig:
    """``sources.upload``: where staged uploads live, how large and for how long."""

    directory: Path
    max_size: int = 64 << 30
    min_free: int = 1 << 30
    expire_hours: int = 24
    shared: bool = False


@dataclass(frozen=True)
class WorkerConfig:
    concurrency: int
    poll_interval: float
    #: seconds between a running task's looks at the store for a cancel (and its ownership)
    task_poll_interval: float = 0.3
    #: per-task caps (``"50%"`` of one CPU, IO weight 1..10000, bytes/s, bytes); None = unlimited
    task_cpu_quota: str | None = None
    task_io_weight: int | None = None
    task_io_read_bandwidth: int | None = None
    task_io_write_bandwidth: int | None = None
    task_memory_max: int | None = None


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
    #: pull: PEM text of the cloud certificate(s) that sign download manifests
    cloud_cert: str | None = None
    #: pull: a PEM file of the cloud certificate(s), read at every use
    cloud_cert_file: Path | None = None
    #: pull: the metadata service (instance-profile credentials, instance id)
    metadata_url: str = "http://169.254.169.254"
    #: pull: "2" (SigV2 with SecurityToken) or "4" (SigV4)
    signature_version: str = "2"
    #: pull: the region of the SigV4 scope
    region: str = "eucalyptus"


@dataclass(frozen=True)
class BundlesConfig:
    """EC2 image bundles (see :mod:`appliance.sources.bundle`): the cloud's private key, a secret."""

    cloud_private_key: str | None = field(default=None, repr=False)
    cloud_private_key_file: Path | None = None
    parallel_parts: int = 4
    #: PEM certificates whose signature a bundle manifest may carry (owners', the cloud's, node
    #: controllers'); with any, every unbundle checks the signature (GetDecryptedImage needs them)
    signer_certs: str | None = None
    signer_certs_file: Path | None = None


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
    bundles: BundlesConfig = field(default_factory=BundlesConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    #: the task database (None: SQLite at ``<state_dir>/imaging.db``)
    store_config: StoreConfig | None = None
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def paths(self) -> StatePaths:
        """Every file and directory under ``state_dir``."""
        return StatePaths(self.state_dir)

    @property
    def store(self) -> StoreConfig:
        """The task database: ``store`` of the configuration, SQLite in ``state_dir`` by default.
        Everything that opens it takes this (:class:`appliance.store.Store`)."""
        return self.store_config or StoreConfig.sqlite(self.paths.db)

    @property
    def db_path(self) -> Path | None:
        """The SQLite file of the task database; None when it is PostgreSQL."""
        return self.store.path
