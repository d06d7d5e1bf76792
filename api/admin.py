"""The JSON admin API (``/v1/…``): health, discovery, tasks, metrics and its own OpenAPI document;
the image routes are :mod:`api.images`.

Resources read the appliance's configuration and task database and render them with the views of
:mod:`appliance.service.taskviews` and :mod:`appliance.service.discovery`, adding only their links;
the one that acts (``POST /v1/tasks/{id}/cancel``) hands the request to the store. Every rule (task
states, limits, formats) comes from :mod:`appliance`. ``auth_required = False`` marks the
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
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import falcon
import yaml

from appliance.config import Config
from appliance.errors import UsageError
from appliance.redact import redact
from appliance.service import health as health_mod
from appliance.service.discovery import app_version, info_document
from appliance.service.taskviews import task_detail, task_summary
from appliance.store import TASK_ID_RE, Store, Task, TaskNotFound, TaskState

from . import metrics as metrics_mod

API_VERSION = "v1"
MAX_PAGE = 1000
DEFAULT_PAGE = 100


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


def task_href(task_id: str) -> str:
    return f"/{API_VERSION}/tasks/{task_id}"


def self_link(task_id: str) -> list[dict[str, str]]:
    """The ``links`` member of a task's document."""
    return [{"rel": "self", "href": task_href(task_id)}]


def summary_document(task: Task) -> dict[str, Any]:
    """A task as the task list (and the answer of an action on it) shows it."""
    return task_summary(task) | {"links": self_link(task.id)}


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
        self._doc = info_document(config, [API_VERSION], ec2_actions)

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
        doc: dict[str, Any] = {"tasks": [summary_document(t) for t in page], "next_marker": None, "links": []}
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
        task = store.get_task(task_id, account=req.context.accounts)
        resp.media = task_detail(store, task) | {"links": self_link(task.id)}


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


class TaskCancelResource:
    """``POST /v1/tasks/{task_id}/cancel``: ask a task the caller sees to stop (its run undoes what it
    did: a copy leaves no file, object or incomplete upload); 202 with the task, 409 when finished."""

    def __init__(self, stores: StoreHandle) -> None:
        self._stores = stores

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        if not TASK_ID_RE.match(task_id):
            raise UsageError(f"{task_id!r} is not a valid task id", code="InvalidTaskId.Malformed")
        store = self._stores.get()
        store.get_task(task_id, account=req.context.accounts)  # another account's: 404 TaskNotFound
        task = store.request_cancel(task_id, reason="Cancelled by user (admin API)")
        resp.status = falcon.HTTP_202
        resp.media = summary_document(task)
