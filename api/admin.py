"""The JSON admin API (``/v1/…``): health, discovery, tasks, metrics and its own OpenAPI document.

Resources only read the appliance's configuration and task database and render them; every rule
(task states, limits, formats) comes from :mod:`appliance`. ``auth_required = False`` marks the
resources a load balancer or a client must reach without credentials (see :mod:`api.app`).

The task routes show a key with ``role: admin`` every account's tasks and any other key its own
account's (``req.context.accounts``, set by :class:`api.app.BasicAuth`); another account's task is
a 404 in the same words as a task that does not exist. ``/metrics`` and ``/v1/info`` are the same
for every key: counts by kind and state, and the appliance's settings, name no task nor account.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from functools import cache
from importlib import metadata, resources
from typing import Any
from urllib.parse import urlencode

import falcon
import yaml

from appliance.config import Config
from appliance.errors import UsageError
from appliance.image import formats
from appliance.redact import redact
from appliance.service import health as health_mod
from appliance.service import imports
from appliance.service.imports import boot_settings, encryption_report, guest_report, validated_report
from appliance.service.provenance import provenance_of
from appliance.sources import methods
from appliance.sources.methods import enabled_methods
from appliance.store import TASK_ID_RE, Store, Task, TaskNotFound, TaskState

from . import metrics as metrics_mod

API_VERSION = "v1"
MAX_PAGE = 1000
DEFAULT_PAGE = 100
RECENT_EVENTS = 50


@cache
def app_version() -> str:
    """The installed package version (``0+unknown`` when running from an uninstalled tree)."""
    try:
        return metadata.version("imaging-appliance")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@cache
def openapi_document() -> dict[str, Any]:
    """The admin API's OpenAPI 3.1 document (package data ``api/openapi.yaml``), version filled in."""
    text = resources.files("api").joinpath("openapi.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    doc["info"]["version"] = app_version()
    return doc


class StoreHandle:
    """The task database, opened on first use in the process that uses it.

    Opened lazily (not in the app factory) so that a database that cannot be opened yet shows up
    as a failed health check and 503 answers instead of a gunicorn worker that fails to boot; a
    failed open is retried on the next request.
    """

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self._config = config
        self._store = store
        self._lock = threading.Lock()

    def get(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = Store(self._config.store)
            return self._store


# -- rendering ------------------------------------------------------------------------------------


def task_href(task_id: str) -> str:
    return f"/{API_VERSION}/tasks/{task_id}"


def account_of(task: Task) -> str | None:
    """The account the task belongs to; None for a task recorded without one."""
    return task.client_account or None


def task_summary(task: Task) -> dict[str, Any]:
    """The list view of a task (redacted, see :mod:`appliance.redact`)."""
    view = {
        "id": task.id,
        "kind": task.kind,
        "account": account_of(task),
        "state": str(task.state),
        "phase": task.phase,
        "percent": task.percent,
        "bytes_done": task.bytes_done,
        "bytes_total": task.bytes_total,
        "bytes_converted": task.bytes_converted,
        "status_message": task.status_message,
        "error_code": task.error_code,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "links": [{"rel": "self", "href": task_href(task.id)}],
    }
    return redact(view)


def task_detail(store: Store, task: Task) -> dict[str, Any]:
    """The full view of a task: the row, progress, steps, findings, the guest validation report and
    boot settings (image and instance imports), the encryption asked for and applied (image and
    snapshot imports), cleanup ledger, recent events — redacted: params and step arguments hold
    presigned URLs (bearer credentials until they expire) and hook arguments."""
    row = task.to_dict()
    row.pop("findings")
    row.pop("client_account")  # shown as ``account``
    all_events = store.events(task_id=task.id, limit=100_000)
    events = all_events[-RECENT_EVENTS:]
    # not outcome(): any workflow may run as a task, and only imports' results have its layout;
    # a task that validation failed has no result, but its guest.validated event holds the report
    guest = guest_report(task.result) or validated_report(all_events)
    view = {
        "task": row,
        "account": account_of(task),
        "progress": {
            "phase": task.phase,
            "percent": task.percent,
            "bytes_done": task.bytes_done,
            "bytes_total": task.bytes_total,
            "bytes_converted": task.bytes_converted,
            "stages": stages(all_events),
        },
        "steps": [s.to_dict() for s in store.step_results(task.id)],
        "findings": task.findings,
        "guest": guest,
        "boot": boot_settings(task, guest),
        "encryption": encryption_report(task),
        "provenance": provenance_of(task),
        "ledger": [e.to_dict() for e in store.ledger(task.id)],
        "events": [e.to_dict() for e in events],
        "links": [{"rel": "self", "href": task_href(task.id)}],
    }
    return redact(view)


#: what a stage of :func:`stages` shows, from the step's progress reports
_STAGE_FIELDS = ("phase", "read", "written", "done", "total", "percent", "rate", "eta")


def stages(events: Sequence[Any]) -> list[dict[str, Any]]:
    """Per step that reported progress (``step.progress`` events), its latest figures: ``phase``,
    bytes ``read`` from the source and ``written`` to the target, ``done``/``total``, ``percent``,
    ``rate`` (bytes/s; 0 while nothing moves) and ``eta`` (seconds), each None when the step did
    not say; ``retries``: the ``source.retry`` events of the step so far; ``at``: when reported."""
    latest: dict[str, dict[str, Any]] = {}
    retries: dict[str, int] = {}
    for event in events:
        step = str(event.data.get("step"))
        if event.kind == "step.progress":
            latest.pop(step, None)  # re-inserted: the order is that of the latest reports
            latest[step] = {"step": step, **{f: event.data.get(f) for f in _STAGE_FIELDS}, "at": event.time}
        elif event.kind == "source.retry":
            retries[step] = retries.get(step, 0) + 1
    return [stage | {"retries": retries.get(step, 0)} for step, stage in latest.items()]


def info_document(config: Config, ec2_actions: Sequence[str]) -> dict[str, Any]:
    """What this appliance accepts and produces (like Glance's ``/v2/info/import``)."""
    banned = set(config.safety.banned_formats)
    inputs = [
        f
        for f in formats.INPUT_FORMATS
        if f not in banned and not (f == "iso" and config.safety.iso_policy == "reject")
    ]
    return {
        "version": app_version(),
        "api_versions": [API_VERSION],
        "ec2": {
            "actions": list(ec2_actions),
            "region": config.api.region,
            "signature_versions": ["4", "2"] if config.api.sigv2 else ["4"],
            "sigv2": config.api.sigv2,
        },
        "import": {
            "input_formats": inputs,
            "compressions": list(formats.COMPRESSIONS),
            "wire_formats": {
                "ImportVolume": list(imports.VOLUME_FORMATS),
                "ImportInstance": list(imports.VOLUME_FORMATS),
                "ImportImage": list(imports.CONTAINER_FORMATS),
                "ImportSnapshot": list(imports.CONTAINER_FORMATS),
            },
            # every target writes the converted disk as raw (a volume, a file, an object)
            "output_formats": ["raw"],
            # the enabled import methods (sources.methods), each with what it serves and its limits
            "sources": list(enabled_methods(config.sources)),
            "methods": import_methods(config),
            "targets": {kind: t["type"] for kind, t in sorted(config.targets.items())},
        },
        "limits": {
            "max_virtual_size": config.limits.max_virtual_size,
            "max_decompressed_size": config.limits.max_decompressed_size,
            "scratch_quota": config.scratch.quota,
            "scratch_min_free": config.scratch.min_free,
            "max_active_tasks": config.max_active_tasks,
            "max_request_bytes": config.api.max_request_bytes,
            "expiration_hours": config.expiration_hours,
            "worker_concurrency": config.worker.concurrency,
        },
    }


def import_methods(config: Config) -> dict[str, Any]:
    """The enabled import methods (Glance's ``enabled_import_methods``), each with the actions and
    request members that use it and its limits."""
    limits = config.limits
    download = {
        "max_download_bytes": limits.max_decompressed_size,
        "max_virtual_size": limits.max_virtual_size,
    }
    described: dict[str, dict[str, Any]] = {
        methods.MANIFEST: {
            "actions": ["ImportVolume", "ImportInstance"],
            "member": "Image.ImportManifestUrl (a presigned https:// import manifest)",
            "limits": {"max_virtual_size": limits.max_virtual_size},
        },
        methods.S3: {
            "actions": ["ImportImage", "ImportSnapshot"],
            "member": "DiskContainer UserBucket, or Url s3://bucket/key",
            "limits": download,
        },
        methods.URL: {
            "actions": ["ImportImage", "ImportSnapshot"],
            "member": "DiskContainer Url https:// (under the SSRF policy: sources.allowed_endpoints)",
            "limits": download,
        },
    }
    upload = config.sources.upload
    if upload is not None:
        described[methods.UPLOAD] = {
            "actions": ["ImportImage", "ImportSnapshot", "ImportVolume", "ImportInstance"],
            "member": "DiskContainer Url or Image.ImportManifestUrl upload://{id} (PUT /v1/uploads/{id})",
            "limits": {
                "max_size": upload.max_size,
                "expire_hours": upload.expire_hours,
                "max_virtual_size": limits.max_virtual_size,
            },
        }
    return {name: described[name] for name in enabled_methods(config.sources) if name in described}


def versions_document() -> dict[str, Any]:
    """``GET /``: the API versions this server speaks (OpenStack style)."""
    return {
        "versions": [
            {
                "id": API_VERSION,
                "status": "CURRENT",
                "links": [
                    {"rel": "self", "href": f"/{API_VERSION}/"},
                    {
                        "rel": "describedby",
                        "type": "application/vnd.oai.openapi+json;version=3.1",
                        "href": f"/{API_VERSION}/openapi.json",
                    },
                ],
            }
        ]
    }


# -- resources ------------------------------------------------------------------------------------


class HealthResource:
    """``GET /v1/health``: 200 ``ok``/``degraded``, 503 ``disabled`` (unauthenticated)."""

    auth_required = False

    def __init__(self, config: Config, stores: StoreHandle) -> None:
        self._config = config
        self._stores = stores

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        doc = redact(health_mod.health(self._config, self._stores.get, app_version()))
        resp.media = doc
        resp.status = falcon.HTTP_503 if doc["status"] == health_mod.DISABLED else falcon.HTTP_200
        resp.cache_control = ["no-store"]

    # Some load balancers probe with HEAD; Falcon drops the body and keeps the status.
    on_head = on_get


class InfoResource:
    """``GET /v1/info``: supported actions, formats, sources, targets and limits."""

    def __init__(self, config: Config, ec2_actions: Sequence[str]) -> None:
        self._doc = info_document(config, ec2_actions)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._doc


def _list_param(req: falcon.Request, name: str) -> list[str] | None:
    """A repeated and/or comma-separated query parameter (split here: the app-wide CSV option would
    also split commas inside EC2 parameter values)."""
    values = [v.strip() for raw in req.get_param_as_list(name) or () for v in raw.split(",")]
    return [v for v in values if v] or None


class TasksResource:
    """``GET /v1/tasks?state=&kind=&limit=&marker=``: the tasks the caller sees, newest first,
    paged by marker."""

    def __init__(self, stores: StoreHandle) -> None:
        self._stores = stores

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = req.get_param_as_int("limit", min_value=1, max_value=MAX_PAGE, default=DEFAULT_PAGE)
        states = _list_param(req, "state")
        kinds = _list_param(req, "kind")
        marker = req.get_param("marker") or None  # an empty marker is the first page
        valid = [str(s) for s in TaskState]
        for state in states or ():
            if state not in valid:
                raise UsageError(f"state {state!r} is not one of {', '.join(valid)}")
        try:
            # one extra row tells whether a next page exists without a COUNT query
            tasks = self._stores.get().list_tasks(
                states, kind=kinds, limit=limit + 1, marker=marker, account=req.context.accounts
            )
        except TaskNotFound as exc:
            raise UsageError(f"marker {marker!r} is not a task id", code="InvalidMarker") from exc
        page = tasks[:limit]
        doc: dict[str, Any] = {"tasks": [task_summary(t) for t in page], "next_marker": None, "links": []}
        if len(tasks) > limit:
            doc["next_marker"] = page[-1].id
            query = [("limit", str(limit))]
            query += [("state", s) for s in states or ()]
            query += [("kind", k) for k in kinds or ()]
            query.append(("marker", page[-1].id))
            doc["links"].append({"rel": "next", "href": f"/{API_VERSION}/tasks?{urlencode(query)}"})
        resp.media = doc


class TaskResource:
    """``GET /v1/tasks/{task_id}``: the full detail of one task the caller sees."""

    def __init__(self, stores: StoreHandle) -> None:
        self._stores = stores

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        if not TASK_ID_RE.match(task_id):
            raise UsageError(f"{task_id!r} is not a valid task id", code="InvalidTaskId.Malformed")
        store = self._stores.get()
        resp.media = task_detail(store, store.get_task(task_id, account=req.context.accounts))


class OpenApiResource:
    """``GET /v1/openapi.json``: this API's OpenAPI 3.1 document (unauthenticated)."""

    auth_required = False

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = json.dumps(openapi_document(), indent=1).encode()
        resp.content_type = falcon.MEDIA_JSON


class MetricsResource:
    """``GET /metrics``: Prometheus text format."""

    def __init__(self, stores: StoreHandle) -> None:
        self._stores = stores

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.text = metrics_mod.metrics_text(self._stores.get(), app_version())
        resp.content_type = metrics_mod.CONTENT_TYPE
