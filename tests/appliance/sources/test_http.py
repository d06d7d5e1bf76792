"""The pinned, redirect-checking HTTP client (appliance.sources.http) against a real loopback server."""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import Cancelled
from appliance.sources.http import BodyTooLong, HttpClient, SourceUnavailable, TransferInterrupted
from appliance.sources.httpio import direct_readinto
from appliance.sources.urlfilter import UrlNotAllowed, UrlPolicy
from tests.httpfixtures import NetworkRecorder, TestHTTPServer, self_signed_cert, tls_server_context
from tests.servers import free_port

BODY = os.urandom(700_000)


@pytest.fixture
def server() -> Iterator[TestHTTPServer]:
    with TestHTTPServer() as srv:
        srv.add("/disk.raw", BODY)
        yield srv


def client_for(*servers: TestHTTPServer, retries: int = 3, **kwargs: object) -> HttpClient:
    policy = UrlPolicy(allowed_endpoints=[s.endpoint for s in servers], **kwargs)  # type: ignore[arg-type]
    return HttpClient(policy, retries=retries, backoff=0.01, connect_timeout=5, read_timeout=10)


def read_all(client: HttpClient, url: str, **kwargs: object) -> tuple[int, bytes]:
    with client.get_stream(url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, b"".join(response.iter_chunks())


def test_redirect_to_metadata_service_is_refused_before_connecting(server: TestHTTPServer) -> None:
    server.redirect("/image", "http://169.254.169.254/latest/meta-data/")
    client = client_for(server)
    with NetworkRecorder() as net, pytest.raises(UrlNotAllowed) as err:
        client.get_stream(server.url("/image"))
    assert err.value.code == "UrlNotAllowed"
    assert "redirect to disallowed URL" in err.value.message
    assert "169.254.169.254" not in net.connected_hosts()
    assert set(net.connected_hosts()) == {"127.0.0.1"}


def test_redirect_chain_to_allowed_url_is_followed_and_each_hop_checked(server: TestHTTPServer) -> None:
    with TestHTTPServer() as other:
        other.add("/final", b"the disk")
        server.redirect("/a", "/b", status=301)  # relative Location
        server.redirect("/b", server.url("/c"), status=307)
        server.redirect("/c", other.url("/final"), status=302)
        status, body = read_all(client_for(server, other), server.url("/a"))
        assert (status, body) == (200, b"the disk")
        assert [r.path for r in server.requests] == ["/a", "/b", "/c"]
        assert other.hits("/final")


def test_redirect_to_a_loopback_server_that_is_not_allowed_is_refused(server: TestHTTPServer) -> None:
    with TestHTTPServer() as other:
        other.add("/secret", b"internal")
        server.redirect("/a", other.url("/secret"))
        with pytest.raises(UrlNotAllowed, match="redirect to disallowed URL"):
            client_for(server).get_stream(server.url("/a"))
        assert other.requests == []


def test_too_many_redirects(server: TestHTTPServer) -> None:
    for i in range(7):
        server.redirect(f"/r{i}", f"/r{i + 1}")
    with pytest.raises(SourceUnavailable, match="redirected more than 5 times"):
        client_for(server).head(server.url("/r0"))
    assert len(server.requests) == 6


def test_range_request_returns_the_requested_bytes(server: TestHTTPServer) -> None:
    status, body = read_all(client_for(server), server.url("/disk.raw"), range=(1000, 1999))
    assert status == 206
    assert body == BODY[1000:2000]
    status, body = read_all(client_for(server), server.url("/disk.raw"), range=(699_000, None))
    assert (status, body) == (206, BODY[699_000:])
    assert server.requests[0].headers["Range"] == "bytes=1000-1999"


def test_dropped_connections_and_5xx_are_retried(server: TestHTTPServer) -> None:
    server.routes["/disk.raw"].script.extend(["reset", "500", "reset", "503"])
    status, body = read_all(client_for(server, retries=4), server.url("/disk.raw"))
    assert (status, body) == (200, BODY)
    assert len(server.hits("/disk.raw")) == 5


def test_retries_are_bounded(server: TestHTTPServer) -> None:
    server.routes["/disk.raw"].script.extend(["500"] * 10)
    with pytest.raises(SourceUnavailable, match="after 3 attempts: HTTP 500") as err:
        client_for(server, retries=2).get_stream(server.url("/disk.raw"))
    assert err.value.status == 500 and err.value.transient
    assert len(server.hits("/disk.raw")) == 3


@pytest.mark.parametrize("status", [403, 404, 416])
def test_client_errors_are_returned_not_retried(server: TestHTTPServer, status: int) -> None:
    server.routes["/disk.raw"].script.append(str(status))
    with client_for(server).head(server.url("/disk.raw")) as response:
        assert response.status == status
    assert len(server.hits("/disk.raw")) == 1


def test_short_body_raises_transfer_interrupted(server: TestHTTPServer) -> None:
    server.routes["/disk.raw"].script.append("short:1000")
    response = client_for(server).get_stream(server.url("/disk.raw"))
    with response, pytest.raises(TransferInterrupted) as err:
        for _ in response.iter_chunks():
            pass
    assert err.value.transient and err.value.code == "SourceUnavailable"


def test_connects_to_the_pinned_address_and_sends_the_original_host(server: TestHTTPServer) -> None:
    lookups: list[str] = []

    def dns(host: str, port: int) -> list[str]:
        lookups.append(host)
        # a rebinding resolver: the first answer is the allowed one, later ones point elsewhere
        return ["127.0.0.1"] if len(lookups) == 1 else ["10.255.255.1"]

    policy = UrlPolicy(allowed_endpoints=[f"http://imaging.test:{server.port}"], resolver=dns)
    client = HttpClient(policy, retries=0, backoff=0.01)
    with NetworkRecorder() as net:
        status, body = read_all(client, f"http://imaging.test:{server.port}/disk.raw")
    assert (status, body) == (200, BODY)
    assert lookups == ["imaging.test"]  # resolved once, by the policy
    assert "imaging.test" not in net.resolved_names()  # never re-resolved by the HTTP stack
    assert net.connected_hosts() == ["127.0.0.1"]
    assert server.requests[0].headers["Host"] == f"imaging.test:{server.port}"


def test_https_verifies_the_certificate_for_the_url_host_not_the_pinned_address(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path, ["imaging.test"])
    sni: list[str] = []
    with TestHTTPServer(tls=tls_server_context(cert, key, sni)) as srv:
        srv.add("/disk.raw", b"secure bytes")
        url = f"https://imaging.test:{srv.port}/disk.raw"
        dns = {"imaging.test": ["127.0.0.1"], "wrong.test": ["127.0.0.1"]}
        policy = UrlPolicy(
            allowed_endpoints=[f"https://imaging.test:{srv.port}", f"https://wrong.test:{srv.port}"],
            resolver=lambda host, port: dns[host],
        )
        client = HttpClient(policy, retries=2, backoff=0.01, ca_certs=str(cert))
        assert read_all(client, url) == (200, b"secure bytes")
        assert sni == ["imaging.test"]
        assert srv.requests[0].headers["Host"] == f"imaging.test:{srv.port}"
        # same address, but the certificate is not valid for this name: refused, and not retried
        with pytest.raises(SourceUnavailable, match=r"TLS connection to wrong\.test"):
            client.get_stream(f"https://wrong.test:{srv.port}/disk.raw")
        assert len(srv.requests) == 1


def test_cancel_interrupts_a_stalled_body(server: TestHTTPServer) -> None:
    server.routes["/disk.raw"].script.append("stall:5000")
    cancel = threading.Event()
    policy = UrlPolicy(allowed_endpoints=[server.endpoint])
    client = HttpClient(policy, retries=0, read_timeout=3600)
    outcome: list[BaseException] = []

    def consume() -> None:
        try:
            with client.get_stream(server.url("/disk.raw"), cancel=cancel) as response:
                started.set()
                for _ in response.iter_chunks():
                    pass  # blocks: the server sent 5000 bytes and hangs
        except BaseException as exc:
            outcome.append(exc)

    started = threading.Event()
    worker = threading.Thread(target=consume)
    worker.start()
    assert started.wait(60)
    cancel.set()
    worker.join(timeout=60)  # the read timeout is an hour: only the cancel can end the read before it
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "gopher://127.0.0.1:70/", "s3://import-bucket/disk.raw"]
)
def test_redirect_to_a_non_http_scheme_is_refused(
    server: TestHTTPServer, tmp_path: Path, location: str
) -> None:
    from appliance import config

    # the S3 endpoint is allowed, so an s3:// URL passes the policy: the HTTP client must still refuse it
    cfg = config.from_dict(
        {"sources": {"allowed_endpoints": [server.endpoint], "s3": {"endpoint_url": server.endpoint}}},
        tmp_path,
    )
    policy = UrlPolicy.from_config(cfg.sources)
    assert policy.check("s3://import-bucket/disk.raw").scheme == "s3"
    server.redirect("/a", location)
    with pytest.raises(UrlNotAllowed, match="redirect to disallowed URL"):
        HttpClient(policy, retries=0).head(server.url("/a"))
    assert [r.path for r in server.requests] == ["/a"]


