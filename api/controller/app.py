"""The controller's Falcon app: HTTP only, every rule in :mod:`appliance.controller.lifecycle`.

Admin routes take ``Authorization: Bearer <token>`` (:class:`AdminAuth`; the controller has no
access-key list of its own, and a bearer token is what an admin's script or ``imaging controller``
sends most simply; serve over TLS). The appliance protocol routes (``config``, ``status``,
``assignments``, ``reports``) are authenticated by their HMAC signatures in the lifecycle, not here.
Errors are ``{"error": {"code", "message", "request_id"}}`` as in :mod:`api.app`, plus ``fields``
for an invalid configuration (:mod:`.errors`); bodies are read and checked against the OpenAPI
document by :mod:`.bodies`.
"""

from __future__ import annotations

import hmac
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import falcon

from appliance.controller import lifecycle
from appliance.controller.lifecycle import Registry, appliance_view, event_view
from appliance.controller.store import ControllerStore
from appliance.database import StoreConfig
from appliance.errors import ImagingError, UsageError
from appliance.redact import redact
from appliance.service.discovery import app_version
from appliance.store import StoreError

from ..app import ApiError, QueryCheck, RequestContext, documented_query_parameters, serialize_error
from .bodies import json_body, openapi_document, read_body, signed_headers, signed_path
from .errors import handle_imaging_error, handle_unexpected

API_VERSION = "v1"


@dataclass(frozen=True)
class Settings:
    """What ``imaging controller serve`` was given."""

    #: the controller's database: a SQLite file, or store settings (a PostgreSQL database)
    db: StoreConfig | Path
    admin_token: str
    enrol_secret: str | None = None
    #: seconds of silence after which the periodic sweep removes an appliance (None: no sweep)
    stale_after: float | None = 90.0
    sweep_interval: float = 10.0


class RegistryHandle:
    """The database and the lifecycle over it, opened on first use in the process using it (a gunicorn
    worker, after the fork); a failed open is retried on the next request."""

    def __init__(self, settings: Settings, store: ControllerStore | None = None) -> None:
        self._settings = settings
        self._store = store
        self._registry: Registry | None = None
        self._lock = threading.Lock()

    def get(self) -> Registry:
        with self._lock:
            if self._registry is None:
                if self._store is None:
                    self._store = ControllerStore(self._settings.db)
                self._registry = Registry(self._store, enrol_secret=self._settings.enrol_secret)
            return self._registry


