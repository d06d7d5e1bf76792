"""A real HTTP(S) server on loopback for source tests: static bodies with Range/If-Range and ETags,
redirects, and scripted misbehaviour (dropped connections, 5xx, short and corrupt bodies, stalls).

Also :class:`NetworkRecorder`, which records every ``socket.connect`` / ``socket.getaddrinfo`` this
process makes (a PEP 578 audit hook), so a test can assert an address was never connected to.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import re
import socket
import ssl
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Route:
    """What one path answers. ``script`` holds per-request behaviours, consumed in order; when it is
    empty the route behaves normally (``"ok"``).

    Behaviours: ``ok``; ``reset`` (close without answering); ``500`` / ``503`` / ``404`` … (that status,
    small body); ``short:N`` (full Content-Length, only N body bytes, then close); ``corrupt`` (same
    length and ETag, first byte flipped); ``stall:N`` (N body bytes, then hang until the server stops);
    ``content-range:VALUE`` (the answer as usual, its Content-Range header replaced by VALUE: a lying
    origin); ``pad:N`` (N bytes more than the range or object, counted in Content-Length).
    ``If-Match`` with another ETag is answered 412; ``honour_range`` False ignores ``Range`` and sends no
    ``Accept-Ranges``.
    """

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    #: ETag sent (quoted); default: MD5 of the body, like S3 for a single-part upload; "": none
    etag: str | None = None
    location: str | None = None
    honour_range: bool = True
    #: False: no Content-Length, the body ends when the connection closes
    send_length: bool = True
    script: deque[str] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.etag is None:
            self.etag = hashlib.md5(self.body).hexdigest()


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def setup(self) -> None:
        super().setup()
        self.served = 0  # requests answered on this connection
        self.server.owner.count_connection()

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        owner.requests.append(Recorded(self.command, self.path, dict(self.headers.items())))
        if owner.keepalive_requests is not None and self.served >= owner.keepalive_requests:
            # a server's keep-alive limit reached just as the client sends on the idle connection:
            # it closes without answering (what the client's check for a dropped connection cannot see)
            self.close_connection = True
            owner.count_connection(unanswered=True)
            return
        self.served += 1
        route = owner.routes.get(path)
        if route is None:
            self._simple(404, b"no such route")
            return
        behaviour = route.script.popleft() if route.script else "ok"
        if behaviour == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if behaviour.isdigit():
            self._simple(int(behaviour), f"scripted {behaviour}".encode())
            return
        if route.location is not None:
            self.send_response(route.status)
            self.send_header("Location", route.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match.strip('"') != route.etag:
            self._simple(412, b"precondition failed")
            return
        body, status, extra = route.body, route.status, {}
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted and route.honour_range and (if_range is None or if_range.strip('"') == route.etag):
            m = _RANGE.match(wanted)
            if m is None or int(m.group(1)) >= len(route.body):
                self._simple(416, b"bad range", {"Content-Range": f"bytes */{len(route.body)}"})
                return
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(route.body) - 1, len(route.body) - 1)
            body, status = route.body[start : end + 1], 206
            extra["Content-Range"] = f"bytes {start}-{end}/{len(route.body)}"
        if behaviour == "corrupt" and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if behaviour.startswith("content-range:"):
            extra["Content-Range"] = behaviour.split(":", 1)[1]
        if behaviour.startswith("pad:"):
            body = body + bytes(int(behaviour.split(":", 1)[1]))
        self.send_response(status)
        for k, v in {**route.headers, **extra}.items():
            self.send_header(k, v)
        if route.etag:
            self.send_header("ETag", f'"{route.etag}"')
        if route.send_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        if route.honour_range:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not with_body:
            return
        owner.count_sent(len(body) if not behaviour.startswith(("short:", "stall:")) else 0)
        if behaviour.startswith(("short:", "stall:")):
            n = int(behaviour.split(":", 1)[1])
            owner.count_sent(len(body[:n]))
            self.wfile.write(body[:n])
            self.wfile.flush()
            if behaviour.startswith("stall:"):
                owner.stopping.wait()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _simple(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: TestHTTPServer


class TestHTTPServer:
    """``http.server`` in a thread on a free loopback port (https when ``tls`` is an SSLContext)."""

    __test__ = False  # not a pytest test class

    def __init__(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Recorded] = []
        #: body bytes sent so far (all routes)
        self.sent = 0
        #: connections accepted so far (for https: TLS handshakes completed)
        self.connections = 0
        #: requests answered per connection; the next one on it is closed unanswered (None: no limit)
        self.keepalive_requests: int | None = None
        #: connections closed at a request past ``keepalive_requests``
        self.closed_unanswered = 0
        self._sent_lock = threading.Lock()
        self.stopping = threading.Event()
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        self.host = host
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    def add(self, path: str, body: bytes = b"", **kwargs: Any) -> Route:
        route = Route(body=body, **kwargs)
        self.routes[path] = route
        return route

    def redirect(self, path: str, location: str, status: int = 302) -> Route:
        return self.add(path, status=status, location=location)

    def count_sent(self, n: int) -> None:
        with self._sent_lock:
            self.sent += n

    def count_connection(self, *, unanswered: bool = False) -> None:
        """One more connection accepted, or (``unanswered``) one closed at a request it did not answer."""
        with self._sent_lock:
            if unanswered:
                self.closed_unanswered += 1
            else:
                self.connections += 1

    def hits(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> TestHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetworkRecorder:
    """Records ``("connect", address)`` and ``("getaddrinfo", host)`` events while active."""

    _installed = False
    _active: list[list[tuple[str, Any]]] = []

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    @classmethod
    def _hook(cls, event: str, args: tuple[Any, ...]) -> None:
        if not cls._active:
            return
        if event == "socket.connect":
            item = ("connect", args[1])
        elif event == "socket.getaddrinfo":
            item = ("getaddrinfo", args[0])
        else:
            return
        for sink in cls._active:
            sink.append(item)

    def __enter__(self) -> NetworkRecorder:
        if not NetworkRecorder._installed:
            sys.addaudithook(NetworkRecorder._hook)  # audit hooks cannot be removed; it idles when inactive
            NetworkRecorder._installed = True
        NetworkRecorder._active.append(self.events)
        return self

    def __exit__(self, *exc: object) -> None:
        NetworkRecorder._active.remove(self.events)

    def connected_hosts(self) -> list[str]:
        return [str(addr[0]) for kind, addr in self.events if kind == "connect" and isinstance(addr, tuple)]

    def resolved_names(self) -> list[str]:
        return [str(host) for kind, host in self.events if kind == "getaddrinfo"]


def self_signed_cert(directory: Path, names: list[str]) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) valid for DNS ``names``; returns (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def tls_server_context(cert: Path, key: Path, sni_seen: list[str]) -> ssl.SSLContext:
    """Server-side TLS context that records the SNI name of each handshake in ``sni_seen``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def remember(sock: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        sni_seen.append(name or "")

    ctx.sni_callback = remember  # type: ignore[assignment]
    return ctx
