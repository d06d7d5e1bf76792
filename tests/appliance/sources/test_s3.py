"""S3 sources — s3:// URLs and UserBucket — against the moto server (appliance.sources.s3)."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path

import pytest

from appliance.errors import Cancelled
from appliance.sources.fetch import fetch_to_file
from appliance.sources.http import SourceUnavailable
from appliance.sources.httpio import direct_readinto
from appliance.sources.s3 import head_object, open_object, s3_client
from appliance.sources.s3names import InvalidS3Name
from appliance.sources.urlfilter import UrlNotAllowed, UrlPolicy
from tests.httpfixtures import TestHTTPServer
from tests.servers import MotoServer, free_port
from tests.stallproxy import StallingProxy

DATA = os.urandom(3 * 2**20 + 99)


@pytest.fixture
def policy(moto: MotoServer) -> UrlPolicy:
    return UrlPolicy(allowed_endpoints=[moto.endpoint])


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"user-{uuid.uuid4().hex[:12]}"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="images/disk.raw", Body=DATA)
    return name


def test_client_uses_path_addressing_and_sigv4_for_a_custom_endpoint(s3cfg: dict, policy: UrlPolicy) -> None:
    client = s3_client(s3cfg, policy)
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.config.signature_version == "s3v4"
    assert client.meta.endpoint_url == s3cfg["endpoint_url"]


def test_endpoint_must_pass_the_policy(s3cfg: dict) -> None:
    with pytest.raises(UrlNotAllowed, match="loopback"):
        s3_client(s3cfg, UrlPolicy(allowed_ports=range(1, 65536)))


def test_head_and_ranged_read(s3cfg: dict, policy: UrlPolicy, bucket: str) -> None:
    client = s3_client(s3cfg, policy)
    info = head_object(client, bucket, "images/disk.raw")
    assert info.size == len(DATA)
    assert info.etag == hashlib.md5(DATA).hexdigest()
    with open_object(client, bucket, "images/disk.raw", (100, 199)) as stream:
        assert stream.status == 206
        assert b"".join(stream.iter_chunks()) == DATA[100:200]
    with open_object(client, bucket, "images/disk.raw") as stream:
        assert stream.content_length == len(DATA)
        assert b"".join(stream.iter_chunks(65536)) == DATA


@pytest.mark.parametrize(
    "source",
    [
        lambda b: {"bucket": b, "key": "images/disk.raw"},  # UserBucket
        lambda b: {"url": f"s3://{b}/images/disk.raw"},
    ],
    ids=["user-bucket", "s3-url"],
)
def test_fetches_s3_sources(s3cfg: dict, policy: UrlPolicy, bucket: str, tmp_path: Path, source) -> None:
    result = fetch_to_file(source(bucket), tmp_path / "disk", policy, s3cfg, max_bytes=2**30)
    assert result.size == len(DATA)
    assert result.sha256 == hashlib.sha256(DATA).hexdigest()
    assert result.etag == hashlib.md5(DATA).hexdigest()
    assert (tmp_path / "disk").read_bytes() == DATA


def test_missing_key_is_source_unavailable(
    s3cfg: dict, policy: UrlPolicy, bucket: str, tmp_path: Path
) -> None:
    client = s3_client(s3cfg, policy)
    for attempt in (
        lambda: head_object(client, bucket, "nope.raw"),
        lambda: open_object(client, bucket, "nope.raw"),
        lambda: fetch_to_file(
            {"bucket": bucket, "key": "nope.raw"}, tmp_path / "d", policy, s3cfg, max_bytes=10
        ),
    ):
        with pytest.raises(SourceUnavailable) as err:
            attempt()
        assert err.value.code == "SourceUnavailable" and err.value.status == 404
        assert f"s3://{bucket}/nope.raw does not exist. Reason 404 Not Found" in err.value.message
    assert not (tmp_path / "d").exists()


def test_missing_bucket_is_named(s3cfg: dict, policy: UrlPolicy) -> None:
    client = s3_client(s3cfg, policy)
    for attempt in (
        lambda: head_object(client, "no-such-bkt", "k"),
        lambda: open_object(client, "no-such-bkt", "k"),
    ):
        with pytest.raises(SourceUnavailable, match="The S3 bucket 'no-such-bkt' does not exist"):
            attempt()


def test_access_denied_is_an_actionable_403() -> None:
    # an S3-compatible endpoint that refuses the appliance's credentials
    with TestHTTPServer() as srv:
        body = (
            b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        )
        srv.add("/private-bkt/disk.raw", body, status=403, headers={"Content-Type": "application/xml"})
        policy = UrlPolicy(allowed_endpoints=[srv.endpoint])
        cfg = {"endpoint_url": srv.endpoint, "access_key": "AKIAEXAMPLE", "secret_key": "secret"}
        with pytest.raises(SourceUnavailable) as err:
            open_object(s3_client(cfg, policy, retries=0), "private-bkt", "disk.raw")
    assert err.value.status == 403
    assert err.value.message.startswith(
        "Disk validation failed [We do not have access to the given resource. Reason 403 Forbidden]"
    )
    assert "s3:GetObject on s3://private-bkt/disk.raw" in err.value.message


# -- names S3 refuses never reach a task as botocore's text (issue 10, item 9) ---------------------


@pytest.mark.parametrize("name", ["bad bucket", ""])
def test_a_bucket_name_botocore_refuses_is_a_coded_error_without_its_text(
    s3cfg: dict, policy: UrlPolicy, name: str
) -> None:
    client = s3_client(s3cfg, policy)
    for attempt in (lambda: head_object(client, name, "k"), lambda: open_object(client, name, "k")):
        with pytest.raises(InvalidS3Name) as err:
            attempt()
        assert err.value.code == "InvalidParameterValue"
        assert err.value.message.startswith("Disk validation failed [Invalid S3 source location s3://")
        assert "Parameter validation failed" not in err.value.message and "regex" not in err.value.message


def test_missing_credentials_are_a_coded_error_without_botocore_text(
    moto: MotoServer, policy: UrlPolicy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = s3_client({"endpoint_url": moto.endpoint}, policy, retries=0)
    with pytest.raises(SourceUnavailable) as err:
        head_object(client, bucket, "images/disk.raw")
    assert "sources.s3.access_key" in err.value.message
    assert "Unable to locate credentials" not in err.value.message


@pytest.mark.parametrize(
    ("source", "member"),
    [
        ({"bucket": "Bad_Bucket", "key": "images/disk.raw"}, "S3Bucket"),
        ({"bucket": "ok-bucket", "key": "../other-bucket/secret"}, "S3Key"),
        ({"url": "s3://Bad_Bucket/images/disk.raw"}, "bucket"),
        ({"url": "s3://ok-bucket/a/../../other-bucket/secret"}, "object key"),
    ],
)
def test_fetch_refuses_names_s3_would_refuse_before_any_request(
    s3cfg: dict, policy: UrlPolicy, tmp_path: Path, source: dict, member: str
) -> None:
    # a task submitted without the API (imaging run) gets the same coded error as at submit
    with pytest.raises((InvalidS3Name, UrlNotAllowed)) as err:
        fetch_to_file(source, tmp_path / "disk", policy, s3cfg, max_bytes=2**30)
    assert member in err.value.message and "not a valid S3" in err.value.message
    assert not (tmp_path / "disk").exists()


def test_an_unreachable_object_store_is_described_without_botocore_text() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = s3_client(
        {"endpoint_url": endpoint, "access_key": "a", "secret_key": "b"},
        UrlPolicy(allowed_endpoints=[endpoint]),
        retries=0,
    )
    with pytest.raises(SourceUnavailable) as err:
        head_object(client, "bucket", "disk.raw")
    assert err.value.message == (
        f"cannot reach the object store at {endpoint}: connection refused; check sources.s3.endpoint_url "
        "and that the object store is running"
    )


def test_cancel_ends_a_read_the_object_store_stopped_answering(
    s3cfg: dict, bucket: str, moto: MotoServer
) -> None:
    # The proxy holds the body after 1 MiB until it is released, so the read is blocked for good. Only
    # the cancel (shutting the connection down) can end it as Cancelled: at the read timeout (30 s) it
    # would end as TransferInterrupted.
    with StallingProxy(moto.endpoint) as proxy:
        proxy.arm("/images/disk.raw", after=2**20)
        client = s3_client(
            {**s3cfg, "endpoint_url": proxy.endpoint},
            UrlPolicy(allowed_endpoints=[proxy.endpoint]),
            read_timeout=30,
            retries=0,
        )
        cancel = threading.Event()
        outcome: list[BaseException] = []
        received: list[int] = []

        def consume() -> None:
            try:
                with open_object(client, bucket, "images/disk.raw", cancel=cancel) as stream:
                    for chunk in stream.iter_chunks(65536):
                        received.append(len(chunk))
            except BaseException as exc:
                outcome.append(exc)

        reader = threading.Thread(target=consume)
        reader.start()
        try:
            while proxy.stalled == 0 and reader.is_alive():  # the proxy counts the GET it holds
                reader.join(0.05)
            assert proxy.stalled == 1
            cancel.set()
            reader.join()
        finally:
            proxy.release()
            reader.join()
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
    assert sum(received) <= 2**20


def test_fill_of_a_plain_s3_body_receives_from_the_socket_under_botocore() -> None:
    # botocore's readinto is urllib3's (a read plus a copy): S3Stream.fill goes to the http.client
    # response under it. A botocore or urllib3 that keeps the body elsewhere would make fill fall
    # back silently to the slow path; this says so. The object store is a loopback server answering
    # path-style GETs (it checks no signature).
    data = os.urandom(300_000)
    with TestHTTPServer() as srv:
        srv.add("/bucket/disk.raw", data)
        client = s3_client({"endpoint_url": srv.endpoint, "access_key": "a", "secret_key": "s"},
                           UrlPolicy(allowed_endpoints=[srv.endpoint]))  # fmt: skip
        buf = bytearray(100_000)
        with open_object(client, "bucket", "disk.raw", (1000, 100_999)) as stream:
            raw = stream._body._raw_stream
            assert direct_readinto(raw) == raw._fp.readinto
            assert sum(stream.fill(memoryview(buf), step=8192)) == len(buf)
        assert bytes(buf) == data[1000:101_000]
