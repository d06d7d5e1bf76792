"""Kept-alive connections of the HTTP client (appliance.sources.httppool) against real loopback
servers (http and https): ranges of one import share a few connections, and the SSRF checks, If-Match
and retries still hold on a client with connections in its pools."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from urllib3.exceptions import ProtocolError

from appliance.sources import urlfilter
from appliance.sources.http import HttpClient
from appliance.sources.httppool import PinnedAddressMismatch, PinnedPools
from appliance.sources.ranges import ReaderSettings
from appliance.sources.reader import RangeReader, open_reader
from appliance.sources.urlfilter import CheckedUrl, UrlNotAllowed, UrlPolicy
from tests.httpfixtures import NetworkRecorder, TestHTTPServer, self_signed_cert, tls_server_context

RS = 64 * 1024
SETTINGS = ReaderSettings(
    parallel=3, range_size=RS, stall_seconds=5, retries=2, backoff=0.01, backoff_max=0.05
)
BODY = os.urandom(40 * RS + 123)  # 41 ranges


def read_all(reader: RangeReader) -> bytes:
    out = bytearray()
    with reader:
        while chunk := reader.read(1 << 20):
            out += chunk
    return bytes(out)


def open_sockets_to(server: TestHTTPServer) -> int:
    """This process's TCP connections to ``server`` that are still open (kept in a pool or in use)."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == server.port and c.status == psutil.CONN_ESTABLISHED
    )


def ranged_gets(server: TestHTTPServer, path: str) -> list[dict[str, str]]:
    return [r.headers for r in server.hits(path) if r.method == "GET" and "Range" in r.headers]


@pytest.fixture
def server() -> Iterator[TestHTTPServer]:
    with TestHTTPServer() as srv:
        srv.add("/disk.raw", BODY)
        yield srv


def test_the_ranges_of_one_import_share_at_most_parallel_plus_one_connections(server: TestHTTPServer) -> None:
    http = HttpClient(UrlPolicy(allowed_endpoints=[server.endpoint]), retries=0)
    reader = open_reader({"url": server.url("/disk.raw")}, http.policy, settings=SETTINGS, http=http)
    assert read_all(reader) == BODY
    gets = ranged_gets(server, "/disk.raw")
    assert len(gets) >= 40
    assert server.connections <= SETTINGS.parallel + 1
    assert http.connections_opened == server.connections
    # every range after the first still carries If-Match on the object's ETag
    etag = server.routes["/disk.raw"].etag
    assert all(h.get("If-Match") == f'"{etag}"' for h in gets[1:])


def test_an_https_import_makes_at_most_parallel_plus_one_tls_handshakes(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path, ["imaging.test"])
    sni: list[str] = []
    with TestHTTPServer(tls=tls_server_context(cert, key, sni)) as srv:
        srv.add("/disk.raw", BODY)
        policy = UrlPolicy(
            allowed_endpoints=[f"https://imaging.test:{srv.port}"], resolver=lambda host, port: ["127.0.0.1"]
        )
        http = HttpClient(policy, retries=0, ca_certs=str(cert))
        reader = open_reader(
            {"url": f"https://imaging.test:{srv.port}/disk.raw"}, policy, settings=SETTINGS, http=http
        )
        assert read_all(reader) == BODY
        assert len(ranged_gets(srv, "/disk.raw")) >= 40
        assert 1 <= srv.connections <= SETTINGS.parallel + 1
        assert len(sni) == srv.connections  # one handshake per connection, each for the URL's name
        assert set(sni) == {"imaging.test"}
        assert http.connections_opened == srv.connections


def test_a_fully_read_answer_leaves_its_connection_for_the_next_request(server: TestHTTPServer) -> None:
    http = HttpClient(UrlPolicy(allowed_endpoints=[server.endpoint]), retries=0)
    for start in (0, RS, 2 * RS):
        with http.get_stream(server.url("/disk.raw"), (start, start + RS - 1)) as response:
            assert b"".join(response.iter_chunks()) == BODY[start : start + RS]
    view = memoryview(bytearray(RS))
    with http.get_stream(server.url("/disk.raw"), (3 * RS, 4 * RS - 1)) as response:
        assert sum(response.fill(view)) == RS  # received past urllib3, straight from the socket
    assert bytes(view) == BODY[3 * RS : 4 * RS]
    with http.head(server.url("/disk.raw")) as response:
        assert response.status == 200
    with http.get_stream(server.url("/missing")) as response:
        assert response.status == 404  # its short error page is drained, the connection kept
    assert len(server.requests) == 6
    assert server.connections == 1


def test_a_body_left_halfway_closes_its_connection_and_never_reaches_the_next_request(
    server: TestHTTPServer,
) -> None:
    # the server sends 4096 bytes of the body and then nothing: a connection given back to the pool
    # would look idle and healthy, and the next request on it would wait for an answer forever
    server.routes["/disk.raw"].script.append("stall:4096")
    http = HttpClient(UrlPolicy(allowed_endpoints=[server.endpoint]), retries=0, read_timeout=5)
    with http.get_stream(server.url("/disk.raw")) as response:
        chunks = response.iter_chunks(4096)
        assert next(chunks) == BODY[:4096]
        chunks.close()
    with http.get_stream(server.url("/disk.raw"), (5, 104)) as response:
        assert response.status == 206
        assert b"".join(response.iter_chunks()) == BODY[5:105]
    assert server.connections == 2


