"""The Falcon resource that serves the EC2 Query API at ``/`` (GET with a query string, POST with a
form body).

Per request: a fresh request id (in the body and in ``x-amzn-RequestId``), the body read up to
``api.max_request_bytes`` (413 beyond), parameters decoded, the signature verified, ``Action``
dispatched to its handler, and the result rendered as EC2 XML. Every failure is an EC2 error
document; unexpected exceptions become ``InternalError`` (500) with the traceback only in the log,
tagged with the request id.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import falcon

from appliance.config import Config
from appliance.errors import ImagingError
from appliance.service.imports import ImportService
from appliance.service.importtasks import Caller

from . import bundle, conversion, export, image_import, xml
from .auth import ALGORITHM, Authenticator, SignedRequest, decode_query
from .errors import INTERNAL_ERROR_MESSAGE, Ec2Error, from_imaging_error, render_error
from .query import is_protocol_param

log = logging.getLogger(__name__)

Handler = Callable[[ImportService, Mapping[str, Sequence[str]], Caller], dict[str, Any] | None]

#: Action → handler, called with the service, the request parameters and the caller (the account the
#: request acts for, which owns the tasks it creates and scopes its client tokens, and the accounts
#: whose tasks it sees: :meth:`api.ec2.auth.Authenticator.authenticate`). Every action is also an
#: operation of botocore's ec2 model (its shapes drive parsing and rendering).
ACTIONS: dict[str, Handler] = {
    "ImportVolume": conversion.import_volume,
    "ImportInstance": conversion.import_instance,
    "DescribeConversionTasks": conversion.describe_conversion_tasks,
    "CancelConversionTask": conversion.cancel_conversion_task,
    "ImportImage": image_import.import_image,
    "ImportSnapshot": image_import.import_snapshot,
    "DescribeImportImageTasks": image_import.describe_import_image_tasks,
    "DescribeImportSnapshotTasks": image_import.describe_import_snapshot_tasks,
    "CancelImportTask": image_import.cancel_import_task,
    "CreateInstanceExportTask": export.create_instance_export_task,
    "DescribeExportTasks": export.describe_export_tasks,
    "CancelExportTask": export.cancel_export_task,
    "ExportImage": export.export_image,
    "DescribeExportImageTasks": export.describe_export_image_tasks,
    "BundleInstance": bundle.bundle_instance,
    "DescribeBundleTasks": bundle.describe_bundle_tasks,
    "CancelBundleTask": bundle.cancel_bundle_task,
    "CreateImage": bundle.create_image,
}

CONTENT_TYPE = "text/xml;charset=UTF-8"
FORM_TYPE = "application/x-www-form-urlencoded"
#: body limit :func:`handles` applies when not given one (the ``api.max_request_bytes`` default)
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
#: how much of a refused body is read and thrown away so that the client, still sending, sees the
#: 413 instead of a connection reset; a larger body gets the answer and the connection closes on it
DRAIN_LIMIT = 16 << 20


def read_body(req: falcon.Request, max_bytes: int) -> bytes:
    """The request body, read once (cached on ``req.context``) and at most ``max_bytes`` long."""
    length = req.content_length
    if (length is not None and length > max_bytes) or len(req.query_string) > max_bytes:
        _drain(req)
        raise _too_large(max_bytes)
    # (bytes read so far, whether the stream is exhausted): :func:`handles` may have read part of
    # a body of unknown length with a smaller limit than the resource's.
    body, complete = getattr(req.context, "ec2_body", (b"", False))
    if not complete and len(body) <= max_bytes:
        more = req.bounded_stream.read(max_bytes + 1 - len(body))
        complete = len(body) + len(more) <= max_bytes
        body += more
        req.context.ec2_body = (body, complete)
    if len(body) > max_bytes:
        _drain(req)
        raise _too_large(max_bytes)
    return body


def _drain(req: falcon.Request) -> None:
    """Read and discard what is left of the body, up to :data:`DRAIN_LIMIT` bytes."""
    left = DRAIN_LIMIT
    while left > 0:
        chunk = req.bounded_stream.read(min(left, 1 << 16))
        if not chunk:
            return
        left -= len(chunk)


def _too_large(max_bytes: int) -> Ec2Error:
    return Ec2Error(
        "RequestEntityTooLarge", f"The request is larger than {max_bytes} bytes (api.max_request_bytes)", 413
    )


def _is_form(req: falcon.Request) -> bool:
    content_type = (req.content_type or FORM_TYPE).split(";")[0].strip().lower()
    return content_type == FORM_TYPE


def request_params(req: falcon.Request, body: bytes) -> dict[str, list[str]]:
    """Decoded parameters of the query string and (for a form POST) the body, as value lists."""
    pairs = decode_query(req.query_string)
    if body:
        if not _is_form(req):
            raise Ec2Error("InvalidParameterValue", f"The request body must be {FORM_TYPE}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise Ec2Error("MalformedQueryString", "The request body is not valid UTF-8") from None
        pairs += decode_query(text)
    params: dict[str, list[str]] = {}
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    return params


def handles(req: falcon.Request, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> bool:
    """Whether ``req`` (GET or POST) carries an ``Action`` parameter, i.e. is an EC2 Query request.

    A request signed with SigV4 (``Authorization: AWS4-HMAC-SHA256 …``) or whose query string has
    EC2 protocol or signature parameters (``Version``, ``X-Amz-*``, ``AWSAccessKeyId``…) but no
    ``Action`` is EC2 too, so that its client gets ``MissingAction`` as EC2 XML. For a POST the
    body is read (and kept for the resource); a body over ``max_bytes`` counts as EC2 so that the
    client gets the EC2 413 error.
    """
    names = {name for name, _ in _safe_pairs(req.query_string)}
    if "Action" in names or any(is_protocol_param(name) for name in names):
        return True
    if (req.get_header("Authorization") or "").startswith(ALGORITHM):
        return True
    if req.method != "POST":
        return False
    try:
        body = read_body(req, max_bytes)
    except Ec2Error:
        return True
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return _is_form(req)
    return "Action" in {name for name, _ in _safe_pairs(text)}


def _safe_pairs(text: str) -> list[tuple[str, str]]:
    try:
        return decode_query(text)
    except Ec2Error:
        return []


class Ec2Resource:
    """Serves ``GET /?Action=…`` and ``POST /`` (form body) as the EC2 Query API."""

    def __init__(self, config: Config, service: ImportService) -> None:
        self._service = service
        self._auth = Authenticator(config.api)
        self._max_bytes = config.api.max_request_bytes

    def handles(self, req: falcon.Request) -> bool:
        """:func:`handles` with this appliance's body limit."""
        return handles(req, self._max_bytes)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._serve(req, resp)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._serve(req, resp)

    def _serve(self, req: falcon.Request, resp: falcon.Response) -> None:
        # The app's middleware may already have given the request an id (its access log uses it).
        request_id = getattr(req.context, "request_id", None) or str(uuid.uuid4())
        started = time.monotonic()
        resp.set_header("x-amzn-RequestId", request_id)
        resp.content_type = CONTENT_TYPE
        action: str | None = None
        who = account = "-"
        try:
            body = read_body(req, self._max_bytes)
            params = request_params(req, body)
            identity = self._auth.authenticate(
                SignedRequest(
                    method=req.method,
                    path=(req.root_path or "") + req.path,
                    query_string=req.query_string,
                    headers=req.headers_lower,
                    body=body,
                    params=params,
                )
            )
            who, account = identity.access_key, identity.caller.account
            req.context.principal = who  # the app's access log names the signer
            action = _action(params)
            data = ACTIONS[action](self._service, params, identity.caller)
            resp.data = xml.render(action, data, request_id)
            resp.status = falcon.HTTP_200
        except Ec2Error as exc:
            self._fail(resp, exc, request_id)
        except ImagingError as exc:
            self._fail(resp, _coded(exc, request_id, action), request_id)
        except Exception:
            log.exception("request %s (%s): internal error", request_id, action)
            self._fail(resp, Ec2Error("InternalError", INTERNAL_ERROR_MESSAGE, 500), request_id)
        log.info(
            "ec2 %s %s key=%s account=%s status=%s request=%s %.0fms",
            req.method,
            action or "-",
            who,
            account,
            resp.status,
            request_id,
            (time.monotonic() - started) * 1000,
        )

    @staticmethod
    def _fail(resp: falcon.Response, error: Ec2Error, request_id: str) -> None:
        resp.status = falcon.code_to_http_status(error.status)
        resp.data = render_error(error, request_id)


