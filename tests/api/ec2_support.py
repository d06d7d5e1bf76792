"""Helpers for the EC2 Query API tests: configuration, botocore-signed requests, botocore parsing,
and a real WSGI server on loopback for boto3 / AWS CLI clients."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import falcon
import falcon.testing
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.parsers import create_parser

from api.ec2 import model
from api.ec2.resource import Ec2Resource
from appliance import config as appliance_config
from appliance.config import Config
from appliance.service.imports import ImportService
from tests import stores
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY

HOST = "127.0.0.1:8773"
#: an object store the tests' configuration allows (nothing listens there: tasks are never run)
MANIFEST_BASE = "http://127.0.0.1:9"
FORM = "application/x-www-form-urlencoded; charset=utf-8"


def ec2_config(tmp_path: Path, **api: Any) -> Config:
    """A configuration with the test credentials and ``MANIFEST_BASE`` allowed as a source."""
    api_section = {"credentials": [{"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}], **api}
    return appliance_config.from_dict(
        stores.with_store(
            {
                "state_dir": str(tmp_path / "state"),
                "api": api_section,
                "sources": {"allowed_endpoints": [MANIFEST_BASE]},
            }
        ),
        base_dir=tmp_path,
    )


def ec2_app(config: Config, service: ImportService) -> falcon.App:
    """A Falcon app serving only the EC2 resource at ``/``."""
    app = falcon.App()
    app.add_route("/", Ec2Resource(config, service))
    return app


class FixedTimeSigV4(SigV4Auth):
    """botocore's SigV4 signer with a chosen signing time (for expiry tests)."""

    def __init__(self, credentials: Credentials, service: str, region: str, when: datetime) -> None:
        super().__init__(credentials, service, region)
        self._when = when

    def add_auth(self, request: AWSRequest) -> None:
        request.context["timestamp"] = self._when.strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        signature = self.signature(self.string_to_sign(request, canonical), request)
        self._inject_signature_to_request(request, signature)


@dataclass
class Prepared:
    """A signed request ready to send through falcon's test client."""

    method: str
    query_string: str
    headers: dict[str, str]
    body: bytes


def sign(
    params: Mapping[str, Any] | None = None,
    *,
    method: str = "POST",
    query: Mapping[str, Any] | None = None,
    access_key: str = TEST_ACCESS_KEY,
    secret_key: str = TEST_SECRET_KEY,
    region: str = REGION,
    service: str = "ec2",
    when: datetime | None = None,
    host: str = HOST,
    extra_headers: Mapping[str, str] | None = None,
) -> Prepared:
    """Sign with botocore's SigV4 (Authorization header): ``params`` go in the form body (POST) or
    the query string (GET), ``query`` always in the query string."""
    headers = {"Host": host, **(extra_headers or {})}
    body_params = dict(params or {}) if method == "POST" else {}
    query_params = dict(query or {}) | ({} if method == "POST" else dict(params or {}))
    request = AWSRequest(method=method, url=f"http://{host}/", headers=headers, data=body_params or None)
    if method == "POST":
        request.headers["Content-Type"] = FORM
    request.params = query_params
    signer = FixedTimeSigV4(Credentials(access_key, secret_key), service, region, when or datetime.now(UTC))
    signer.add_auth(request)
    prepared = request.prepare()
    body = prepared.body or b""
    if isinstance(body, str):
        body = body.encode()
    return Prepared(method, urlsplit(prepared.url).query, dict(prepared.headers.items()), body)


def send(app: falcon.App, req: Prepared) -> falcon.testing.Result:
    """Send ``req`` exactly as prepared (same query string bytes, headers and body)."""
    return falcon.testing.simulate_request(
        app,
        method=req.method,
        path="/",
        query_string=req.query_string or None,
        headers=req.headers,
        body=req.body,
    )


def parse(action: str, result: falcon.testing.Result) -> dict[str, Any]:
    """What a botocore client makes of the response (success or error)."""
    op = model.operation(action)
    parsed = create_parser("ec2").parse(
        {"body": result.content, "headers": dict(result.headers), "status_code": result.status_code},
        op.output_shape,
    )
    parsed.get("ResponseMetadata", {}).pop("HTTPHeaders", None)
    return parsed


def error_of(result: falcon.testing.Result) -> tuple[int, str, str]:
    """``(HTTP status, EC2 error code, message)`` of an error response, as botocore parses it."""
    parsed = create_parser("ec2").parse(
        {"body": result.content, "headers": dict(result.headers), "status_code": result.status_code}, None
    )
    return result.status_code, parsed["Error"]["Code"], parsed["Error"]["Message"]


def post_signed(endpoint: str, params: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """POST ``params`` to a real server at ``endpoint`` signed with botocore's SigV4 (boto3 refuses
    members its model lacks); the answer as botocore parses it (the action's output, or ``{"Error": …}``)."""
    req = sign({"Version": model.API_VERSION, **params}, host=urlsplit(endpoint).netloc)
    http = urllib.request.Request(endpoint + "/", data=req.body, headers=req.headers, method=req.method)
    try:
        with urllib.request.urlopen(http, timeout=30) as resp:
            status, headers, body = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, dict(exc.headers), exc.read()
    shape = model.operation(params["Action"]).output_shape if status == 200 else None
    parsed = create_parser("ec2").parse({"body": body, "headers": headers, "status_code": status}, shape)
    return status, parsed


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def wsgi_server(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yields the endpoint URL."""
    server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="ec2-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
