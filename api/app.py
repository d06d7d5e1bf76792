"""The Falcon WSGI application: routes, request ids, access log, admin authentication, JSON errors.

``/`` is shared: a request carrying an EC2 ``Action`` (and every POST) goes to the EC2 Query
resource (:mod:`api.ec2.resource`, which renders its own XML errors); a plain ``GET /`` answers
version discovery. Everything else is the JSON admin API (:mod:`api.admin`), whose errors are
always ``{"error": {"code", "message", "request_id"}}``: Falcon's default HTML/XML error bodies
and tracebacks never reach a client.

Every request gets a fresh id in ``req.context.request_id`` (before any resource runs, so the EC2
resource can put the same id in its XML) and in the ``X-Request-Id`` response header.

The admin API takes exactly the query parameters its OpenAPI document lists for each operation
(:class:`QueryCheck`): another one is a 400 ``UnknownParameter`` rather than silently ignored, and
a documented single-valued one given twice a 400 ``InvalidParameterValue``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import falcon

from appliance.config import ADMIN, ApiConfig, Config
from appliance.errors import (
    BundleInvalid,
    ImageRejected,
    ImagingError,
    IncorrectState,
    TaskNotFound,
    UsageError,
)
from appliance.redact import redact_text
from appliance.service.imports import ImportService
from appliance.service.importtasks import Caller
from appliance.store import Store, StoreError

from . import admin, bundles, images, uploads
from .ec2 import resource as ec2_resource

log = logging.getLogger(__name__)
access_log = logging.getLogger("api.access")

REQUEST_ID_HEADER = "X-Request-Id"
REALM = "imaging-admin"

#: HTTP status of admin API errors by error code (codes not listed: by exception class, else 500)
_STATUS_BY_CODE = {
    "TaskNotFound": falcon.HTTP_404,
    "InvalidParameterValue": falcon.HTTP_400,
    "UnknownParameter": falcon.HTTP_400,
    "InvalidMarker": falcon.HTTP_400,
    "InvalidTaskId.Malformed": falcon.HTTP_400,
    "IncorrectState": falcon.HTTP_409,
    "InvalidAMIID.NotFound": falcon.HTTP_404,
    "InvalidSnapshot.NotFound": falcon.HTTP_404,
    "InvalidAMIID.Malformed": falcon.HTTP_400,
    "InvalidSnapshot.Malformed": falcon.HTTP_400,
    "Copy.AlreadyThere": falcon.HTTP_409,
    "Copy.FileDestinationDenied": falcon.HTTP_403,
    "ResourceLimitExceeded": falcon.HTTP_429,
    "StateStoreError": falcon.HTTP_503,
    "StateStoreUnavailable": falcon.HTTP_503,
    "InvalidConfiguration": falcon.HTTP_503,
    "SourceUnavailable": falcon.HTTP_502,
    "UrlNotAllowed": falcon.HTTP_400,
    "Source.Unreachable": falcon.HTTP_400,
    bundles.INSECURE_TRANSPORT: falcon.HTTP_403,
}
_STATUS_BY_CLASS = (
    (TaskNotFound, falcon.HTTP_404),
    (UsageError, falcon.HTTP_400),
    (IncorrectState, falcon.HTTP_409),
    (StoreError, falcon.HTTP_503),
    (BundleInvalid, falcon.HTTP_422),
    (ImageRejected, falcon.HTTP_422),
)
#: error codes for Falcon's own HTTP errors (unknown route, wrong method, bad query parameter)
_CODE_BY_STATUS = {
    400: "InvalidParameterValue",
    401: "AuthFailure",
    403: "AccessDenied",
    404: "NotFound",
    405: "MethodNotAllowed",
    500: "InternalError",
    503: "ServiceUnavailable",
}
INTERNAL_MESSAGE = "an internal error occurred; quote the request id when reporting it"


class ApiError(falcon.HTTPError):
    """An admin API error with its stable ``code`` (rendered by :func:`serialize_error`)."""

    def __init__(self, status: str, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, title=code, description=message, headers=headers)
        self.error_code = code


def request_id(req: falcon.Request) -> str:
    return getattr(req.context, "request_id", None) or "-"


def _error_body(code: str, message: str, rid: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": redact_text(message), "request_id": rid}}).encode()


def _default_message(req: falcon.Request, exc: falcon.HTTPError) -> str:
    if exc.status_code == 404:
        return f"no resource at {req.path}"
    if exc.status_code == 405:
        allowed = dict(exc.headers or {}).get("Allow", "")
        return f"{req.method} is not allowed on {req.path} (allowed: {allowed})"
    return str(exc.status).split(" ", 1)[-1]


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Render any ``HTTPError`` as the admin API's JSON error, whatever the client's Accept header."""
    code = getattr(exc, "error_code", None) or _CODE_BY_STATUS.get(exc.status_code)
    if code is None:  # e.g. "415 Unsupported Media Type" -> "UnsupportedMediaType"
        code = "".join(w.capitalize() for w in str(exc.status).split(" ", 1)[-1].split())
    message = exc.description or _default_message(req, exc)
    resp.data = _error_body(code, message, request_id(req))
    resp.content_type = falcon.MEDIA_JSON