def test_a_server_closing_kept_alive_connections_mid_import_still_completes(
    server: TestHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    # each connection answers 2 requests, then closes as the third arrives; the reader has no retry
    # to spare, so only sending again on a new connection (not a counted retry) completes the import
    server.keepalive_requests = 2
    http = HttpClient(UrlPolicy(allowed_endpoints=[server.endpoint]), retries=0)
    settings = dataclasses.replace(SETTINGS, retries=0)
    url = server.url("/disk.raw") + "?X-Amz-Signature=sekrit-signature"
    reader = open_reader({"url": url}, http.policy, settings=settings, http=http)
    with caplog.at_level(logging.DEBUG, logger="appliance"):
        assert read_all(reader) == BODY
    assert reader.stats.retries == 0
    assert server.closed_unanswered > 0  # the server did close connections the client sent on
    assert server.connections > SETTINGS.parallel + 1
    assert "kept-alive connection was closed" in caplog.text
    assert "sekrit-signature" not in caplog.text


def test_a_redirect_to_a_forbidden_address_is_refused_while_connections_are_pooled(
    server: TestHTTPServer,
) -> None:
    # rebind.test resolves to the very address the pool holds a connection to; it is not an allowed
    # endpoint, so the redirect to it is checked and refused like any loopback address
    server.redirect("/jump", f"http://rebind.test:{server.port}/disk.raw")
    policy = UrlPolicy(
        allowed_endpoints=[server.endpoint],
        allowed_ports=[server.port],
        resolver=lambda host, port: ["127.0.0.1"],
    )
    http = HttpClient(policy, retries=0)
    with http.get_stream(server.url("/disk.raw"), (0, 9)) as response:
        assert b"".join(response.iter_chunks()) == BODY[:10]
    with (
        NetworkRecorder() as net,
        pytest.raises(UrlNotAllowed, match=r"redirect to disallowed URL.*loopback"),
    ):
        http.get_stream(server.url("/jump"))
    assert net.connected_hosts() == []  # the redirect was sent on the kept connection, nothing new
    assert [r.path for r in server.requests] == ["/disk.raw", "/jump"]
    assert server.connections == 1


def test_a_rebinding_resolver_is_refused_though_a_connection_to_its_first_answer_is_pooled(
    server: TestHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server is on loopback, which the policy refuses; so that its first answer passes as the
    # public address it stands for, the policy's address check lets exactly 127.0.0.1 through.
    real = urlfilter.address_problem
    monkeypatch.setattr(urlfilter, "address_problem", lambda a: None if a == "127.0.0.1" else real(a))
    answers = iter([["127.0.0.1"], ["169.254.169.254"], ["169.254.169.254"]])
    policy = UrlPolicy(allowed_ports=[server.port], resolver=lambda host, port: next(answers))
    http = HttpClient(policy, retries=0)
    url = f"http://images.example:{server.port}/disk.raw"
    with http.get_stream(url, (0, 9)) as response:
        assert b"".join(response.iter_chunks()) == BODY[:10]
    with NetworkRecorder() as net:
        with pytest.raises(UrlNotAllowed, match=r"169\.254\.169\.254.*link-local"):
            http.get_stream(url, (10, 19))
        with pytest.raises(UrlNotAllowed):
            http.head(url)
    assert net.connected_hosts() == []
    assert len(server.requests) == 1 and server.connections == 1


def test_a_name_that_resolves_to_another_address_is_not_sent_on_the_first_addresses_connection(
    server: TestHTTPServer,
) -> None:
    # the same name and port, two addresses (two servers): the second request goes to the address
    # checked for it, not down the connection kept for the first answer
    with TestHTTPServer(host="127.0.0.2", port=server.port) as other:
        other.add("/disk.raw", BODY[::-1])
        answers = iter([["127.0.0.1"], ["127.0.0.2"]])
        policy = UrlPolicy(
            allowed_endpoints=[f"http://imaging.test:{server.port}"],
            resolver=lambda host, port: next(answers),
        )
        http = HttpClient(policy, retries=0)
        url = f"http://imaging.test:{server.port}/disk.raw"
        for expected in (BODY, BODY[::-1]):
            with http.get_stream(url, (0, 99)) as response:
                assert b"".join(response.iter_chunks()) == expected[:100]
        assert (server.connections, other.connections) == (1, 1)


def test_a_pool_keeps_at_most_its_size_of_connections_after_more_were_in_flight(
    server: TestHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    http = HttpClient(UrlPolicy(allowed_endpoints=[server.endpoint]), retries=0, pool_size=2)
    # five answers open at once: five connections (nothing waits for a free one)...
    responses = [http.get_stream(server.url("/disk.raw"), (i * RS, i * RS + 99)) for i in range(5)]
    assert server.connections == 5
    with caplog.at_level(logging.WARNING):
        for i, response in enumerate(responses):
            with response:
                assert b"".join(response.iter_chunks()) == BODY[i * RS : i * RS + 100]
    # ...of which the pool keeps two; the others are closed as they come back, quietly
    assert open_sockets_to(server) == 2
    assert caplog.records == []
    with http.get_stream(server.url("/disk.raw"), (0, 9)) as response:
        assert b"".join(response.iter_chunks()) == BODY[:10]
    assert server.connections == 5
    http.close()
    assert open_sockets_to(server) == 0


def test_a_pool_refuses_a_connection_to_anything_but_its_address_literal(server: TestHTTPServer) -> None:
    # The policy only hands out IP literals; were a name to reach a pool, the connection it opens
    # (resolved by the socket layer) is not to "the checked address" and is closed before any request.
    pools = PinnedPools()
    checked = CheckedUrl(server.url("/disk.raw"), "http", "localhost", server.port, ("localhost",))
    pool = pools.get(checked, "localhost", None)
    with pytest.raises(ProtocolError) as err:  # a network failure to the client: retried, then coded
        pool.urlopen("GET", "/disk.raw", retries=False, preload_content=False)
    assert isinstance(err.value.args[1], PinnedAddressMismatch)
    assert server.requests == []
    assert pools.opened == 0
