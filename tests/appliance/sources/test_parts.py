"""Waiting for an EC2 import upload and downloading its parts (appliance.sources.uploadwait and
appliance.sources.parts): against a moto server and a scripted HTTP server."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import Cancelled
from appliance.sources.http import HttpClient, SourceUnavailable
from appliance.sources.manifest import (
    ImportManifest,
    Part,
    PartVerificationFailed,
    plan_parts,
)
from appliance.sources.parts import PartBuffers, download_parts
from appliance.sources.uploadwait import wait_for_manifest
from appliance.sources.urlfilter import UrlNotAllowed, UrlPolicy
from tests.appliance.sources.test_manifest import manifest_xml
from tests.euca_upload import presign_manifest_url, random_file, upload
from tests.httpfixtures import TestHTTPServer
from tests.processes import wait_until
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy

MiB = 2**20

# ------------------------------------------------------------------------------------- moto end to end


@pytest.fixture
def policy(moto: MotoServer) -> UrlPolicy:
    return UrlPolicy(allowed_endpoints=[moto.endpoint])


@pytest.fixture
def http(policy: UrlPolicy) -> HttpClient:
    return HttpClient(policy, retries=2, backoff=0.01, connect_timeout=5, read_timeout=30)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3 parts of 10 MiB, the last one short
    return random_file(tmp_path_factory.mktemp("disk") / "disk.raw", 25 * MiB + 4321, seed=3)


def soon(seconds: float = 600) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


class FileWriter:
    """The ``write(offset, chunk)`` callback, into a real file; remembers the offsets written."""

    def __init__(self, path: Path, size: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, size)
        self.offsets: list[int] = []

    def __call__(self, offset: int, chunk: bytes) -> None:
        self.offsets.append(offset)
        os.pwrite(self.fd, chunk, offset)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def uploaded(
    moto: MotoServer, bucket: str, disk: Path, policy: UrlPolicy, http: HttpClient
) -> ImportManifest:
    pending = presign_manifest_url(moto.client("s3"), bucket, "imports", disk)
    upload(moto.client("s3"), pending, disk)
    return wait_for_manifest(
        pending.url, policy, deadline=soon(), poll_interval=0.05, max_interval=0.2, http=http
    )


def run_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def test_waits_for_a_manifest_uploaded_after_the_task_was_created(
    moto: MotoServer, bucket: str, disk: Path, policy: UrlPolicy, http: HttpClient
) -> None:
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, "imports", disk)  # the URL exists before any upload
    waits: list[str] = []
    thread, result = run_in_thread(
        wait_for_manifest, pending.url, policy, deadline=soon(), on_wait=waits.append,
        poll_interval=0.1, max_interval=0.4, http=http,
    )  # fmt: skip
    time.sleep(1)
    assert thread.is_alive() and not result
    upload(s3, pending, disk)
    thread.join(timeout=60)
    assert "error" not in result, result.get("error")
    manifest: ImportManifest = result["value"]
    assert manifest.size == disk.stat().st_size and len(manifest.parts) == 3
    assert any("waiting for the import manifest" in w and "404" in w for w in waits)


def test_waits_for_parts_uploaded_after_the_manifest(
    moto: MotoServer, bucket: str, disk: Path, policy: UrlPolicy, http: HttpClient
) -> None:
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, disk)
    upload(s3, pending, disk)
    last_key = f"{pending.key.rsplit('/', 1)[0]}/{disk.name}.part.2"
    saved = s3.get_object(Bucket=bucket, Key=last_key)["Body"].read()
    s3.delete_object(Bucket=bucket, Key=last_key)
    waits: list[str] = []
    thread, result = run_in_thread(
        wait_for_manifest, pending.url, policy, deadline=soon(), on_wait=waits.append,
        poll_interval=0.05, max_interval=0.2, http=http,
    )  # fmt: skip
    time.sleep(0.5)
    assert thread.is_alive()
    s3.put_object(Bucket=bucket, Key=last_key, Body=saved)
    thread.join(timeout=60)
    assert "value" in result, result.get("error")
    assert any(w.startswith("waiting for part 3 of 3") for w in waits)


def test_deadline_expiry_is_source_unavailable(
    moto: MotoServer, bucket: str, disk: Path, policy: UrlPolicy
) -> None:
    pending = presign_manifest_url(moto.client("s3"), bucket, None, disk)
    with pytest.raises(SourceUnavailable) as err:
        wait_for_manifest(pending.url, policy, deadline=soon(0.3), poll_interval=0.05, max_interval=0.1)
    assert err.value.code == "SourceUnavailable"
    assert err.value.message.startswith("the import manifest was not uploaded before the task expired")
    assert "404" in err.value.message


def test_cancel_stops_the_wait_promptly(moto: MotoServer, bucket: str, disk: Path, policy: UrlPolicy) -> None:
    pending = presign_manifest_url(moto.client("s3"), bucket, None, disk)
    cancel = threading.Event()
    thread, result = run_in_thread(
        wait_for_manifest,
        pending.url,
        policy,
        deadline=soon(7200),
        cancel=cancel,
        poll_interval=3600,
        max_interval=3600,
    )
    time.sleep(0.3)  # now inside the hour's poll wait
    cancel.set()
    thread.join(timeout=60)  # the next poll is an hour away: only the cancel ends the wait before it
    assert not thread.is_alive()
    assert isinstance(result.get("error"), Cancelled)


def test_the_parts_are_headed_several_at_a_time_and_a_missing_one_is_waited_for_in_index_order() -> None:
    parts = "".join(
        f'<part index="{i}"><byte-range start="{50 * i}" end="{50 * i + 49}"/><key>k{i}</key>'
        f"<head-url>{{proxy}}/h{i}</head-url><get-url>{{srv}}/g{i}</get-url></part>"
        for i in range(6)
    )
    xml = (
        "<manifest><version>2010-11-15</version><file-format>RAW</file-format><import><size>300</size>"
        f'<volume-size>1</volume-size><parts count="6">{parts}</parts></import></manifest>'
    )
    with TestHTTPServer() as srv, StallingProxy(srv.endpoint) as proxy:
        srv.add("/m.xml", xml.format(proxy=proxy.endpoint, srv=srv.endpoint).encode())
        for i in range(6):
            srv.add(f"/h{i}", bytes(50))
        srv.routes["/h4"].status = 404  # not uploaded yet
        proxy.arm_object_request("HEAD", "/h0")  # part 0's HEAD is held until released
        policy = UrlPolicy(allowed_endpoints=[srv.endpoint, proxy.endpoint])
        waits: list[str] = []
        thread, result = run_in_thread(
            wait_for_manifest, srv.url("/m.xml"), policy, deadline=soon(), on_wait=waits.append,
            poll_interval=0.05, max_interval=0.1,
        )  # fmt: skip
        # the next parts are asked while part 0's answer is held (one after the other, they were not)
        wait_until(lambda: bool(srv.hits("/h1") and srv.hits("/h2")), what="HEADs of parts 1 and 2")
        assert not waits and not srv.hits("/h0")
        proxy.release()
        # part 5 is there but part 4 is not: the wait names part 5 of 6, as a sequential wait would
        wait_until(lambda: bool(waits), what="a wait for part 5")
        assert waits[0].startswith("waiting for part 5 of 6")
        srv.routes["/h4"].status = 200
        thread.join(timeout=60)
    assert "value" in result, result.get("error")
    assert len(result["value"].parts) == 6


def test_expired_presigned_manifest_url_fails_without_waiting() -> None:
    with TestHTTPServer() as srv:
        body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
        srv.add("/bucket/m.xml", body, status=403)
        policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
        with pytest.raises(SourceUnavailable, match="Request has expired") as err:
            wait_for_manifest(srv.url("/bucket/m.xml"), policy, deadline=soon(600), poll_interval=30)
        assert err.value.status == 403
        assert len(srv.requests) == 1


def test_part_urls_outside_the_policy_are_refused_before_any_part_request() -> None:
    evil = "<head-url>http://169.254.169.254/latest/meta-data/</head-url><get-url>http://169.254.169.254/x</get-url>"
    with TestHTTPServer() as srv:
        srv.add("/m.xml", manifest_xml(part_extra=evil))
        policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
        with pytest.raises(UrlNotAllowed, match=r"part 0 head-url: 169\.254\.169\.254"):
            wait_for_manifest(srv.url("/m.xml"), policy, deadline=soon(), poll_interval=0.05)


def test_download_parts_reproduces_the_file(
    uploaded: ImportManifest, disk: Path, tmp_path: Path, policy: UrlPolicy, http: HttpClient
) -> None:
    out = tmp_path / "volume"
    writer = FileWriter(out, uploaded.size)
    checkpoints: list[tuple[int, int]] = []
    try:
        n = download_parts(
            uploaded, writer, policy, on_part=lambda p, b: checkpoints.append((p.index, b)), http=http
        )
    finally:
        writer.close()
    assert n == disk.stat().st_size
    assert checkpoints == [(0, 10 * MiB), (1, 20 * MiB), (2, uploaded.size)]
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(disk.read_bytes()).digest()


def test_resume_from_start_index_writes_only_the_remaining_parts(
    uploaded: ImportManifest, disk: Path, tmp_path: Path, policy: UrlPolicy, http: HttpClient
) -> None:
    writer = FileWriter(tmp_path / "volume", uploaded.size)
    try:
        n = download_parts(uploaded, writer, policy, start_index=2, http=http)
    finally:
        writer.close()
    assert n == uploaded.size - 20 * MiB
    assert min(writer.offsets) == 20 * MiB
    data = (tmp_path / "volume").read_bytes()
    assert data[20 * MiB :] == disk.read_bytes()[20 * MiB :]
    assert data[: 20 * MiB].count(0) == 20 * MiB  # earlier parts untouched


def test_corrupted_part_object_is_retried_then_fails_with_source_integrity(
    moto: MotoServer,
    bucket: str,
    uploaded: ImportManifest,
    policy: UrlPolicy,
    http: HttpClient,
    tmp_path: Path,
) -> None:
    # replace part 1 after the manifest was written, with bytes that do not fit its byte range
    moto.client("s3").put_object(Bucket=bucket, Key=uploaded.parts[1].key, Body=os.urandom(10 * MiB - 7))
    writer = FileWriter(tmp_path / "volume", uploaded.size)
    done: list[int] = []
    try:
        with pytest.raises(PartVerificationFailed) as err:
            download_parts(
                uploaded, writer, policy, retries=2, on_part=lambda p, b: done.append(p.index), http=http
            )
    finally:
        writer.close()
    assert err.value.code == "SourceIntegrity"
    assert "part 1" in err.value.message and "after 3 attempts" in err.value.message
    assert done == [0]


# ------------------------------------------------------------------- parts on a scripted HTTP server


@pytest.fixture
def part_server() -> Iterator[tuple[TestHTTPServer, ImportManifest, bytes]]:
    data = os.urandom(3 * 100_000 + 17)
    with TestHTTPServer() as srv:
        parts = []
        for i, s, e in plan_parts(len(data), 100_000):
            srv.add(f"/p{i}", data[s : e + 1])
            parts.append(Part(i, s, e, f"p{i}", srv.url(f"/p{i}"), srv.url(f"/p{i}")))
        manifest = ImportManifest("2010-11-15", "RAW", None, None, len(data), 1, parts)
        yield srv, manifest, data


def collect(manifest: ImportManifest) -> tuple[bytearray, callable]:  # type: ignore[valid-type]
    buf = bytearray(manifest.size)

    def write(offset: int, chunk: bytes) -> None:
        buf[offset : offset + len(chunk)] = chunk

    return buf, write


def test_md5_mismatch_is_detected_and_the_part_retried(part_server) -> None:
    srv, manifest, data = part_server
    srv.routes["/p1"].script.append("corrupt")  # same length and ETag, one byte flipped
    buf, write = collect(manifest)
    policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
    download_parts(manifest, write, policy, http=HttpClient(policy, backoff=0.01))
    assert bytes(buf) == data
    assert len(srv.hits("/p1")) == 2 and len(srv.hits("/p0")) == 1


def test_persistent_md5_mismatch_fails_with_source_integrity(part_server) -> None:
    srv, manifest, _ = part_server
    srv.routes["/p2"].script.extend(["corrupt"] * 5)
    _, write = collect(manifest)
    policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
    with pytest.raises(PartVerificationFailed, match="MD5") as err:
        download_parts(manifest, write, policy, retries=1, http=HttpClient(policy, backoff=0.01))
    assert err.value.code == "SourceIntegrity"
    assert len(srv.hits("/p2")) == 2


def test_a_part_body_longer_than_its_byte_range_is_refused(part_server) -> None:
    srv, manifest, _ = part_server
    srv.routes["/p1"].send_length = False  # the body ends when the connection closes
    srv.routes["/p1"].script.extend(["pad:1"] * 2)
    _, write = collect(manifest)
    policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
    with pytest.raises(PartVerificationFailed, match=r"part 1 .*longer than the byte range") as err:
        download_parts(manifest, write, policy, retries=1, http=HttpClient(policy, backoff=0.01))
    assert err.value.code == "SourceIntegrity"
    assert len(srv.hits("/p1")) == 2


def test_broken_connection_mid_part_is_retried_from_the_part_start(part_server) -> None:
    srv, manifest, data = part_server
    srv.routes["/p1"].script.extend(["short:5000", "reset"])
    buf, write = collect(manifest)
    policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
    download_parts(manifest, write, policy, retries=2, http=HttpClient(policy, backoff=0.01, retries=0))
    assert bytes(buf) == data
    assert all("Range" not in r.headers for r in srv.hits("/p1"))  # whole part again


def test_cancel_stops_the_download(part_server) -> None:
    srv, manifest, _ = part_server
    srv.routes["/p1"].script.append("stall:100")
    cancel = threading.Event()
    policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
    _, write = collect(manifest)
    thread, result = run_in_thread(
        download_parts, manifest, write, policy, cancel=cancel, http=HttpClient(policy, read_timeout=3600)
    )
    wait_until(lambda: bool(srv.hits("/p1")), what="part 1 to be served (and stall)", interval=0.05)
    cancel.set()
    thread.join(timeout=60)  # the read timeout is an hour: only the cancel can end the read before it
    assert not thread.is_alive()
    assert isinstance(result.get("error"), Cancelled)


def test_parts_are_fetched_in_parallel_and_written_in_order(part_server) -> None:
    srv, manifest, data = part_server
    with StallingProxy(srv.endpoint) as proxy:
        parts = [
            Part(p.index, p.start, p.end, p.key, p.head_url, p.get_url.replace(srv.endpoint, proxy.endpoint))
            for p in manifest.parts
        ]
        via_proxy = ImportManifest("2010-11-15", "RAW", None, None, manifest.size, 1, parts)
        proxy.arm("/p0", after=100)  # part 0 is held mid-body until released
        buf, write = collect(manifest)
        offsets: list[int] = []

        def record(offset: int, chunk: bytes) -> None:
            offsets.append(offset)
            write(offset, chunk)

        policy = UrlPolicy(allowed_endpoints=[srv.endpoint, proxy.endpoint])
        thread, result = run_in_thread(download_parts, via_proxy, record, policy, parallel=3)
        wait_until(  # the parts after it are fetched while part 0 is held
            lambda: bool(proxy.stalled_on("/p0") and srv.hits("/p1") and srv.hits("/p2")),
            what="parts 1 and 2 fetched while part 0 is held",
            interval=0.05,
        )
        assert proxy.stalled_on("/p0") == 1 and srv.hits("/p2")
        assert not srv.hits("/p3")  # 3 in flight: part 3 waits until part 0 is handed over
        assert not offsets  # nothing is written before part 0
        proxy.release()
        thread.join(timeout=60)
    assert result.get("error") is None
    assert bytes(buf) == data
    assert offsets == sorted(offsets) and offsets[0] == 0


# ------------------------------------------------------------------------------------------ memory


def test_a_slow_writer_holds_at_most_parallel_plus_one_parts_in_reused_buffers() -> None:
    """The parts in flight are counted by the buffer pool (not RSS): a writer that holds the first part
    until every fetching thread has a part waiting sees exactly parallel + 1 parts in memory, and 12
    parts of a download take no more than parallel + 1 buffers (reused part after part)."""
    part, count, parallel = 100_000, 12, 3
    data = os.urandom(part * count - 1234)
    with TestHTTPServer() as srv:
        parts = []
        for i, s, e in plan_parts(len(data), part):
            srv.add(f"/p{i}", data[s : e + 1])
            parts.append(Part(i, s, e, f"p{i}", srv.url(f"/p{i}"), srv.url(f"/p{i}")))
        manifest = ImportManifest("2010-11-15", "RAW", None, None, len(data), 1, parts)
        policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
        pool = PartBuffers(keep=parallel + 1)
        out = bytearray(len(data))

        def write(offset: int, chunk: bytes | memoryview) -> None:
            if offset == 0:  # the first part is being written: the fetchers fill every slot meanwhile
                wait_until(lambda: pool.in_use == (parallel + 1) * part, what="parallel parts waiting")
            out[offset : offset + len(chunk)] = chunk

        n = download_parts(manifest, write, policy, parallel=parallel, buffers=pool, http=HttpClient(policy))
    assert n == len(data) and bytes(out) == data
    assert pool.peak_in_use == (parallel + 1) * part  # never more than parallel + 1 parts
    assert pool.allocated == parallel + 1  # 12 parts through parallel + 1 buffers
    assert pool.in_use == 0  # every buffer handed back


def test_a_part_url_whose_host_does_not_resolve_is_source_unreachable_naming_the_part() -> None:
    gone = "<head-url>http://parts.nowhere.invalid/p0</head-url><get-url>http://parts.nowhere.invalid/p0</get-url>"
    with TestHTTPServer() as srv:
        srv.add("/m.xml", manifest_xml(part_extra=gone))
        policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
        with pytest.raises(UrlNotAllowed) as err:
            wait_for_manifest(srv.url("/m.xml"), policy, deadline=soon(), poll_interval=0.05)
    assert err.value.code == "Source.Unreachable"
    assert err.value.message.startswith("part 0 head-url: ")
    assert "'parts.nowhere.invalid'" in err.value.message
