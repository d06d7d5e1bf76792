"""A minimal ``GET /v1/health`` for an appliance whose configuration is invalid.

When ``imaging configure`` fails, the real API must not start half-configured, yet load balancers,
cloud-init probes and admins still ask the usual health URL. This responder (stdlib only) answers
``503 {"status": "invalid-config", "errors": [{field, message}], ...}`` from the error file that
``imaging configure`` wrote, re-read on every request; anything else is a JSON 404.
"""

from __future__ import annotations

import json
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .userdata import DEFAULT_BIND


def error_document(error_file: Path) -> dict[str, Any]:
    """The health body: the error file's status and errors (or a plain "not configured")."""
    try:
        doc = json.loads(error_file.read_text())
    except FileNotFoundError:
        return {"status": "unconfigured", "errors": [], "reason": f"{error_file} does not exist"}
    except (OSError, ValueError) as exc:
        return {"status": "invalid-config", "errors": [], "reason": f"{error_file} is unreadable: {exc}"}
    return {
        "status": doc.get("status", "invalid-config"),
        "errors": doc.get("errors", []),
        "appliance_id": doc.get("appliance_id"),
    }


def bind_from(error_file: Path) -> str:
    """``api.bind`` recorded in the error file when the user data gave a well-formed one."""
    try:
        bind = json.loads(error_file.read_text()).get("bind")
    except (OSError, ValueError, AttributeError):
        return DEFAULT_BIND
    return bind if isinstance(bind, str) and bind else DEFAULT_BIND


def split_bind(bind: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to (host, port)."""
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], error_file: Path) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.error_file = error_file
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "imaging-health-responder"

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0].rstrip("/") == "/v1/health":
            self._send(503, error_document(self.server.error_file))
        else:
            self._send(
                404, {"error": "NotFound", "message": "this appliance is not configured; see /v1/health"}
            )

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would flood the journal


def make_server(bind: str, error_file: Path) -> ThreadingHTTPServer:
    """A bound (not yet serving) responder; call ``serve_forever()`` on it."""
    return _Server(split_bind(bind), error_file)


def serve(error_file: Path, bind: str | None = None) -> int:
    """Serve until killed (systemd stops it with SIGTERM once the config is fixed)."""
    server = make_server(bind or bind_from(error_file), error_file)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