def _coded(exc: ImagingError, request_id: str, action: str | None) -> Ec2Error:
    """The EC2 error for a coded appliance error, logged where the operator needs it."""
    error = from_imaging_error(exc)
    if error.code == "InternalError":
        log.error("request %s (%s): unexpected appliance error %s", request_id, action, exc, exc_info=exc)
    elif exc.code == "StateStoreUnavailable":
        # the client is told to retry; where the database is and why it failed is for the log
        log.warning("request %s (%s): %s", request_id, action, exc.message)
    return error


def respond_with_error(req: falcon.Request, resp: falcon.Response, exc: ImagingError) -> None:
    """Answer an EC2 request with the EC2 error for ``exc`` raised before its resource could serve it
    (e.g. the task database could not be opened to build the resource)."""
    request_id = getattr(req.context, "request_id", None) or str(uuid.uuid4())
    resp.set_header("x-amzn-RequestId", request_id)
    resp.content_type = CONTENT_TYPE
    Ec2Resource._fail(resp, _coded(exc, request_id, None), request_id)


def _action(params: Mapping[str, Sequence[str]]) -> str:
    values = params.get("Action")
    if not values or not values[0]:
        raise Ec2Error("MissingAction", "The request must contain the parameter Action")
    if len(values) > 1:
        raise Ec2Error("InvalidParameterValue", "The parameter Action must be specified exactly once")
    if values[0] not in ACTIONS:
        raise Ec2Error("InvalidAction", f"The action {values[0]} is not valid for this web service.")
    return values[0]
