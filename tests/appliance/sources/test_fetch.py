"""Fetching one disk image to a file (appliance.sources.fetch) from a real loopback HTTP server."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import Cancelled, ImageRejected, InsufficientScratch, UsageError
from appliance.sources.fetch import fetch_to_file, open_stream
from appliance.sources.http import HttpClient, SourceUnavailable, TransferInterrupted
from appliance.sources.urlfilter import UrlNotAllowed, UrlPolicy
from tests.httpfixtures import TestHTTPServer
from tests.processes import wait_until

DATA = os.urandom(1_500_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server() -> Iterator[TestHTTPServer]:
    with TestHTTPServer() as srv:
        srv.add("/disk.raw", DATA)
        yield srv


@pytest.fixture
def policy(server: TestHTTPServer) -> UrlPolicy:
    return UrlPolicy(allowed_endpoints=[server.endpoint])


@pytest.fixture
def http(policy: UrlPolicy) -> HttpClient:
    return HttpClient(policy, retries=3, backoff=0.01, connect_timeout=5, read_timeout=30)


def test_fetch_streams_to_file_with_sha256_and_progress(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    progress: list[tuple[int, int | None]] = []
    dst = tmp_path / "disk"
    result = fetch_to_file(
        {"url": server.url("/disk.raw")}, dst, policy, max_bytes=10**7,
        on_progress=lambda d, t: progress.append((d, t)), http=http,
    )  # fmt: skip
    assert (result.path, result.size, result.sha256) == (dst, len(DATA), SHA)
    assert result.etag == server.routes["/disk.raw"].etag
    assert dst.read_bytes() == DATA
    assert progress[-1] == (len(DATA), len(DATA))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert os.stat(dst).st_mode & 0o777 == 0o600


def test_size_cap_from_content_length_keeps_nothing(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    with pytest.raises(ImageRejected) as err:
        fetch_to_file(
            {"url": server.url("/disk.raw")}, tmp_path / "d", policy, max_bytes=len(DATA) - 1, http=http
        )
    assert err.value.code == "SizeLimitExceeded.Download"
    assert f"({len(DATA)} bytes)" in err.value.message
    assert not (tmp_path / "d").exists()


def test_size_cap_without_content_length_is_enforced_while_streaming(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    server.routes["/disk.raw"].send_length = False  # the body ends when the server closes
    written: list[int] = []
    with pytest.raises(ImageRejected) as err:
        fetch_to_file(
            {"url": server.url("/disk.raw")}, tmp_path / "d", policy, max_bytes=1_000_000,
            on_progress=lambda d, t: written.append(d), http=http,
        )  # fmt: skip
    assert err.value.code == "SizeLimitExceeded.Download"
    assert max(written) <= 1_000_000
    assert not (tmp_path / "d").exists()


def test_resumes_with_range_after_the_connection_drops_mid_body(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    server.routes["/disk.raw"].script.extend(["short:600000", "short:200000"])  # the 2nd: of the ranged body
    result = fetch_to_file(
        {"url": server.url("/disk.raw")}, tmp_path / "d", policy, max_bytes=10**7, http=http
    )
    assert result.sha256 == SHA and result.size == len(DATA)
    hits = server.hits("/disk.raw")
    assert len(hits) == 3
    assert "Range" not in hits[0].headers
    first_resume = int(hits[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    second_resume = int(hits[2].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < first_resume <= 600_000 < second_resume
    assert hits[1].headers["If-Range"] == f'"{server.routes["/disk.raw"].etag}"'


def test_object_changed_between_attempts_restarts_from_zero(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    route = server.routes["/disk.raw"]
    route.script.append("short:600000")
    new = os.urandom(1_200_000)

    def replace_object(done: int, total: int | None) -> None:
        if route.body is DATA:  # while the first (doomed) response is in flight
            route.body, route.etag = new, hashlib.md5(new).hexdigest()

    result = fetch_to_file(
        {"url": server.url("/disk.raw")}, tmp_path / "d", policy, max_bytes=10**7, on_progress=replace_object,
        http=http,
    )  # fmt: skip
    # If-Range did not match: the server sent the whole new object and nothing old was kept
    assert result.sha256 == hashlib.sha256(new).hexdigest()
    assert (tmp_path / "d").read_bytes() == new


def test_server_ignoring_range_restarts_from_zero(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    server.routes["/disk.raw"].honour_range = False
    server.routes["/disk.raw"].script.append("short:600000")
    result = fetch_to_file(
        {"url": server.url("/disk.raw")}, tmp_path / "d", policy, max_bytes=10**7, http=http
    )
    assert result.sha256 == SHA and (tmp_path / "d").read_bytes() == DATA


def test_gives_up_after_the_retries_and_removes_the_partial_file(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    server.routes["/disk.raw"].script.extend(["short:300000"] * 5)
    with pytest.raises(TransferInterrupted):
        fetch_to_file(
            {"url": server.url("/disk.raw")}, tmp_path / "d", policy, max_bytes=10**7, retries=2, http=http
        )
    assert len(server.hits("/disk.raw")) == 3
    assert not (tmp_path / "d").exists()


def test_missing_url_is_source_unavailable(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    with pytest.raises(SourceUnavailable) as err:
        fetch_to_file({"url": server.url("/nope.raw")}, tmp_path / "d", policy, max_bytes=10, http=http)
    assert err.value.status == 404 and "Reason 404 Not Found" in err.value.message
    assert not (tmp_path / "d").exists()


def test_disallowed_url_is_refused(tmp_path: Path, server: TestHTTPServer) -> None:
    with pytest.raises(UrlNotAllowed):
        fetch_to_file({"url": server.url("/disk.raw")}, tmp_path / "d", UrlPolicy(), max_bytes=10**7)
    assert server.requests == []
    assert not (tmp_path / "d").exists()


def test_source_needs_url_or_bucket_and_key(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Url or UserBucket"):
        fetch_to_file({"bucket": "b"}, tmp_path / "d", UrlPolicy(), max_bytes=1)


def test_cancel_removes_the_partial_file(server: TestHTTPServer, policy: UrlPolicy, tmp_path: Path) -> None:
    server.routes["/disk.raw"].script.append("stall:300000")
    cancel = threading.Event()
    dst = tmp_path / "d"
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            fetch_to_file(
                {"url": server.url("/disk.raw")}, dst, policy, max_bytes=10**7, cancel=cancel,
                http=HttpClient(policy, read_timeout=3600),
            )  # fmt: skip
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    # until some bytes have landed, then the server stalls
    wait_until(lambda: dst.exists() and dst.stat().st_size > 0, what="the first bytes", interval=0.05)
    cancel.set()
    worker.join(timeout=60)  # the read timeout is an hour: only the cancel can end the read before it
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    assert not dst.exists()


def test_open_stream_gives_the_raw_body(server: TestHTTPServer, policy: UrlPolicy, http: HttpClient) -> None:
    with open_stream({"url": server.url("/disk.raw")}, policy, http=http) as stream:
        assert stream.content_length == len(DATA)
        assert b"".join(stream.iter_chunks()) == DATA


def test_s3_source_resumes_with_range_and_if_match(tmp_path: Path) -> None:
    # an S3-compatible endpoint that drops the first GET mid-body
    with TestHTTPServer() as srv:
        srv.add("/bkt/disk.raw", DATA).script.append("short:700000")
        policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
        cfg = {"endpoint_url": srv.endpoint, "access_key": "AKIAEXAMPLE", "secret_key": "secret"}
        http = HttpClient(policy, backoff=0.01)
        result = fetch_to_file(
            {"url": "s3://bkt/disk.raw"}, tmp_path / "d", policy, cfg, max_bytes=10**7, http=http
        )
        assert result.sha256 == SHA
        gets = srv.hits("/bkt/disk.raw")
        assert len(gets) == 2
        assert gets[1].headers["Range"].startswith("bytes=") and gets[1].headers["Range"] != "bytes=0-"
        assert gets[1].headers["If-Match"] == f'"{srv.routes["/bkt/disk.raw"].etag}"'


def test_the_declared_size_is_reserved_before_any_byte_is_written(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    dst = tmp_path / "d"
    calls: list[tuple[int, bool, int]] = []
    fetch_to_file(
        {"url": server.url("/disk.raw")}, dst, policy, max_bytes=10**7,
        reserve=lambda n, whole: calls.append((n, whole, dst.stat().st_size)), http=http,
    )  # fmt: skip
    assert calls[0] == (len(DATA), True, 0)
    assert all(n <= len(DATA) for n, _, _ in calls)


def test_a_source_without_a_length_is_reserved_as_its_bytes_arrive(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    server.routes["/disk.raw"].send_length = False
    dst = tmp_path / "d"
    calls: list[tuple[int, bool]] = []

    def reserve(n: int, whole: bool) -> None:
        assert n >= dst.stat().st_size  # before the bytes are written
        calls.append((n, whole))

    result = fetch_to_file(
        {"url": server.url("/disk.raw")}, dst, policy, max_bytes=10**7, reserve=reserve, http=http
    )
    assert result.sha256 == SHA
    assert calls and not any(whole for _, whole in calls)
    assert [n for n, _ in calls] == sorted(n for n, _ in calls) and calls[-1][0] == len(DATA)


def test_a_refused_reservation_stops_the_download_with_insufficient_scratch_and_keeps_nothing(
    server: TestHTTPServer, policy: UrlPolicy, http: HttpClient, tmp_path: Path
) -> None:
    server.routes["/disk.raw"].send_length = False

    def reserve(n: int, whole: bool) -> None:
        if n > 600_000:
            raise InsufficientScratch("downloading needs more scratch than the quota has")

    with pytest.raises(InsufficientScratch):
        fetch_to_file(
            {"url": server.url("/disk.raw")},
            tmp_path / "d",
            policy,
            max_bytes=10**7,
            reserve=reserve,
            http=http,
        )
    assert not (tmp_path / "d").exists()
