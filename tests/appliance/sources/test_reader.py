"""The parallel ranged reader (appliance.sources.reader) against real servers: the moto S3 server
(boto3 and presigned URLs), a loopback HTTP server with scripted misbehaviour, and the stalling proxy.

Stalls are real: a server that stops sending, and a watchdog (the read timeout) of a second, long
enough that normal transfers on a busy machine do not look stalled. Nothing is timed."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import pytest

from appliance import config
from appliance.errors import Cancelled, ConfigError, ImageRejected, SourceChanged, SourceStalled
from appliance.sources.http import HttpClient, SourceIntegrity, SourceUnavailable
from appliance.sources.reader import RangeReader, ReaderSettings, ReadPosition, open_reader
from appliance.sources.urlfilter import UrlNotAllowed, UrlPolicy
from tests.httpfixtures import NetworkRecorder, TestHTTPServer
from tests.processes import wait_until
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy

RS = 64 * 1024  # range size of these tests
SETTINGS = ReaderSettings(
    parallel=3, range_size=RS, stall_seconds=5, retries=2, backoff=0.01, backoff_max=0.05
)
SIZES = {"empty": 0, "one": 1, "range-1": RS - 1, "range": RS, "range+1": RS + 1, "many": 37 * RS + 5}


def read_all(reader: RangeReader, n: int = 100_000) -> bytes:
    out = bytearray()
    with reader:
        while chunk := reader.read(n):
            out += chunk
    return bytes(out)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def server() -> Iterator[TestHTTPServer]:
    with TestHTTPServer() as srv:
        yield srv


@pytest.fixture
def http_policy(server: TestHTTPServer) -> UrlPolicy:
    return UrlPolicy(allowed_endpoints=[server.endpoint])


@pytest.fixture
def s3cfg(moto: MotoServer) -> dict[str, Any]:
    return {
        "endpoint_url": moto.endpoint,
        "region": "us-east-1",
        "access_key": "testing",
        "secret_key": "testing",
    }


@pytest.fixture
def s3_policy(moto: MotoServer) -> UrlPolicy:
    return UrlPolicy(allowed_endpoints=[moto.endpoint])


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"reader-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[StallingProxy]:
    with StallingProxy(moto.endpoint) as p:
        yield p


# ------------------------------------------------------------------------------------- bytes equal


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_s3_object_reads_back_equal_for_every_size(
    size: int, moto: MotoServer, bucket: str, s3cfg: dict, s3_policy: UrlPolicy
) -> None:
    data = os.urandom(size)
    moto.client("s3").put_object(Bucket=bucket, Key="disk.raw", Body=data)
    reader = open_reader({"bucket": bucket, "key": "disk.raw"}, s3_policy, s3cfg, settings=SETTINGS)
    assert read_all(reader, 10_000) == data
    assert reader.size == size
    assert reader.ranged == (size > 0)
    assert reader.stats.buffered == 0
    assert reader.stats.requests == max(1, -(-size // RS)) + (size == 0)  # an empty object: 416, then GET


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_https_url_reads_back_equal_for_every_size(
    size: int, server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(size)
    server.add("/disk.raw", data)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    assert read_all(reader, 7_777) == data
    hits = server.hits("/disk.raw")
    ranged = [h for h in hits if "Range" in h.headers]
    assert len(ranged) == max(1, -(-size // RS))
    etag = server.routes["/disk.raw"].etag
    assert all(h.headers.get("If-Match") == f'"{etag}"' for h in ranged[1:])  # every range but the first


def test_presigned_url_reads_in_parallel_ranges_with_if_match(
    moto: MotoServer, bucket: str, s3_policy: UrlPolicy
) -> None:
    data = os.urandom(20 * RS + 3)
    s3 = moto.client("s3")
    s3.put_object(Bucket=bucket, Key="part.0", Body=data)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "part.0"}, ExpiresIn=600)
    reader = open_reader({"url": url}, s3_policy, settings=SETTINGS)
    assert read_all(reader) == data
    assert reader.ranged and reader.etag == hashlib.md5(data).hexdigest()
    assert reader.stats.requests == 21


# ----------------------------------------------------------------------------------------- changes


def test_s3_object_replaced_mid_read_fails_with_source_changed(
    moto: MotoServer, bucket: str, s3cfg: dict, s3_policy: UrlPolicy
) -> None:
    data = os.urandom(30 * RS)
    s3 = moto.client("s3")
    s3.put_object(Bucket=bucket, Key="disk.raw", Body=data)
    reader = open_reader({"bucket": bucket, "key": "disk.raw"}, s3_policy, s3cfg, settings=SETTINGS)
    got = bytearray()
    with reader, pytest.raises(SourceChanged) as err:
        got += reader.read(RS)
        s3.put_object(Bucket=bucket, Key="disk.raw", Body=os.urandom(30 * RS))  # same size, new ETag
        while chunk := reader.read(RS):
            got += chunk
    assert err.value.code == "Source.Changed"
    assert f"s3://{bucket}/disk.raw changed while it was being read" in err.value.message
    assert bytes(got) == data[: len(got)]  # nothing of the new object was handed over
    assert len(got) < len(data)


def test_https_object_replaced_mid_read_fails_with_source_changed(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(30 * RS)
    route = server.add("/disk.raw", data)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    got = bytearray()
    with reader, pytest.raises(SourceChanged):
        got += reader.read(RS)
        new = os.urandom(30 * RS)
        route.body, route.etag = new, hashlib.md5(new).hexdigest()
        while chunk := reader.read(RS):
            got += chunk
    assert bytes(got) == data[: len(got)]
    assert any(h.headers.get("If-Match") for h in server.hits("/disk.raw"))


# ------------------------------------------------------------------------------------------ stalls


def test_stalled_range_is_retried_and_the_read_succeeds(server: TestHTTPServer) -> None:
    """The second range is held by the stalling proxy after 1000 bytes, and only the watchdog can end
    it: the proxy holds it until the reader gives up on the connection (counted as abandoned), and lets
    the retry through. The watchdog is long enough that the other ranges, on a slow machine too, never
    go that long without data: the counts are exact."""
    data = os.urandom(6 * RS)
    server.add("/disk.raw", data)
    settings = ReaderSettings(parallel=1, range_size=RS, stall_seconds=5, retries=2, backoff=0.01)
    with StallingProxy(server.endpoint) as proxy:
        proxy.arm("/disk.raw", after=RS + 1000, times=1)  # the second range, on its first attempt only
        policy = UrlPolicy(allowed_endpoints=[proxy.endpoint])
        reader = open_reader({"url": proxy.endpoint + "/disk.raw"}, policy, settings=settings)
        assert read_all(reader) == data
        wait_until(lambda: proxy.abandoned("/disk.raw") == 1, what="the held GET abandoned by the reader")
        assert proxy.stalled_on("/disk.raw") == 1  # held once; the retry went through
    assert (reader.stats.stalls, reader.stats.retries) == (1, 1)
    ranges = [h.headers["Range"] for h in server.hits("/disk.raw")]
    assert ranges[:2] == [f"bytes=0-{RS - 1}", f"bytes={RS}-{2 * RS - 1}"]
    # the same range again: from its start, or from the bytes that got through before the stall
    retry_start, retry_end = map(int, ranges[2].removeprefix("bytes=").split("-"))
    assert RS <= retry_start <= RS + 1000 and retry_end == 2 * RS - 1
    assert len(ranges) == 6 + 1  # six ranges and the one retry


def test_range_stalling_on_every_attempt_fails_with_source_stalled(
    moto: MotoServer, bucket: str, proxy: StallingProxy
) -> None:
    data = os.urandom(8 * RS)
    s3 = moto.client("s3")
    s3.put_object(Bucket=bucket, Key="part.7", Body=data)
    presigner = boto3.client(  # signs for the proxy's address: the Host header is part of the signature
        "s3", endpoint_url=proxy.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=botocore.config.Config(signature_version="s3v4"),
    )  # fmt: skip
    url = presigner.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "part.7"})
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    proxy.arm("/part.7", after=3 * 4096)  # every GET stops after 12 KiB
    settings = ReaderSettings(parallel=1, range_size=RS, stall_seconds=1, retries=2, backoff=0.01)
    reader = open_reader({"url": url}, UrlPolicy(allowed_endpoints=[proxy.endpoint]), settings=settings)
    with pytest.raises(SourceStalled) as err:
        read_all(reader)
    message = err.value.message
    assert err.value.code == "Source.Stalled"
    # the bytes before the stall sat in the client's buffer when the read timed out: none was received
    assert "stalled at offset 0: no data for 1 seconds, 3 times" in message
    assert f"/{bucket}/part.7" in message and "X-Amz-Signature=REDACTED" in message
    assert signature not in message and signature not in str(err.value)
    assert proxy.stalled_on("/part.7") == 3  # K = retries + 1 attempts of the first range
    proxy.release()


def test_https_range_stalling_on_every_attempt_names_its_offset_and_the_redacted_url(
    server: TestHTTPServer,
) -> None:
    """Range 1 is held by the stalling proxy on each of its K attempts, until the reader abandons it;
    range 0 goes through, and the watchdog is long enough that it never looks stalled on a slow
    machine: exactly K GETs of range 1."""
    data = os.urandom(6 * RS)
    server.add("/disk.raw", data)
    settings = ReaderSettings(parallel=1, range_size=RS, stall_seconds=5, retries=1, backoff=0.01)
    with StallingProxy(server.endpoint) as proxy:
        proxy.arm("/disk.raw", after=RS + 10)  # range 1, on each of its attempts
        url = proxy.endpoint + "/disk.raw?X-Amz-Credential=AKIDEXAMPLE&X-Amz-Signature=0123456789abcdef"
        reader = open_reader({"url": url}, UrlPolicy(allowed_endpoints=[proxy.endpoint]), settings=settings)
        with reader, pytest.raises(SourceStalled) as err:
            assert reader.read(RS) == data[:RS]
            reader.read(RS)
        wait_until(lambda: proxy.abandoned("/disk.raw") == 2, what="both held GETs abandoned by the reader")
        assert proxy.stalled_on("/disk.raw") == 2
    assert f"/disk.raw?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED stalled at offset {RS}:" in (
        err.value.message
    )
    assert "no data for 5 seconds, 2 times" in err.value.message
    assert "0123456789abcdef" not in str(err.value) and "AKIDEXAMPLE" not in str(err.value)
    assert len(server.hits("/disk.raw")) == 3  # range 0 once, range 1 on its K = 2 attempts


def test_s3_range_stalling_on_every_attempt_fails_with_source_stalled(
    moto: MotoServer, bucket: str, proxy: StallingProxy
) -> None:
    data = os.urandom(8 * RS)
    moto.client("s3").put_object(Bucket=bucket, Key="disk.raw", Body=data)
    cfg = {
        "endpoint_url": proxy.endpoint,
        "region": "us-east-1",
        "access_key": "testing",
        "secret_key": "testing",
    }
    settings = ReaderSettings(parallel=1, range_size=RS, stall_seconds=1, retries=1, backoff=0.01)
    reader = open_reader(
        {"bucket": bucket, "key": "disk.raw"},
        UrlPolicy(allowed_endpoints=[proxy.endpoint]),
        cfg,
        settings=settings,
    )
    proxy.arm("/disk.raw", after=5000)
    with reader, pytest.raises(SourceStalled) as err:
        reader.read(RS)
    # the 5000 bytes before the stall sat in the client's buffer when the read timed out
    assert f"s3://{bucket}/disk.raw stalled at offset 0: no data for 1 seconds, 2 times" in err.value.message
    assert proxy.stalled_on("/disk.raw") == 2
    proxy.release()


# ------------------------------------------------------------------------------------------ memory


def test_memory_is_bounded_by_parallel_plus_one_ranges(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(40 * RS)
    server.add("/disk.raw", data)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    bound = (SETTINGS.parallel + 1) * RS
    with reader:
        first = reader.read(10)  # the consumer then stops: the fetches run ahead up to the bound
        wait_until(lambda: reader.stats.buffered == bound, what="the read-ahead to fill", interval=0.01)
        requests = reader.stats.requests
        time.sleep(0.3)  # give a broken bound the chance to show
        assert reader.stats.requests == requests == SETTINGS.parallel + 1
        rest = reader.read()
    assert first + rest == data
    assert reader.stats.peak_buffered == bound
    assert reader.stats.buffered == 0


def test_a_view_the_consumer_holds_keeps_its_bytes_while_later_ranges_arrive(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    # range buffers are used again for later ranges; a view handed out by readview must not see its
    # bytes overwritten by them while it is alive
    data = os.urandom(40 * RS)
    server.add("/disk.raw", data)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    rest = bytearray()
    with reader:
        held = reader.readview(RS)  # all of range 0, kept while the other 39 ranges pass
        second = reader.readview(RS // 2)  # half of range 1, kept too
        while view := reader.readview(10_000):
            with view:
                rest += view
    assert bytes(held) == data[:RS]
    assert bytes(second) == data[RS : RS + RS // 2]
    assert bytes(rest) == data[RS + RS // 2 :]
    assert held.readonly
    assert reader.stats.buffered == 0


def test_views_released_by_the_consumer_let_their_buffers_serve_later_ranges(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(40 * RS)
    server.add("/disk.raw", data)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    buffers: dict[int, object] = {}  # the range buffers under the views, kept so ids stay unique
    got = bytearray()
    with reader:
        while view := reader.readview(RS):
            with view:
                got += view
                buffers.setdefault(id(view.obj), view.obj)
    assert bytes(got) == data
    assert len(buffers) <= SETTINGS.parallel + 2  # used again, not one new buffer per range


# ------------------------------------------------------------------------------------------ resume


def test_resume_from_a_checkpoint_fetches_only_from_it(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(100 * RS + 17)
    server.add("/disk.raw", data)
    settings = ReaderSettings(parallel=3, range_size=RS, stall_seconds=5, checkpoint_every=8 * RS)
    saved: list[ReadPosition] = []
    reader = open_reader(
        {"url": server.url("/disk.raw")}, http_policy, settings=settings, checkpoint=saved.append
    )
    got = bytearray()
    with reader:
        while len(saved) < 5:  # "killed" after the fifth checkpoint
            got += reader.read(RS // 2)
    position = ReadPosition.from_dict(saved[-1].to_dict())  # as the store keeps it
    assert [p.offset for p in saved] == [8 * RS * i for i in range(1, 6)]
    assert position.size == len(data) and position.tail == RS
    first_run = server.sent
    resumed = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=settings, start=position)
    rest = read_all(resumed)
    assert bytes(got[: position.offset]) + rest == data
    resumed_ranges = [h.headers["Range"] for h in server.requests[-resumed.stats.requests :]]
    assert resumed_ranges[0] == f"bytes={position.offset - RS}-{position.offset - 1}"  # re-verified
    assert server.sent - first_run == len(data) - position.offset + RS
    assert server.sent <= 1.1 * len(data)


def test_resume_of_a_replaced_s3_object_fails_with_source_changed(
    moto: MotoServer, bucket: str, s3cfg: dict, s3_policy: UrlPolicy
) -> None:
    data = os.urandom(20 * RS)
    s3 = moto.client("s3")
    s3.put_object(Bucket=bucket, Key="disk.raw", Body=data)
    settings = ReaderSettings(parallel=2, range_size=RS, stall_seconds=5, checkpoint_every=4 * RS)
    saved: list[ReadPosition] = []
    source = {"bucket": bucket, "key": "disk.raw"}
    with open_reader(source, s3_policy, s3cfg, settings=settings, checkpoint=saved.append) as reader:
        while not saved:
            reader.read(RS)
    # the same object resumes, and reads only from the position (plus the range re-verified)
    resumed = open_reader(source, s3_policy, s3cfg, settings=settings, start=saved[0])
    assert read_all(resumed) == data[saved[0].offset :]
    assert resumed.stats.received == len(data) - saved[0].offset + RS
    s3.put_object(Bucket=bucket, Key="disk.raw", Body=os.urandom(20 * RS))
    with pytest.raises(SourceChanged):
        open_reader(source, s3_policy, s3cfg, settings=settings, start=saved[0]).open()


def test_resume_with_a_tail_that_differs_fails_with_source_changed(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(10 * RS)
    server.add("/disk.raw", data)
    forged = ReadPosition(4 * RS, len(data), server.routes["/disk.raw"].etag, None, RS, "0" * 64)
    with pytest.raises(SourceChanged, match="the bytes before the saved position differ"):
        open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS, start=forged).open()


def test_resume_on_a_server_that_no_longer_serves_ranges_skips_to_the_position(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(12 * RS)
    route = server.add("/disk.raw", data)
    settings = ReaderSettings(parallel=2, range_size=RS, stall_seconds=5, checkpoint_every=4 * RS)
    saved: list[ReadPosition] = []
    with open_reader(
        {"url": server.url("/disk.raw")}, http_policy, settings=settings, checkpoint=saved.append
    ) as r:
        while not saved:
            r.read(RS)
    route.honour_range = False  # the resumed GET gets the whole object: its first bytes are checked, skipped
    resumed = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=settings, start=saved[0])
    assert read_all(resumed) == data[saved[0].offset :]
    assert not resumed.ranged
    route.body = data[: 3 * RS] + os.urandom(RS) + data[4 * RS :]  # the range before the position differs
    with pytest.raises(SourceChanged, match="bytes sent again differ"):
        read_all(
            open_reader({"url": server.url("/disk.raw")}, http_policy, settings=settings, start=saved[0])
        )


def test_a_5xx_answer_to_a_range_is_retried(server: TestHTTPServer, http_policy: UrlPolicy) -> None:
    data = os.urandom(5 * RS)
    route = server.add("/disk.raw", data)
    # the first reset comes on a kept-alive connection: that one is sent again at once on a new
    # connection (a server may close an idle connection just as a request arrives), not counted;
    # the second, on a new connection, is a failure of the origin like the 503
    route.script.extend(["ok", "503", "reset", "reset"])
    settings = ReaderSettings(parallel=1, range_size=RS, stall_seconds=5, retries=2, backoff=0.01)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=settings)
    assert read_all(reader) == data
    assert (reader.stats.retries, reader.stats.stalls) == (2, 0)


# ----------------------------------------------------------------------------------- policy, fallback


def test_redirect_to_a_forbidden_address_is_refused(server: TestHTTPServer, http_policy: UrlPolicy) -> None:
    server.redirect("/disk.raw", "http://169.254.169.254/latest/meta-data/")
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    with NetworkRecorder() as net, pytest.raises(UrlNotAllowed, match="redirect to disallowed URL"):
        reader.open()
    assert "169.254.169.254" not in net.connected_hosts()


@pytest.mark.parametrize("send_length", [True, False], ids=["with-length", "chunked-without-length"])
def test_source_without_ranges_is_read_as_one_stream(
    send_length: bool, server: TestHTTPServer, http_policy: UrlPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(9 * RS + 1)
    server.add("/disk.raw", data, honour_range=False, send_length=send_length)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    with caplog.at_level(logging.INFO, logger="appliance.sources.reader"):
        assert read_all(reader) == data
    assert not reader.ranged
    assert "is read as one stream: it does not serve byte ranges" in caplog.text
    assert len(server.hits("/disk.raw")) == 1
    assert reader.stats.peak_buffered <= RS


def test_one_stream_that_breaks_is_read_again_and_skips_what_was_read(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(9 * RS + 1)
    route = server.add("/disk.raw", data, honour_range=False)
    route.script.append(f"short:{3 * RS + 100}")
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    assert read_all(reader) == data
    assert reader.stats.retries == 1
    second = server.hits("/disk.raw")[1].headers
    assert second["Range"] == f"bytes={3 * RS}-" and second["If-Range"] == f'"{route.etag}"'


def test_source_without_validator_is_read_as_one_stream_and_a_changed_resend_is_refused(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(9 * RS + 1)
    route = server.add("/disk.raw", data, etag="")  # ranges, but no ETag nor Last-Modified
    route.script.extend(["ok", f"short:{3 * RS + 100}"])
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    got = bytearray()
    with reader, pytest.raises(SourceChanged, match="bytes sent again differ"):
        got += reader.read(RS)
        assert not reader.ranged
        route.body = data[:RS] + os.urandom(len(data) - RS)  # replaced while the stream runs
        while chunk := reader.read(RS):
            got += chunk
    assert bytes(got) == data[: len(got)]
    hits = server.hits("/disk.raw")
    assert [h.headers.get("Range") for h in hits] == [f"bytes=0-{RS - 1}", None, None]


def test_source_without_validator_resent_whole_skips_the_bytes_read(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(9 * RS + 1)
    route = server.add("/disk.raw", data, etag="")
    route.script.extend(["ok", f"short:{3 * RS + 100}"])
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS)
    assert read_all(reader) == data
    assert reader.stats.retries == 1


def test_the_http_client_given_is_not_changed(server: TestHTTPServer, http_policy: UrlPolicy) -> None:
    server.add("/disk.raw", b"x" * 10)
    client = HttpClient(http_policy, retries=3, read_timeout=30)
    assert read_all(
        open_reader({"url": server.url("/disk.raw")}, http_policy, settings=SETTINGS, http=client)
    )
    assert (client.retries, client.read_timeout) == (3, 30)


def test_cancel_stops_a_read_waiting_on_a_stalled_range(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(4 * RS)
    route = server.add("/disk.raw", data)
    route.script.extend(["ok", "stall:10", "stall:10", "stall:10"])
    cancel = threading.Event()
    settings = ReaderSettings(parallel=1, range_size=RS, stall_seconds=60, retries=0)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=settings, cancel=cancel)
    with reader, pytest.raises(Cancelled):
        reader.read(RS)
        wait_until(
            lambda: len(server.hits("/disk.raw")) == 2, what="the second range to be asked for", interval=0.01
        )
        cancel.set()
        reader.read(RS)


# ---------------------------------------------------------------------------------------- settings


def test_settings_come_from_the_sources_configuration() -> None:
    cfg = config.from_dict({"sources": {"parallel_ranges": 6, "range_size": "16MiB", "stall_seconds": 20}})
    settings = ReaderSettings.from_sources(cfg.sources)
    assert (settings.parallel, settings.range_size, settings.stall_seconds) == (6, 16 << 20, 20.0)
    assert settings.retries == cfg.sources.retries
    defaults = ReaderSettings.from_sources(config.from_dict({}).sources)
    assert (defaults.parallel, defaults.range_size, defaults.stall_seconds) == (4, 8 << 20, 60.0)


@pytest.mark.parametrize("size", ["512KiB", "1GiB"])
def test_a_range_size_outside_1mib_to_256mib_is_a_config_error(size: str) -> None:
    with pytest.raises(ConfigError, match=r"sources\.range_size"):
        config.from_dict({"sources": {"range_size": size}})


def test_the_s3_client_has_a_connection_for_every_range_in_flight(
    moto: MotoServer, bucket: str, s3cfg: dict, s3_policy: UrlPolicy
) -> None:
    data = os.urandom(40 * RS)
    moto.client("s3").put_object(Bucket=bucket, Key="disk.raw", Body=data)
    settings = ReaderSettings(parallel=16, range_size=RS, stall_seconds=5)
    reader = open_reader({"bucket": bucket, "key": "disk.raw"}, s3_policy, s3cfg, settings=settings)
    assert reader.origin.client.meta.config.max_pool_connections == 18  # type: ignore[attr-defined]
    assert reader.origin.client.meta.config.read_timeout == 5  # type: ignore[attr-defined]
    assert read_all(reader) == data
    assert reader.stats.peak_buffered <= 17 * RS


def test_s3_ranges_read_one_after_the_other_share_one_connection(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    # the ranges are received under botocore (S3Stream.fill): a range read to its end must give its
    # connection back to the client's pool as botocore's own reads do, not cost a TCP (and TLS)
    # setup per range. moto closes every connection, so the object store here is the loopback
    # server, which keeps them open (path-style GETs of /bucket/key; it checks no signature).
    data = os.urandom(12 * RS)
    server.add("/bucket/disk.raw", data)
    s3cfg = {"endpoint_url": server.endpoint, "region": "us-east-1", "access_key": "a", "secret_key": "s"}
    settings = dataclasses.replace(SETTINGS, parallel=1)
    reader = open_reader({"bucket": "bucket", "key": "disk.raw"}, http_policy, s3cfg, settings=settings)
    with NetworkRecorder() as net:
        assert read_all(reader) == data
    assert reader.stats.requests == 12
    assert all(r.headers["If-Match"] for r in server.hits("/bucket/disk.raw")[1:])
    assert len(net.connected_hosts()) <= 2  # the first answer's, and one for the ranges after it


# ------------------------------------------------------------------- size bounds, hostile origins
#
# The download limit is ``settings.max_size``. An origin that lies about what it sends (a Content-Range
# other than the range asked, beyond its own total, more bytes than announced) is refused with a
# code, not retried, and nothing of its answer is handed over.

ONE_BY_ONE = dataclasses.replace(SETTINGS, parallel=1)  # requests in a known order, for scripted answers


def hand_over(reader: RangeReader, got: bytearray) -> None:
    """Read everything into ``got`` (what was handed over stays there when the read fails)."""
    with reader:
        while chunk := reader.read(10_000):
            got += chunk


def test_a_source_larger_than_the_cap_is_refused_from_its_content_range_before_its_body_is_read(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(37 * RS + 5)
    server.add("/disk.raw", data)
    settings = dataclasses.replace(SETTINGS, max_size=10 * RS)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=settings)
    got = bytearray()
    with pytest.raises(ImageRejected) as err:
        hand_over(reader, got)
    assert err.value.code == "SizeLimitExceeded.Download"
    assert f"({len(data)} bytes)" in err.value.message and f"limit of {10 * RS} bytes" in err.value.message
    assert (got, reader.stats.received) == (bytearray(), 0)  # refused on the headers
    assert len(server.hits("/disk.raw")) == 1


def test_a_whole_answer_larger_than_the_cap_is_refused_from_its_content_length(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(12 * RS)
    server.add("/disk.raw", data, honour_range=False)
    settings = dataclasses.replace(SETTINGS, max_size=10 * RS)
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=settings)
    got = bytearray()
    with pytest.raises(ImageRejected) as err:
        hand_over(reader, got)
    assert err.value.code == "SizeLimitExceeded.Download"
    assert (got, reader.stats.received) == (bytearray(), 0)


def test_a_source_without_a_size_is_cut_off_at_the_cap_while_it_streams(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(12 * RS)
    server.add("/disk.raw", data, honour_range=False, send_length=False)
    cap = 5 * RS + 3
    reader = open_reader(
        {"url": server.url("/disk.raw")}, http_policy, settings=dataclasses.replace(SETTINGS, max_size=cap)
    )
    got = bytearray()
    with pytest.raises(ImageRejected) as err:
        hand_over(reader, got)
    assert err.value.code == "SizeLimitExceeded.Download"
    assert len(got) <= cap and bytes(got) == data[: len(got)]
    # the same source under a cap it fits in reads back whole
    exact = dataclasses.replace(SETTINGS, max_size=len(data))
    fits = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=exact)
    assert read_all(fits) == data


def test_a_first_answer_with_another_range_than_asked_is_refused(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(8 * RS)
    server.add("/disk.raw", data).script.append(f"content-range:bytes 0-99/{len(data)}")
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    with pytest.raises(SourceIntegrity, match=rf"answered bytes 0-99 for a request of bytes 0-{RS - 1}"):
        read_all(reader)
    assert len(server.hits("/disk.raw")) == 1  # not retried


def test_a_content_range_beyond_its_own_total_is_refused(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    # the origin says the object is 100 bytes long, and sends a whole range of it
    data = os.urandom(8 * RS)
    server.add("/disk.raw", data).script.append(f"content-range:bytes 0-{RS - 1}/100")
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    with pytest.raises(SourceIntegrity, match="impossible Content-Range"):
        read_all(reader)


def test_a_later_range_answered_with_another_range_is_refused_and_nothing_of_it_is_handed_over(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(8 * RS)
    # the second range (bytes RS..2RS-1) is answered with the first range's header
    server.add("/disk.raw", data).script.extend(["ok", f"content-range:bytes 0-{RS - 1}/{len(data)}"])
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    got = bytearray()
    with pytest.raises(SourceIntegrity, match=rf"for a request of bytes {RS}-{2 * RS - 1}"):
        hand_over(reader, got)
    assert bytes(got) == data[:RS]


def test_a_range_with_more_bytes_than_it_announces_is_refused(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(8 * RS)
    server.add("/disk.raw", data).script.extend(["ok", "pad:4096"])  # range 2: RS + 4 KiB bytes
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    got = bytearray()
    announced = rf"announced {RS + 4096} bytes for the range {RS}-{2 * RS - 1}"
    with pytest.raises(SourceIntegrity, match=announced):
        hand_over(reader, got)
    assert bytes(got) == data[:RS]


def test_a_range_that_goes_on_past_its_end_without_a_length_is_refused(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(8 * RS)
    route = server.add("/disk.raw", data, send_length=False)  # bodies end when the connection closes
    route.script.extend(["ok", "pad:1"])  # range 2: one byte more than asked
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    got = bytearray()
    with pytest.raises(SourceIntegrity, match=rf"sent more than the range at {RS}"):
        hand_over(reader, got)
    assert bytes(got) == data[:RS]


def test_a_short_range_is_retried_for_its_remainder(server: TestHTTPServer, http_policy: UrlPolicy) -> None:
    data = os.urandom(6 * RS)
    server.add("/disk.raw", data).script.extend(["ok", "short:1000"])
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    assert read_all(reader) == data
    assert reader.stats.retries == 1
    ranges = [h.headers["Range"] for h in server.hits("/disk.raw")]
    retry_start, retry_end = map(int, ranges[2].removeprefix("bytes=").split("-"))
    assert RS <= retry_start <= RS + 1000 and retry_end == 2 * RS - 1  # the same range, what is missing


def test_a_range_short_on_every_attempt_fails_with_a_code_after_its_retries(
    server: TestHTTPServer, http_policy: UrlPolicy
) -> None:
    data = os.urandom(6 * RS)
    server.add("/disk.raw", data).script.extend(["ok"] + ["short:1000"] * (ONE_BY_ONE.retries + 1))
    reader = open_reader({"url": server.url("/disk.raw")}, http_policy, settings=ONE_BY_ONE)
    got = bytearray()
    with pytest.raises(SourceUnavailable) as err:
        hand_over(reader, got)
    assert err.value.code == "SourceUnavailable" and err.value.transient
    assert reader.stats.retries == ONE_BY_ONE.retries
    assert bytes(got) == data[:RS]  # the first range; nothing of the short one


# ------------------------------------------------------------------------- holds at an object offset


def test_a_parallel_ranged_read_through_the_proxy_is_held_at_the_armed_offset_of_the_object(
    moto: MotoServer, bucket: str, s3cfg: dict, proxy: StallingProxy
) -> None:
    # what the crash matrix relies on: a hold names a byte of the object, whichever GET carries it
    data = os.urandom(20 * RS)
    moto.client("s3").put_object(Bucket=bucket, Key="disk.raw", Body=data)
    proxy.arm("/disk.raw", after=5 * RS + 100)
    reader = open_reader(
        {"bucket": bucket, "key": "disk.raw"},
        UrlPolicy(allowed_endpoints=[proxy.endpoint]),
        {**s3cfg, "endpoint_url": proxy.endpoint},
        settings=dataclasses.replace(SETTINGS, stall_seconds=60),
    )
    got = bytearray()
    outcome: list[BaseException] = []

    def consume() -> None:
        try:
            hand_over(reader, got)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        wait_until(
            lambda: proxy.stalled_on("/disk.raw") == 1 and len(got) == 5 * RS,
            what="the read to be held",
            interval=0.01,
        )
        # the ranges before the held one were handed over, the ranges fetched ahead of it were not held
        assert bytes(got) == data[: 5 * RS]
        assert thread.is_alive()
    finally:
        proxy.release()
        thread.join(timeout=60)
    assert not outcome and bytes(got) == data
    assert proxy.stalled_on("/disk.raw") == 1  # one GET held: the one of the range holding the offset
