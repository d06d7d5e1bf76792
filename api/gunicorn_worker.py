"""gunicorn's sync worker, answering the errors gunicorn raises itself as EC2 XML error documents.

gunicorn refuses some requests before the application sees them: a request line longer than
``limit_request_line`` (414), more header fields than ``limit_request_fields`` or one longer than
``limit_request_field_size`` (431), a malformed request line, header or chunked body (400), an
unsupported ``Transfer-Encoding`` (501), an ``Expect`` it does not support (417). It answers those
with an HTML page, which an EC2 client (botocore) cannot parse. :class:`Ec2ErrorWorker` keeps
gunicorn's own decision (status, reason, warning and access log lines) and replaces only the body:
an EC2 ``<Response><Errors>`` document with a code and a message that says what to change.

No route has been chosen at that point, so the admin API's clients get the same XML document for
these few errors; the OpenAPI document says so. What gunicorn does not let a worker answer is
described in README.md (a worker killed after ``api.timeout`` closes the connection without an
answer; a TLS handshake that fails has no HTTP at all).
"""

from __future__ import annotations

import re
import socket
import uuid
from http import HTTPStatus
from typing import Any

from gunicorn import util
from gunicorn.config import Config as GunicornConfig
from gunicorn.workers.sync import SyncWorker

from .ec2.errors import INTERNAL_ERROR_MESSAGE, Ec2Error, render_error

CONTENT_TYPE = "text/xml;charset=UTF-8"
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")


class _Capture:
    """Stands in for the client socket while gunicorn writes its HTML error page (kept, not sent)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data

    def send(self, data: bytes) -> int:
        self.data += data
        return len(data)


def protocol_error(status: int, cfg: GunicornConfig) -> Ec2Error:
    """The EC2 error for a request gunicorn refused with HTTP ``status``."""
    if status == 414:
        return Ec2Error(
            "RequestURITooLong",
            f"The request line is longer than {cfg.limit_request_line} bytes; send the parameters in "
            "the form-encoded body of a POST instead of the query string",
            414,
        )
    if status == 431:
        return Ec2Error(
            "RequestHeaderFieldsTooLarge",
            f"The request has more than {cfg.limit_request_fields} header fields, or a header field "
            f"longer than {cfg.limit_request_field_size} bytes",
            431,
        )
    if status == 400:
        return Ec2Error(
            "MalformedHTTPRequest",
            "The HTTP request is malformed (its request line, a header or its chunked body); "
            "it was not processed",
            400,
        )
    if status == 417:
        return Ec2Error(
            "ExpectationFailed", "The Expect header of the request is not supported; send it without", 417
        )
    if status == 501:
        return Ec2Error(
            "NotImplemented",
            "The Transfer-Encoding of the request is not supported; send the body with a Content-Length",
            501,
        )
    if status == 403:
        return Ec2Error("AccessDenied", "The connection was refused before the request was read", 403)
    return Ec2Error("InternalError", INTERNAL_ERROR_MESSAGE, 500)


def error_response(error: Ec2Error, request_id: str) -> bytes:
    """A complete HTTP/1.1 response carrying ``error`` as EC2 XML (the connection then closes)."""
    body = render_error(error, request_id)
    head = (
        f"HTTP/1.1 {error.status} {_reason(error.status)}\r\n"
        "Connection: close\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amzn-RequestId: {request_id}\r\n"
        f"X-Request-Id: {request_id}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Ec2ErrorWorker(SyncWorker):
    """gunicorn's ``sync`` worker whose own error answers are EC2 XML instead of HTML."""

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        captured = _Capture()
        # gunicorn classifies the error, logs it and writes its access line; its page is discarded
        # the capture stands in for the socket: gunicorn only sends the page through it
        super().handle_error(req, captured, addr, exc)  # type: ignore[arg-type]
        match = _STATUS_LINE.match(bytes(captured.data))
        status = int(match.group(1)) if match else 500
        response = error_response(protocol_error(status, self.cfg), str(uuid.uuid4()))
        try:
            util.write_nonblock(client, response)
        except Exception:
            self.log.debug("Failed to send error message.")