class AdminAuth:
    """Middleware: resources with ``auth = "admin"`` (the default) need the admin bearer token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: Any
    ) -> None:
        if resource is None or getattr(resource, "auth", "admin") != "admin":
            return
        scheme, _, given = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise ApiError(
                falcon.HTTP_401,
                "AuthFailure",
                "the admin bearer token is required in the Authorization header",
                headers={"WWW-Authenticate": 'Bearer realm="imaging-controller"'},
            )
        req.context.principal = "admin"


# -- resources ------------------------------------------------------------------------------------


def versions_document() -> dict[str, Any]:
    return {
        "versions": [
            {
                "id": API_VERSION,
                "status": "CURRENT",
                "links": [
                    {"rel": "self", "href": f"/{API_VERSION}/"},
                    {"rel": "describedby", "href": f"/{API_VERSION}/openapi.json"},
                ],
            }
        ]
    }


class RootResource:
    auth = "open"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = versions_document()


class VersionResource:
    auth = "open"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"version": versions_document()["versions"][0]}


class OpenApiResource:
    auth = "open"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = json.dumps(openapi_document(), indent=1).encode()
        resp.content_type = falcon.MEDIA_JSON


class HealthResource:
    auth = "open"

    def __init__(self, registries: RegistryHandle) -> None:
        self._registries = registries

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            count = len(self._registries.get().appliances())
            checks: dict[str, Any] = {"store": "ok", "appliances": count}
            status = "ok"
        except StoreError as exc:
            checks, status = {"store": exc.message}, "disabled"
        resp.media = {"status": status, "version": app_version(), "checks": checks}
        resp.status = falcon.HTTP_200 if status == "ok" else falcon.HTTP_503
        resp.cache_control = ["no-store"]


class AppliancesResource:
    def __init__(self, registries: RegistryHandle) -> None:
        self._registries = registries

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"appliances": [appliance_view(a) for a in self._registries.get().appliances()]}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        doc = json_body(req, "Registration")
        row = self._registries.get().pre_register(
            doc["appliance_id"], doc["config"], doc["secret"], dynamic=bool(doc.get("dynamic", False))
        )
        resp.status = falcon.HTTP_201
        resp.location = f"/{API_VERSION}/appliances/{row.id}"
        resp.media = appliance_view(row)


class ApplianceResource:
    def __init__(self, registries: RegistryHandle) -> None:
        self._registries = registries

    def on_get(self, req: falcon.Request, resp: falcon.Response, appliance_id: str) -> None:
        registry = self._registries.get()
        view = appliance_view(registry.get(appliance_id))
        # the configuration as registered (the current version), secrets redacted
        view["config"] = redact(registry.store.config(appliance_id)[1])
        resp.media = view

    def on_delete(self, req: falcon.Request, resp: falcon.Response, appliance_id: str) -> None:
        self._registries.get().remove(appliance_id)
        resp.status = falcon.HTTP_204


class StaleRemovalsResource:
    def __init__(self, registries: RegistryHandle, settings: Settings) -> None:
        self._registries = registries
        self._default = settings.stale_after

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        doc = json_body(req, None, required=False)
        timeout = doc.get("timeout", self._default)
        if timeout is None and "timeout" not in doc:
            raise UsageError("give a timeout: this controller runs without --stale-after")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 31536000:
            raise UsageError("timeout must be a number of seconds above 0 (at most a year)")
        removed = self._registries.get().remove_stale(float(timeout))
        resp.media = {"removed": [event_view(e) for e in removed]}


#: the largest event id (SQLite INTEGER, PostgreSQL BIGINT)
MAX_EVENT_ID = 2**63 - 1


class EventsResource:
    def __init__(self, registries: RegistryHandle) -> None:
        self._registries = registries

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # event ids are 64-bit signed integers in both stores: a larger cursor is a bad request,
        # not an overflow in the database driver
        after = req.get_param_as_int("after", min_value=0, max_value=MAX_EVENT_ID, default=0)
        limit = req.get_param_as_int("limit", min_value=1, max_value=1000, default=100)
        appliance = req.get_param("appliance")
        if appliance is not None and not lifecycle.APPLIANCE_ID_RE.fullmatch(appliance):
            raise UsageError(f"appliance {appliance[:64]!r} is not an appliance id")
        events = self._registries.get().events(after or 0, limit or 100, appliance)
        resp.media = {"events": [event_view(e) for e in events]}


class ConfigResource:
    auth = "appliance"

    def __init__(self, registries: RegistryHandle) -> None:
        self._registries = registries

    def on_get(self, req: falcon.Request, resp: falcon.Response, appliance_id: str) -> None:
        have = req.get_param_as_int("have", min_value=1)
        registry = self._registries.get()
        body, headers = registry.serve_config(appliance_id, signed_path(req), signed_headers(req), have)
        resp.set_headers(headers)
        resp.cache_control = ["no-store"]
        if body is None:
            resp.status = falcon.HTTP_304
            return
        resp.data = body
        resp.content_type = falcon.MEDIA_JSON


class ConfigsResource:
    """``POST /v1/appliances/<id>/configs``: publish a new configuration version."""

    def __init__(self, registries: RegistryHandle) -> None:
        self._registries = registries

    def on_post(self, req: falcon.Request, resp: falcon.Response, appliance_id: str) -> None:
        doc = json_body(req, "Publication")
        version = self._registries.get().publish(appliance_id, doc["config"])
        resp.status = falcon.HTTP_201
        resp.media = {"appliance_id": appliance_id, "config_version": version}


class StatusResource:
    auth = "appliance"

    def __init__(self, registries: RegistryHandle) -> None:
        self._registries = registries

    def on_post(self, req: falcon.Request, resp: falcon.Response, appliance_id: str) -> None:
        body = read_body(req)
        self._registries.get().record_status(appliance_id, signed_path(req), signed_headers(req), body)
        resp.status = falcon.HTTP_204


class AssignmentsResource:
    auth = "appliance"

    def __init__(self, registries: RegistryHandle) -> None:
        self._registries = registries

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_body(req)
        answer, headers = self._registries.get().assign(signed_path(req), signed_headers(req), body)
        resp.data = answer
        resp.content_type = falcon.MEDIA_JSON
        resp.set_headers(headers)
        resp.cache_control = ["no-store"]


class ReportsResource:
    auth = "appliance"

    def __init__(self, registries: RegistryHandle) -> None:
        self._registries = registries

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._registries.get().record_report(read_body(req), signed_headers(req))


def create_app(settings: Settings, *, store: ControllerStore | None = None) -> falcon.App:
    """The controller's WSGI app (gunicorn calls this in each worker after the fork)."""
    registries = RegistryHandle(settings, store)
    documented = documented_query_parameters(openapi_document())
    app: falcon.App[falcon.Request, falcon.Response] = falcon.App(
        middleware=[RequestContext(), AdminAuth(settings.admin_token), QueryCheck(documented)]
    )
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(ImagingError, handle_imaging_error)
    app.add_route("/", RootResource())
    app.add_route("/v1", VersionResource())
    app.add_route("/v1/health", HealthResource(registries))
    app.add_route("/v1/openapi.json", OpenApiResource())
    app.add_route("/v1/appliances", AppliancesResource(registries))
    app.add_route("/v1/appliances/{appliance_id}", ApplianceResource(registries))
    app.add_route("/v1/appliances/{appliance_id}/config", ConfigResource(registries))
    app.add_route("/v1/appliances/{appliance_id}/configs", ConfigsResource(registries))
    app.add_route("/v1/appliances/{appliance_id}/status", StatusResource(registries))
    app.add_route("/v1/assignments", AssignmentsResource(registries))
    app.add_route("/v1/reports", ReportsResource(registries))
    app.add_route("/v1/stale-removals", StaleRemovalsResource(registries, settings))
    app.add_route("/v1/events", EventsResource(registries))
    return app
