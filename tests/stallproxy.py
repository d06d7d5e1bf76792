"""An HTTP proxy on loopback in front of a real server (the moto S3 server) that can hold downloads.

Every request is forwarded as it came (method, path, headers, body: SigV4 signatures stay valid, as
the Host header is passed on) and the answer streamed back. While the proxy is *armed*, the body of
each GET whose path ends with one of the armed suffixes stops after ``after`` bytes: the request is
counted in :attr:`StallingProxy.stalled` (and per suffix by :meth:`StallingProxy.stalled_on`) and
waits until :meth:`StallingProxy.release` releases its suffix (then the rest follows) or until the
proxy closes. A test can so kill or suspend a task in the middle of a download, deterministically,
without timing anything; several downloads can be held and released one by one. Requests can be
held too, before they reach the server (:meth:`StallingProxy.arm_request`: an upload's part), or
refused with an S3 error in the server's stead (:meth:`StallingProxy.refuse`: a store that cannot do
an operation).

``after`` is an offset in the object, so a download read as parallel ranged GETs is held at the same
byte as one read as a single stream: a GET of ``Range: bytes=A-B`` is held after ``after - A`` body
bytes when its range holds byte ``after`` (``A <= after <= B``), and goes through whole otherwise:
ranges before the hold complete, ranges after it are not held (the reader waits for the held one
before it hands anything past it over). A GET without a Range starts at 0.

``arm(..., times=N)`` holds only the first N GETs that reach the offset: a retry of the held range goes
through, and the held one stays held until it is released or its client gives up on it (a stall
watchdog: :meth:`StallingProxy.abandoned` counts those).

``rate`` (bytes per second, per connection) paces every answer's body, like an object store that
limits each connection (for benchmarks; tests leave it unset).
"""

from __future__ import annotations