# -- failures in fixed words, never a library's exception text (issue 10, item 9) ------------------

_LIBRARY_WORDS = ("RemoteDisconnected", "HTTPConnectionPool", "NewConnectionError", "Errno", "Max retries")


def test_network_failures_are_described_in_fixed_words(server: TestHTTPServer) -> None:
    server.routes["/disk.raw"].script.extend(["reset", "reset"])
    with pytest.raises(SourceUnavailable) as reset:
        client_for(server, retries=1).get_stream(server.url("/disk.raw"))
    assert reset.value.message.endswith(
        "failed after 2 attempts: the server closed the connection without answering"
    )

    server.routes["/disk.raw"].script.append("short:1000")
    with (
        client_for(server).get_stream(server.url("/disk.raw")) as response,
        pytest.raises(TransferInterrupted) as short,
    ):
        for _ in response.iter_chunks():
            pass
    assert short.value.message.endswith(
        "broke after 1000 bytes: the connection closed before the whole body arrived"
    )

    port = free_port()  # nothing listens there
    closed = HttpClient(UrlPolicy(allowed_endpoints=[f"http://127.0.0.1:{port}"]), retries=0, backoff=0.01)
    with pytest.raises(SourceUnavailable) as refused:
        closed.get_stream(f"http://127.0.0.1:{port}/disk.raw")
    assert refused.value.message.endswith("failed after 1 attempts: connection refused")
    for err in (reset, short, refused):
        assert not any(word in err.value.message for word in _LIBRARY_WORDS), err.value.message


