"""``/v1/uploads/{id}``: staged uploads (Glance's glance-direct), HTTP only.

``PUT`` sends bytes (the whole disk, or a ``Content-Range`` of it; ``Content-Length`` or chunked),
``GET`` says what was received (JSON), ``DELETE`` removes the upload. Every rule (ranges, ownership,
size cap, expiry) is :mod:`appliance.sources.staged`'s; this module authenticates, reads the headers
and streams the body there.

Authentication: SigV4 like the EC2 API (:class:`~api.ec2.auth.StreamedPayloadAuthenticator`: the
signature covers ``x-amz-content-sha256``, and the body is checked against it as it arrives), or HTTP
Basic with an ``api.credentials`` key and its secret (as the admin API). Either way the request acts
for the key's account (a front end's signed ``X-Imaging-Account`` too), and an upload is only ever
seen by its account: another account's id is an upload of the caller's that does not exist. The
route is refused with ``ImportMethodDisabled`` (403) unless ``upload`` is in ``sources.methods``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import falcon

from appliance.config import Config
from appliance.errors import ImagingError
from appliance.redact import redact_text
from appliance.service.importtasks import Caller
from appliance.service.uploads import UsesUploads
from appliance.sources.methods import UPLOAD, ImportMethodDisabled, check_enabled
from appliance.sources.staged import UploadArea
from appliance.sources.stagedproto import UploadError, check_id, parse_content_range
from appliance.store import Store

from .ec2.auth import ALGORITHM, SignedRequest, StreamedPayloadAuthenticator, decode_query, payload_sha256
from .ec2.errors import Ec2Error

log = logging.getLogger(__name__)

#: HTTP status of the errors this resource answers, by code (UploadError carries its own)
_STATUS = {
    "AuthFailure": 401,
    "MissingAuthenticationToken": 401,
    "SignatureDoesNotMatch": 403,
    "ImportMethodDisabled": 403,
    "StateStoreUnavailable": 503,
    "StateStoreError": 503,
}


def _json_error(req: falcon.Request, resp: falcon.Response, status: int, code: str, message: str) -> None:
    rid = getattr(req.context, "request_id", None) or "-"
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = json.dumps(
        {"error": {"code": code, "message": redact_text(message), "request_id": rid}}
    ).encode()


class UploadResource:
    """``PUT/GET/DELETE /v1/uploads/{upload_id}`` (module docstring)."""

    #: authenticates itself (Basic or SigV4), and takes SigV4's presigned query parameters
    auth_required = False
    checks_own_query = True

    def __init__(
        self,
        config: Config,
        stores: Callable[[], Store],
        basic: Callable[[str | None], str | None],
    ) -> None:
        self._config = config
        self._stores = stores
        self._basic = basic
        self._sigv4 = StreamedPayloadAuthenticator(config.api)

    # -- authentication ---------------------------------------------------------------------------

    def _caller(self, req: falcon.Request) -> tuple[Caller, str | None]:
        """Who the request acts for, and the body's signed SHA-256 (None: not signed)."""
        header = req.get_header("Authorization") or ""
        presigned = any(name == "X-Amz-Algorithm" for name, _ in decode_query(req.query_string))
        if not (header.startswith(ALGORITHM) or presigned):
            key = self._basic(header or None)
            if key is None:
                raise Ec2Error(
                    "AuthFailure",
                    "sign the request with Signature Version 4 (as the EC2 API), or send HTTP Basic "
                    "authentication with an access key and its secret from api.credentials",
                    401,
                )
            req.context.principal = key
            return Caller.of(self._config.api.principals[key]), None
        identity = self._sigv4.authenticate(
            SignedRequest(
                method=req.method,
                path=(req.root_path or "") + req.path,
                query_string=req.query_string,
                headers=req.headers_lower,
                body=b"",
                params={name: [value] for name, value in decode_query(req.query_string)},
            )
        )
        req.context.principal = identity.access_key
        return identity.caller, payload_sha256(req.headers_lower)

    def _serve(
        self, req: falcon.Request, resp: falcon.Response, work: Callable[[Caller, str | None], Any]
    ) -> None:
        try:
            caller, signed = self._caller(req)
            for name in req.params:  # none but a presigned request's own
                if not name.startswith("X-Amz-"):
                    raise Ec2Error(
                        "UnknownParameter",
                        f"unknown query parameter {name[:64]!r}; {req.method} /v1/uploads/{{upload_id}} "
                        "takes no query parameters",
                        400,
                    )
            check_enabled(self._config.sources, UPLOAD, f"{req.method} /v1/uploads")
            work(caller, signed)
        except Ec2Error as exc:
            if exc.status == 401:
                resp.set_header("WWW-Authenticate", 'Basic realm="imaging-admin", charset="UTF-8"')
            _json_error(req, resp, exc.status, exc.code, exc.message)
        except UploadError as exc:
            _json_error(req, resp, exc.status, exc.code, exc.message)
        except ImportMethodDisabled as exc:
            _json_error(req, resp, 403, exc.code, exc.message)
        except ImagingError as exc:
            status = _STATUS.get(exc.code)
            if status is None:
                raise
            _json_error(req, resp, status, exc.code, exc.message)

    @property
    def _area(self) -> UploadArea:
        return UploadArea.from_sources(self._config.sources)

    # -- the methods --------------------------------------------------------------------------------

    def on_put(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        def work(caller: Caller, signed: str | None) -> None:
            check_id(upload_id)
            rng = parse_content_range(req.get_header("Content-Range"), req.content_length)
            stream = req.bounded_stream if req.content_length is not None else req.stream

            def read(n: int) -> bytes:
                try:
                    return stream.read(n)
                except OSError as exc:  # the client went away (gunicorn: NoMoreData, a reset)
                    raise UploadError(
                        "Upload.IncompleteBody", "the connection broke before the body ended", 400
                    ) from exc

            info, created = self._area.put(caller.account, upload_id, rng, read, payload_sha256=signed)
            resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
            resp.media = info.view()

        self._serve(req, resp, work)

    def on_get(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        def work(caller: Caller, signed: str | None) -> None:
            resp.media = self._area.get(caller.account, check_id(upload_id)).view()

        self._serve(req, resp, work)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        def work(caller: Caller, signed: str | None) -> None:
            self._area.delete(caller.account, check_id(upload_id), UsesUploads(self._stores()))
            resp.status = falcon.HTTP_204

        self._serve(req, resp, work)
