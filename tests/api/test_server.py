"""The embedded gunicorn server as a real process on loopback: HTTP, TLS policy, health, graceful stop."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.parsers import create_parser
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gunicorn.config import Config as GunicornConfig

from api import server
from api.gunicorn_worker import Ec2ErrorWorker
from appliance import config as config_mod
from appliance.errors import ConfigError
from tests.processes import stop_process, wait_until
from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port

#: gunicorn's HTTP and TLS handling: the same store calls on either backend
pytestmark = pytest.mark.backends("sqlite")


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


@contextmanager
def gunicorn(
    tmp_path: Path, api: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> Iterator[Running]:
    """``python -m api.server --config FILE`` on a free loopback port; stopped by PID afterwards."""
    port = free_port()
    data = {
        "state_dir": str(tmp_path / "state"),
        "api": {
            "bind": f"127.0.0.1:{port}",
            "workers": 2,
            "credentials": [{"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}],
            **(api or {}),
        },
    }
    conf = tmp_path / "imaging.yaml"
    conf.write_text(yaml.safe_dump(data))
    stderr = tmp_path / f"server-{port}.err"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.server", "--config", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env if env is not None else dict(os.environ),
            cwd=Path(__file__).resolve().parents[2],
        )
    running = Running(proc, port, stderr)
    try:
        _wait_listening(port, proc)
        yield running
    finally:
        stop_process(proc, grace=30)


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], Any]:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def _wait_for_workers(proc: subprocess.Popen[bytes], count: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _children(proc.pid)
        if len(kids) >= count:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"{count} workers did not start; children: {_children(proc.pid)}")


# -- plain HTTP ----------------------------------------------------------------------------------


def test_serves_health_over_http_and_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    with gunicorn(tmp_path) as srv:
        workers = _wait_for_workers(srv.proc, 2)
        status, headers, body = _get(f"http://127.0.0.1:{srv.port}/v1/health")
        assert status == 200
        assert body["checks"]["store"]["status"] == "ok"
        assert body["checks"]["qemu_img"]["status"] == "ok"
        assert body["status"] in ("ok", "degraded")
        request_id = headers["x-request-id"]
        # the admin API still needs credentials behind gunicorn
        status, _, error = _get(f"http://127.0.0.1:{srv.port}/v1/tasks")
        assert status == 401 and error["error"]["code"] == "AuthFailure"

        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 0
        wait_until(
            lambda: not any(_alive(w) for w in workers), what="gunicorn's workers gone with the arbiter"
        )
        log = srv.log()
    # one access line per request, on stderr, with the request id the client saw
    assert '"GET /v1/health" 200' in log
    assert f"request_id={request_id}" in log
    assert "Control socket" not in log


def test_health_is_disabled_when_qemu_img_is_absent_from_path(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PATH"} | {"PATH": str(empty)}
    with gunicorn(tmp_path, env=env) as srv:
        status, _, body = _get(f"http://127.0.0.1:{srv.port}/v1/health")
    assert status == 503
    assert body["status"] == "disabled"
    assert "qemu-img" in body["reason"]
    assert body["checks"]["qemu_img"]["status"] == "failed"


# -- TLS -----------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost/127.0.0.1 and its key, PEM files in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imaging-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def tls11_client() -> ssl.SSLContext:
    """A client that can only speak TLS 1.1 (security level 0, so OpenSSL 3 really offers it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version() or ""


def test_tls11_client_works_against_a_permissive_server(tmp_path: Path) -> None:
    """Control for the refusal test: this machine's OpenSSL can negotiate TLS 1.1 at all."""
    cert, key = self_signed(tmp_path)
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(cert, key)
    srv_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        srv_ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept_one() -> None:
            conn, _ = listener.accept()
            try:
                srv_ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

        thread = threading.Thread(target=accept_one)
        thread.start()
        assert _handshake(port, tls11_client()) == "TLSv1.1"
        thread.join(timeout=10)


def test_tls_serves_tls12_and_refuses_a_tls11_only_client(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with gunicorn(tmp_path, api={"tls": {"cert": str(cert), "key": str(key)}}) as srv:
        verified = ssl.create_default_context(cafile=str(cert))
        status, headers, body = _get(f"https://127.0.0.1:{srv.port}/v1/health", context=verified)
        assert status == 200
        assert body["checks"]["store"]["status"] == "ok"
        assert headers["x-request-id"]

        tls12 = ssl.create_default_context(cafile=str(cert))
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert _handshake(srv.port, tls12) == "TLSv1.2"

        with pytest.raises(ssl.SSLError) as refused:
            _handshake(srv.port, tls11_client())
        # the server said "protocol version" (not a client-side "no protocols available")
        assert "PROTOCOL_VERSION" in str(refused.value)

        with pytest.raises(OSError):  # plain HTTP on the TLS port gets no HTTP answer
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/v1/health", timeout=5)


def test_ssl_context_hook_raises_a_permissive_floor_to_tls12(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)

    def permissive() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        return ctx

    conf = GunicornConfig()
    conf.set("certfile", str(cert))
    conf.set("keyfile", str(key))
    ctx = server.ssl_context(conf, permissive)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    # built once per worker process: the sync worker asks on every connection
    assert server.ssl_context(conf, permissive) is ctx


def test_harden_keeps_a_stricter_floor() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    assert server.harden(ctx).minimum_version == ssl.TLSVersion.TLSv1_3


# -- configuration -------------------------------------------------------------------------------


def test_gunicorn_options_follow_the_configuration(tmp_path: Path) -> None:
    cfg = config_mod.from_dict(
        {
            "state_dir": str(tmp_path),
            "log_level": "warning",
            "api": {
                "bind": "[::1]:9443",
                "workers": 3,
                "timeout": 20,
                "tls": {"cert": "c.pem", "key": "k.pem"},
            },
        },
        base_dir=tmp_path,
    )
    options = server.gunicorn_options(cfg)
    assert options["bind"] == ["[::1]:9443"]
    assert options["workers"] == 3
    assert options["timeout"] == 20
    assert options["graceful_timeout"] == 20
    assert options["preload_app"] is False
    assert options["loglevel"] == "warning"
    assert options["certfile"] == str(tmp_path / "c.pem")
    assert options["keyfile"] == str(tmp_path / "k.pem")
    # the options are all real gunicorn settings and pass its validators
    app = server.ApplianceServer(cfg, options)
    assert app.cfg.workers == 3
    assert app.cfg.worker_class is Ec2ErrorWorker
    assert (app.cfg.limit_request_line, app.cfg.limit_request_fields, app.cfg.limit_request_field_size) == (
        8190,
        64,
        8190,
    )
    assert app.cfg.is_ssl
    assert app.cfg.ssl_context is server.ssl_context


def test_serve_refuses_a_missing_tls_certificate_before_starting(tmp_path: Path) -> None:
    cfg = config_mod.from_dict(
        {"state_dir": str(tmp_path), "api": {"tls": {"cert": "missing.pem", "key": "missing.key"}}},
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        server.serve(cfg)


def test_boto3_reaches_the_ec2_api_mounted_at_root(tmp_path: Path) -> None:
    import boto3

    with gunicorn(tmp_path) as srv:
        ec2 = boto3.client(
            "ec2",
            endpoint_url=f"http://127.0.0.1:{srv.port}",
            region_name="us-east-1",
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
        )
        assert ec2.describe_conversion_tasks()["ConversionTasks"] == []
        # the admin API on the same port still answers JSON
        status, _, body = _get(f"http://127.0.0.1:{srv.port}/")
        assert status == 200 and body["versions"][0]["id"] == "v1"


# -- gunicorn's own errors are EC2 XML (issue 10, item 11) -----------------------------------------


def _raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` bytes as they are; the status, headers (lower case) and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def _ec2_error(status: int, headers: dict[str, str], body: bytes) -> tuple[str, str]:
    parsed = create_parser("ec2").parse({"body": body, "headers": headers, "status_code": status}, None)
    return parsed["Error"]["Code"], parsed["Error"]["Message"]


@pytest.mark.parametrize(
    ("request_bytes", "status", "code", "says"),
    [
        (
            b"GET /?Action=DescribeConversionTasks&Description=" + b"x" * 9000 + b" HTTP/1.1\r\n"
            b"Host: appliance\r\n\r\n",
            414,
            "RequestURITooLong",
            "8190 bytes",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: appliance\r\n"
            + b"".join(b"X-Extra-%d: 1\r\n" % i for i in range(70))
            + b"Content-Length: 0\r\n\r\n",
            431,
            "RequestHeaderFieldsTooLarge",
            "64 header fields",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: appliance\r\nX-Big: " + b"y" * 9000 + b"\r\nContent-Length: 0\r\n\r\n",
            431,
            "RequestHeaderFieldsTooLarge",
            "8190 bytes",
        ),
        (b"NOT AN HTTP REQUEST\r\n\r\n", 400, "MalformedHTTPRequest", "malformed"),
    ],
    ids=["request-line", "header-count", "header-size", "malformed"],
)
def test_requests_gunicorn_refuses_get_an_ec2_xml_error(
    tmp_path: Path, request_bytes: bytes, status: int, code: str, says: str
) -> None:
    with gunicorn(tmp_path) as srv:
        got, headers, body = _raw_exchange(srv.port, request_bytes)
        # the server goes on serving
        assert _get(f"http://127.0.0.1:{srv.port}/v1/health")[0] == 200
    assert got == status
    assert headers["content-type"].startswith("text/xml") and b"<html" not in body
    error_code, message = _ec2_error(got, headers, body)
    assert error_code == code and says in message
    assert headers["x-amzn-requestid"] in body.decode()


def test_a_client_sending_an_oversized_body_reads_the_413_instead_of_a_reset(tmp_path: Path) -> None:
    # 8 MiB: far more than the loopback socket buffers hold, so a server that answered without
    # reading the body would close on unread data and the client would see a reset, not the answer
    body = b"Action=DescribeConversionTasks&Description=" + b"x" * (8 << 20)
    request = (
        b"POST / HTTP/1.1\r\nHost: appliance\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with gunicorn(tmp_path) as srv:
        got, headers, answer = _raw_exchange(srv.port, request)
    assert got == 413
    assert _ec2_error(got, headers, answer)[0] == "RequestEntityTooLarge"
