"""The controller API's errors: which HTTP status each coded error of the lifecycle and the store
is answered with, and the ``{"error": {"code", "message", "request_id"}}`` body (as in
:mod:`api.app`; ``fields`` added for an invalid configuration), messages redacted; anything else is
a logged ``InternalError`` that names only the request id.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon

from appliance.controller.lifecycle import (
    AuthFailure,
    ConfigurationInvalid,
    EnrolmentDisabled,
    NoUnassignedConfiguration,
    ReportRefused,
)
from appliance.controller.store import ApplianceExists, ApplianceNotFound
from appliance.errors import ImagingError, UsageError
from appliance.redact import redact_text
from appliance.store import StoreError

from ..app import request_id

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "an internal error occurred; quote the request id when reporting it"


def _status_for(exc: ImagingError) -> str | None:
    if isinstance(exc, ReportRefused):
        return falcon.code_to_http_status(exc.status)
    for cls, status in (
        (ApplianceNotFound, falcon.HTTP_404),
        (ApplianceExists, falcon.HTTP_409),
        (ConfigurationInvalid, falcon.HTTP_400),
        (AuthFailure, falcon.HTTP_401),
        (EnrolmentDisabled, falcon.HTTP_403),
        (NoUnassignedConfiguration, falcon.HTTP_409),
        (UsageError, falcon.HTTP_400),
        (StoreError, falcon.HTTP_503),
    ):
        if isinstance(exc, cls):
            return status
    return None


def _error(
    resp: falcon.Response, req: falcon.Request, status: str, code: str, message: str, **extra: Any
) -> None:
    body = {"code": code, "message": redact_text(message), "request_id": request_id(req), **extra}
    resp.status = status
    resp.data = json.dumps({"error": body}).encode()
    resp.content_type = falcon.MEDIA_JSON


def handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: Any) -> None:
    log.error("request %s %s %s failed", request_id(req), req.method, req.path, exc_info=exc)
    _error(resp, req, falcon.HTTP_500, "InternalError", INTERNAL_MESSAGE)


def handle_imaging_error(req: falcon.Request, resp: falcon.Response, exc: ImagingError, params: Any) -> None:
    status = _status_for(exc)
    if status is None:
        handle_unexpected(req, resp, exc, params)
        return
    extra = {}
    if isinstance(exc, ConfigurationInvalid):
        extra["fields"] = [e.to_dict() for e in exc.errors]
    if isinstance(exc, AuthFailure):
        log.warning("refused %s %s: %s", req.method, req.path, exc.message)
    _error(resp, req, status, exc.code, exc.message, **extra)