def _status_for(exc: ImagingError) -> str | None:
    status = _STATUS_BY_CODE.get(exc.code)
    if status is None:
        for cls, by_class in _STATUS_BY_CLASS:
            if isinstance(exc, cls):
                return by_class
    return status


def _handle_imaging_error(req: falcon.Request, resp: falcon.Response, exc: ImagingError, params: Any) -> None:
    status = _status_for(exc)
    if status is None:
        # An uncoded ImagingError is a bug as much as any other exception: hide its text.
        _handle_unexpected(req, resp, exc, params)
        return
    resp.status = status
    resp.data = _error_body(exc.code, exc.message, request_id(req))
    resp.content_type = falcon.MEDIA_JSON


def _handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: Any) -> None:
    # The traceback goes to the log under the request id, never to the client.
    log.error("request %s %s %s failed", request_id(req), req.method, req.path, exc_info=exc)
    resp.status = falcon.HTTP_500
    resp.data = _error_body("InternalError", INTERNAL_MESSAGE, request_id(req))
    resp.content_type = falcon.MEDIA_JSON


class RequestContext:
    """Middleware: a request id on every request and response, one access-log line per request.

    The log line carries the path without its query string: EC2 GET requests and presigned
    queries put signatures there.
    """

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_id = str(uuid.uuid4())
        req.context.started = time.monotonic()
        req.context.principal = None
        # whose tasks the admin API shows (BasicAuth sets it): nobody's until someone signs in
        req.context.accounts = frozenset()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        resp.set_header(REQUEST_ID_HEADER, request_id(req))
        elapsed_ms = (time.monotonic() - getattr(req.context, "started", time.monotonic())) * 1000
        access_log.info(
            '%s "%s %s" %s %.1fms request_id=%s principal=%s',
            req.remote_addr,
            req.method,
            req.path,
            resp.status_code,
            elapsed_ms,
            request_id(req),
            req.context.principal or "-",
        )


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic …`` header, or None if absent/malformed."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class BasicAuth:
    """Middleware: the admin API needs HTTP Basic auth with an ``api.credentials`` access key/secret.

    Resources with ``auth_required = False`` (``/``, health, the OpenAPI document) are open; the
    EC2 resource behind ``/`` authenticates with SigV4 itself.

    It also says whose tasks the request may see (``req.context.accounts``): every account's for a
    key with ``role: admin`` (None), else those its account sees (:meth:`Caller.of`), whatever
    headers come with the request (Basic auth signs none).
    """

    def __init__(self, api: ApiConfig) -> None:
        self._credentials = dict(api.credentials)
        self._principals = dict(api.principals)

    def authenticate(self, header: str | None) -> str | None:
        """The access key the header proves, or None."""
        pair = parse_basic(header)
        if pair is None:
            return None
        key, secret = pair
        expected = self._credentials.get(key)
        # Compare even for an unknown key so the time taken does not tell which keys exist.
        match = hmac.compare_digest(secret.encode(), (expected or "\0" * len(secret)).encode())
        return key if expected is not None and match else None

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: Any
    ) -> None:
        if resource is None or not getattr(resource, "auth_required", True):
            return
        principal = self.authenticate(req.get_header("Authorization"))
        if principal is None:
            raise ApiError(
                falcon.HTTP_401,
                "AuthFailure",
                "HTTP Basic authentication required: an access key and its secret from api.credentials",
                headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            )
        req.context.principal = principal
        credential = self._principals[principal]
        req.context.accounts = None if credential.role == ADMIN else Caller.of(credential).sees


#: query parameter name → whether it may be repeated (an ``array`` schema), per (path template, method)
QueryParams = dict[tuple[str, str], dict[str, bool]]


def documented_query_parameters(document: Mapping[str, Any]) -> QueryParams:
    """The query parameters of each operation of an OpenAPI ``document`` (HEAD takes GET's)."""
    out: QueryParams = {}
    for template, item in document["paths"].items():
        for method, operation in item.items():
            params = {
                p["name"]: p.get("schema", {}).get("type") == "array"
                for p in operation.get("parameters", ())
                if p.get("in") == "query"
            }
            out[(template, method)] = params
            if method == "get":
                out.setdefault((template, "head"), params)
    return out


def check_query(req: falcon.Request, allowed: Mapping[str, bool]) -> None:
    """Refuse query parameters not in ``allowed`` (first), then repeats of those that are not lists."""
    for name in req.params:
        if name not in allowed:
            takes = ", ".join(sorted(allowed)) or "no query parameters"
            raise ApiError(
                falcon.HTTP_400,
                "UnknownParameter",
                f"unknown query parameter {name[:64]!r}; {req.method} {req.uri_template} takes {takes}",
            )
    for name, value in req.params.items():
        if isinstance(value, list) and not allowed[name]:
            raise ApiError(
                falcon.HTTP_400, "InvalidParameterValue", f"the query parameter {name} may be given only once"
            )


