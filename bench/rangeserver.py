#!/usr/bin/env python3
"""A tiny threaded HTTP file server with byte ranges, run as its own process: an origin for
``bench/reader.py`` that does not cost what moto costs per ranged GET (moto loads the whole object
to answer each range) and does not share the benchmark's GIL (the in-process test server does).

``python bench/rangeserver.py FILE...`` serves each FILE at ``/<its name>`` on a free loopback port
and prints the port on stdout (also the origin of ``bench/import_e2e.py --api snapshot --origin
http``). GET and HEAD; ``Range: bytes=A-B`` (one range) answered 206 with ``Content-Range``; a strong
``ETag`` (size and mtime); ``If-Match`` (412 when it differs); the body is sent with ``sendfile`` from
the page cache. Stop it with SIGTERM.

``--tls CERT KEY`` (before the files) serves https with that certificate instead: the body is then
written through the TLS socket (``sendfile`` cannot encrypt), so the origin costs more CPU per byte;
an origin for measuring what TLS handshakes cost the reader (``bench/httpsreader.py``).
"""

from __future__ import annotations

import http.server
import os
import re
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        served = self.server.files.get(self.path.split("?", 1)[0].removeprefix("/"))
        if served is None:
            self._empty(404)
            return
        file, size, etag = served
        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match.strip('"') != etag:
            self._empty(412)
            return
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        m = _RANGE.match(wanted.strip()) if wanted else None
        if m is not None:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size or end < start:
                self._empty(416, {"Content-Range": f"bytes */{size}"})
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        self.wfile.flush()
        with open(file, "rb") as f:
            offset, left = start, end - start + 1
            if isinstance(self.connection, ssl.SSLSocket):
                f.seek(offset)
                while left > 0 and (piece := f.read(min(left, 1 << 20))):
                    self.wfile.write(piece)
                    left -= len(piece)
                return
            while left > 0:
                sent = os.sendfile(self.connection.fileno(), f.fileno(), offset, min(left, 8 << 20))
                if sent == 0:
                    break
                offset += sent
                left -= sent

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    #: name → (file, size, strong ETag)
    files: dict[str, tuple[Path, int, str]]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    server = _Server(("127.0.0.1", 0), _Handler)
    if args[:1] == ["--tls"]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args[1], args[2])
        server.socket = context.wrap_socket(server.socket, server_side=True)
        args = args[3:]
    server.files = {}
    for arg in args:
        file = Path(arg).resolve()
        st = file.stat()
        server.files[file.name] = (file, st.st_size, f"{st.st_size:x}-{st.st_mtime_ns:x}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