# ------------------------------------------------------------------ fill: the body into a buffer


def test_fill_puts_the_body_into_the_callers_buffer_in_pieces_of_at_most_the_step(
    server: TestHTTPServer,
) -> None:
    buf = bytearray(len(BODY))
    with client_for(server).get_stream(server.url("/disk.raw")) as response:
        pieces = list(response.fill(memoryview(buf), step=64 * 1024))
    assert bytes(buf) == BODY
    assert sum(pieces) == len(BODY) and max(pieces) <= 64 * 1024


def test_fill_receives_from_the_socket_under_urllib3_not_through_its_read(server: TestHTTPServer) -> None:
    # urllib3 2's readinto is read() plus a copy, and http.client's read(n) copies once more: the
    # reader's CPU per byte depends on fill going to http.client's readinto. An urllib3 that keeps
    # the body elsewhere would make fill fall back silently to the slow path; this says so.
    with client_for(server).get_stream(server.url("/disk.raw")) as response:
        readinto = direct_readinto(response._raw)
        assert isinstance(response._raw._fp, http.client.HTTPResponse)
        assert readinto == response._raw._fp.readinto


def test_fill_of_a_body_longer_than_the_buffer_raises_body_too_long(server: TestHTTPServer) -> None:
    server.add("/nolength", BODY, send_length=False)  # ends when the connection closes
    buf = bytearray(len(BODY) - 1)
    response = client_for(server).get_stream(server.url("/nolength"))
    with response, pytest.raises(BodyTooLong) as err:
        for _ in response.fill(memoryview(buf)):
            pass
    assert err.value.code == "SourceIntegrity"
    assert bytes(buf) == BODY[:-1]


def test_fill_of_a_short_body_stops_at_its_end_and_says_how_much_arrived(server: TestHTTPServer) -> None:
    server.routes["/disk.raw"].script.append("short:1000")
    buf = bytearray(len(BODY))
    with client_for(server).get_stream(server.url("/disk.raw")) as response:
        assert sum(response.fill(memoryview(buf))) == 1000  # the caller compares with what it asked
    assert bytes(buf[:1000]) == BODY[:1000]


def test_redirect_to_a_host_that_does_not_resolve_is_source_unreachable_naming_the_host(
    server: TestHTTPServer,
) -> None:
    # the real resolver on a reserved name (.invalid never resolves)
    server.redirect("/a", "http://disks.nowhere.invalid/disk.raw")
    with pytest.raises(UrlNotAllowed) as err:
        client_for(server).get_stream(server.url("/a"))
    assert err.value.code == "Source.Unreachable"
    assert "redirect to unreachable URL http://disks.nowhere.invalid/disk.raw" in err.value.message
    assert "'disks.nowhere.invalid'" in err.value.message and "Errno" not in err.value.message