class QueryCheck:
    """Middleware: each admin operation takes the query parameters its OpenAPI document lists.

    Resources with ``checks_own_query = True`` (``/``, whose EC2 requests carry EC2 parameters)
    call :func:`check_query` themselves; unknown routes are left to Falcon's 404/405.
    """

    def __init__(self, documented: QueryParams) -> None:
        self._documented = documented

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: Any
    ) -> None:
        if resource is None or getattr(resource, "checks_own_query", False):
            return
        allowed = self._documented.get((req.uri_template or "", req.method.lower()))
        if allowed is not None:
            check_query(req, allowed)


class RootResource:
    """``/``: the EC2 Query endpoint (any POST, a GET with ``Action``) or version discovery."""

    auth_required = False
    checks_own_query = True

    def __init__(
        self,
        make_ec2: Callable[[], ec2_resource.Ec2Resource],
        max_request_bytes: int,
        query_params: Mapping[str, bool] | None = None,
    ) -> None:
        self._make_ec2 = make_ec2
        self._max_bytes = max_request_bytes
        self._query_params = query_params or {}
        self._ec2: ec2_resource.Ec2Resource | None = None
        self._lock = threading.Lock()

    def _resource(self) -> ec2_resource.Ec2Resource:
        # Built on first use: it needs the task database, which may not be openable at boot.
        with self._lock:
            if self._ec2 is None:
                self._ec2 = self._make_ec2()
            return self._ec2

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if ec2_resource.handles(req, self._max_bytes):
            resource = self._resource_or_error(req, resp)
            if resource is not None:
                resource.on_get(req, resp)
            return
        check_query(req, self._query_params)
        resp.media = admin.versions_document()

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resource = self._resource_or_error(req, resp)
        if resource is not None:
            resource.on_post(req, resp)

    def _resource_or_error(
        self, req: falcon.Request, resp: falcon.Response
    ) -> ec2_resource.Ec2Resource | None:
        """The EC2 resource, or None after answering the request with the EC2 error that kept it from
        being built (a task database that cannot be opened now: ``ServiceUnavailable``)."""
        try:
            return self._resource()
        except ImagingError as exc:
            ec2_resource.respond_with_error(req, resp, exc)
            return None


class VersionResource:
    """``GET /v1``: this version's description."""

    auth_required = False

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"version": admin.versions_document()["versions"][0]}


def create_app(
    config: Config, *, store: Store | None = None, service: ImportService | None = None
) -> falcon.App:
    """The WSGI app for ``config``.

    ``store`` (a :class:`~appliance.store.Store`) and ``service`` (an
    :class:`appliance.service.imports.ImportService`) default to ones opened on first use in the calling
    process; gunicorn calls this factory in each worker after the fork, so no SQLite connection
    is shared between processes.
    """
    stores = admin.StoreHandle(config, store)

    def make_ec2() -> ec2_resource.Ec2Resource:
        return ec2_resource.Ec2Resource(config, service or ImportService(config, stores.get()))

    documented = documented_query_parameters(admin.openapi_document())
    app: falcon.App[falcon.Request, falcon.Response] = falcon.App(
        middleware=[RequestContext(), BasicAuth(config.api), QueryCheck(documented)]
    )
    app.req_options.strip_url_path_trailing_slash = True
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, _handle_unexpected)
    app.add_error_handler(ImagingError, _handle_imaging_error)

    app.add_route("/", RootResource(make_ec2, config.api.max_request_bytes, documented[("/", "get")]))
    app.add_route("/v1", VersionResource())
    app.add_route("/v1/health", admin.HealthResource(config, stores))
    app.add_route("/v1/info", admin.InfoResource(config, tuple(ec2_resource.ACTIONS)))
    app.add_route("/v1/tasks", admin.TasksResource(stores))
    app.add_route("/v1/tasks/{task_id}", admin.TaskResource(stores))
    app.add_route("/v1/tasks/{task_id}/cancel", admin.TaskCancelResource(stores))
    app.add_route("/v1/images/{image_id}", images.ImageResource(config, stores))
    app.add_route("/v1/images/{image_id}/copies", images.ImageCopiesResource(config, stores))
    app.add_route("/v1/bundles/decrypted-image", bundles.DecryptedImageResource(config))
    app.add_route(
        "/v1/uploads/{upload_id}",
        uploads.UploadResource(config, stores.get, BasicAuth(config.api).authenticate),
    )
    app.add_route("/v1/openapi.json", admin.OpenApiResource())
    app.add_route("/metrics", admin.MetricsResource(stores))
    return app
