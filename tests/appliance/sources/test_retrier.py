"""The retries of a ranged read (appliance.sources.retrier) against real servers: a range that stalls,
breaks, comes short or answers 5xx is retried for what is missing with back-off, up to its K
attempts; the last stall of a range fails with ``Source.Stalled`` naming its offset and the redacted
URL; a cancel ends a read waiting on a stalled range.

Stalls are real: a server that stops sending, and a watchdog (the read timeout) long enough that normal
transfers on a busy machine do not look stalled. Nothing is timed."""

from __future__ import annotations

import os
import threading

import boto3
import botocore.config
import pytest

from appliance.errors import Cancelled, SourceStalled
from appliance.sources.http import SourceUnavailable
from appliance.sources.ranges import ReaderSettings
from appliance.sources.reader import open_reader
from appliance.sources.urlfilter import UrlPolicy
from tests.httpfixtures import TestHTTPServer
from tests.processes import wait_until
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy

from .rangereads import ONE_BY_ONE, RS, hand_over, read_all


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
