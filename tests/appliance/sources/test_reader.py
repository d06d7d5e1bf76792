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

import pytest

from appliance import config
from appliance.errors import ConfigError, SourceChanged
from appliance.sources.http import HttpClient
from appliance.sources.ranges import ReaderSettings, ReadPosition
from appliance.sources.reader import open_reader
from appliance.sources.urlfilter import UrlNotAllowed, UrlPolicy
from tests.httpfixtures import NetworkRecorder, TestHTTPServer
from tests.processes import wait_until
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy

from .rangereads import RS, SETTINGS, hand_over, read_all

SIZES = {"empty": 0, "one": 1, "range-1": RS - 1, "range": RS, "range+1": RS + 1, "many": 37 * RS + 5}


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