import http.client
import http.server
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}
_PIECE = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (readable, and at its end)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def do_PUT(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def do_DELETE(self) -> None:
        self._forward()

    def _forward(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        refusal = owner.refusal(self.command, self.headers.keys())
        if refusal is not None:  # answered here, as a store that cannot do this answers
            status, code = refusal
            error = f"<Error><Code>{code}</Code><Message>refused by the test</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        held = owner.request_hold(self.command, self.path)
        if held is not None:  # an armed request (an upload's part): held before it reaches the server
            try:
                owner.hold(held)
            except OSError:
                self.close_connection = True
                return
        upstream = http.client.HTTPConnection(owner.upstream.hostname, owner.upstream.port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            self.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    self.send_header(k, v)
            if answer.getheader("Content-Length") is None and self.command != "HEAD":
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command == "HEAD":
                return
            armed = owner.hold_at(self.command, self.path, self.headers.get("Range"))
            hold_at = armed[1] if armed is not None else None
            sent, began = 0, time.monotonic()
            while piece := answer.read(_PIECE if hold_at is None else min(_PIECE, max(hold_at - sent, 1))):
                self.wfile.write(piece)
                sent += len(piece)
                owner.count(self.path, len(piece))
                if owner.rate:
                    ahead = began + sent / owner.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                if armed is not None and hold_at is not None and sent >= hold_at:
                    self.wfile.flush()
                    owner.hold(armed[0], self.connection)
                    hold_at = None
        except (OSError, http.client.HTTPException):
            self.close_connection = True  # the client went away (killed, or gave up), or the server did
        finally:
            upstream.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: StallingProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that went away between requests (killed, or shut its socket down)
        super().handle_error(request, client_address)


class StallingProxy:
    """The proxy (see the module docstring); use it as a context manager."""

    __test__ = False

    def __init__(self, upstream: str, rate: float | None = None) -> None:
        self.upstream = urlsplit(upstream)
        #: bytes per second per connection, or None (as fast as it goes)
        self.rate = rate
        self._lock = threading.Condition()
        self._armed: dict[str, int] = {}
        #: key → (method, query part, path suffix) of the requests held before forwarding
        #: (:meth:`arm_request`)
        self._armed_requests: dict[str, tuple[str, str, str]] = {}
        #: path suffix → method of the requests held before forwarding (:meth:`arm_object_request`)
        self._armed_paths: dict[str, str] = {}
        #: (method, header) → (status, S3 error code) of the requests refused (:meth:`refuse`)
        self._refused: dict[tuple[str, str], tuple[int, str]] = {}
        #: how many requests were refused
        self.refused = 0
        #: per armed suffix: set when it is released
        self._released: dict[str, threading.Event] = {}
        self._stalled: dict[str, int] = {}
        #: per armed suffix: how many GETs it may still hold (absent: every one)
        self._holds_left: dict[str, int] = {}
        self._abandoned: dict[str, int] = {}
        self._closing = threading.Event()
        #: GETs that stopped and wait for :meth:`release`
        self.stalled = 0
        #: body bytes sent to clients (GET answers), in total and by path (without the query)
        self.served = 0
        self.served_by_path: dict[str, int] = {}
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, path_suffix: str, after: int, times: int | None = None) -> None:
        """Hold every GET of a path ending with ``path_suffix`` after ``after`` body bytes (only the
        first ``times`` of them, when given)."""
        with self._lock:
            self._released[path_suffix] = threading.Event()
            self._armed[path_suffix] = after
            if times is not None:
                self._holds_left[path_suffix] = times
            else:
                self._holds_left.pop(path_suffix, None)

    def abandoned(self, path_suffix: str) -> int:
        """How many held GETs of ``path_suffix`` their client closed while they were held."""
        with self._lock:
            return self._abandoned.get(path_suffix, 0)

    def arm_request(self, method: str, query_part: str, path_suffix: str = "") -> str:
        """Hold every ``method`` request whose query string contains ``query_part`` (e.g. ``PUT`` and
        ``partNumber=2``: an upload's second part) before it is forwarded, until :meth:`release` of the
        key returned: ``query_part``, or with ``path_suffix`` (only the requests of a path ending with
        it: one object's upload among others) ``path_suffix?query_part``."""
        key = f"{path_suffix}?{query_part}" if path_suffix else query_part
        with self._lock:
            self._released[key] = threading.Event()
            self._armed_requests[key] = (method, query_part, path_suffix)
        return key

    def arm_object_request(self, method: str, path_suffix: str) -> None:
        """Hold every ``method`` request of a path ending with ``path_suffix`` (e.g. ``PUT`` of a
        bundle's manifest) before it is forwarded, until :meth:`release` of ``path_suffix``."""
        with self._lock:
            self._released[path_suffix] = threading.Event()
            self._armed_paths[path_suffix] = method

    def refuse(self, method: str, header: str, status: int, code: str) -> None:
        """Answer every ``method`` request that carries ``header`` (e.g. ``PUT`` with
        ``x-amz-copy-source``: an ``UploadPartCopy``) with S3's error ``code`` and ``status``, without
        forwarding it."""
        with self._lock:
            self._refused[(method, header.lower())] = (status, code)

    def refusal(self, method: str, headers: Iterable[str]) -> tuple[int, str] | None:
        """(status, code) when this request is refused (counted in :attr:`refused`), else None."""
        with self._lock:
            for header in headers:
                refused = self._refused.get((method, header.lower()))
                if refused is not None:
                    self.refused += 1
                    return refused
            return None

    def request_hold(self, method: str, path: str) -> str | None:
        """The armed ``query_part`` (or path suffix) that holds this request, or None."""
        with self._lock:
            plain, _, query = path.partition("?")
            by_query = (
                key
                for key, (m, part, sfx) in self._armed_requests.items()
                if m == method and part in query.split("&") and plain.endswith(sfx)
            )
            by_path = (sfx for sfx, m in self._armed_paths.items() if m == method and plain.endswith(sfx))
            return next(by_query, None) or next(by_path, None)

    def release(self, path_suffix: str | None = None) -> None:
        """Disarm ``path_suffix`` (default: every suffix), and let the GETs it holds finish."""
        with self._lock:
            every = list(self._armed) + list(self._armed_requests) + list(self._armed_paths)
            for suffix in [path_suffix] if path_suffix is not None else every:
                self._armed.pop(suffix, None)
                self._armed_requests.pop(suffix, None)
                self._armed_paths.pop(suffix, None)
                if suffix in self._released:
                    self._released[suffix].set()

    def stalled_on(self, path_suffix: str) -> int:
        """How many GETs ``path_suffix`` held so far."""
        with self._lock:
            return self._stalled.get(path_suffix, 0)

    def count(self, path: str, n: int) -> None:
        with self._lock:
            self.served += n
            plain = path.split("?", 1)[0]
            self.served_by_path[plain] = self.served_by_path.get(plain, 0) + n

    def hold_at(self, method: str, path: str, range_header: str | None = None) -> tuple[str, int] | None:
        """(armed suffix, body bytes after which to hold) for a request, or None (see the module
        docstring: ``after`` is an object offset, placed in the request's range)."""
        with self._lock:
            if method != "GET":
                return None
            plain = path.split("?", 1)[0]
            armed = next(((sfx, after) for sfx, after in self._armed.items() if plain.endswith(sfx)), None)
        if armed is None:
            return None
        m = _RANGE.match(range_header.strip()) if range_header else None
        if m is None:
            return self._claim(*armed)
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else None
        suffix, after = armed
        if after < first or (last is not None and after > last):
            return None
        return self._claim(suffix, after - first)

    def _claim(self, suffix: str, at: int) -> tuple[str, int] | None:
        """The hold ``(suffix, at)`` when the suffix may hold one more GET (``arm``'s ``times``)."""
        with self._lock:
            left = self._holds_left.get(suffix)
            if left is None:
                return suffix, at
            if left <= 0:
                return None
            self._holds_left[suffix] = left - 1
            return suffix, at

    def hold(self, path_suffix: str, client: socket.socket | None = None) -> None:
        """Hold until :meth:`release`, the proxy's close, or (``client`` given) the client's close of
        its connection (counted by :meth:`abandoned`; OSError then, as for the close)."""
        with self._lock:
            self.stalled += 1
            self._stalled[path_suffix] = self._stalled.get(path_suffix, 0) + 1
            released = self._released[path_suffix]
            self._lock.notify_all()
        while not (released.wait(0.05) or self._closing.is_set()):
            if client is not None and _closed_by_peer(client):
                with self._lock:
                    self._abandoned[path_suffix] = self._abandoned.get(path_suffix, 0) + 1
                    self._lock.notify_all()
                raise OSError("the client gave up on the held answer")
        if self._closing.is_set() and not released.is_set():
            raise OSError("the proxy is closing")

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> StallingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
