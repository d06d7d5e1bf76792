"""Staged uploads (``PUT /v1/uploads/{id}``) and operator-chosen import methods, as clients see them:
`imaging serve` (gunicorn on loopback) and `imaging worker` as real processes, boto3/botocore signing,
raw sockets for a connection dropped mid-body, disks compared byte for byte."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from appliance.timestamps import format_time, parse_time
from tests import imagefactory as imgs
from tests.api.e2e_support import Appliance, admin_task, conversion_task, running_appliance, wait_for
from tests.httpfixtures import TestHTTPServer
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer

pytestmark = pytest.mark.slow

MiB = 1 << 20


def sources(moto: MotoServer, parts_server: TestHTTPServer, methods: list[str]) -> dict[str, Any]:
    """The ``sources`` section of the e2e appliance with ``methods`` enabled (and, for a PostgreSQL
    store, the uploads' directory marked shared: the test's appliances are on one machine)."""
    return {
        "allowed_endpoints": [moto.endpoint, parts_server.endpoint],
        "manifest_poll_interval": 0.2,
        "manifest_poll_max_interval": 0.5,
        "s3": {
            "endpoint_url": moto.endpoint,
            "region": REGION,
            "access_key": "testing",
            "secret_key": "testing",
        },
        "methods": methods,
        "upload": {"shared": True, "max_size": "64MiB"},
    }


@contextmanager
def appliance_with(
    tmp_path: Path, moto: MotoServer, parts_server: TestHTTPServer, methods: list[str]
) -> Iterator[Appliance]:
    with running_appliance(
        tmp_path, moto, parts_server, extra={"sources": sources(moto, parts_server, methods)}
    ) as app:
        yield app


@pytest.fixture
def uploading(tmp_path: Path, moto: MotoServer, parts_server: TestHTTPServer) -> Iterator[Appliance]:
    with appliance_with(tmp_path, moto, parts_server, ["manifest", "s3", "url", "upload"]) as app:
        yield app


def basic() -> str:
    return "Basic " + base64.b64encode(f"{TEST_ACCESS_KEY}:{TEST_SECRET_KEY}".encode()).decode()


def call(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
            return resp.status, json.loads(data) if data else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def signed_put(
    endpoint: str, upload_id: str, body: bytes, content_range: str | None = None
) -> tuple[int, Any]:
    """A PUT signed as boto3 signs EC2 requests (SigV4, service ec2), the body's SHA-256 signed."""
    url = f"{endpoint}/v1/uploads/{upload_id}"
    headers = {"x-amz-content-sha256": hashlib.sha256(body).hexdigest()}
    if content_range:
        headers["Content-Range"] = content_range
    request = AWSRequest(method="PUT", url=url, data=body, headers=headers)
    SigV4Auth(Credentials(TEST_ACCESS_KEY, TEST_SECRET_KEY), "ec2", REGION).add_auth(request)
    return call("PUT", url, body, dict(request.headers.items()))


def basic_put(
    endpoint: str, upload_id: str, body: bytes, content_range: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": basic(), "Content-Type": "application/octet-stream"}
    if content_range:
        headers["Content-Range"] = content_range
    return call("PUT", f"{endpoint}/v1/uploads/{upload_id}", body, headers)


def status(endpoint: str, upload_id: str) -> tuple[int, Any]:
    return call("GET", f"{endpoint}/v1/uploads/{upload_id}", headers={"Authorization": basic()})


def put_and_drop(endpoint: str, upload_id: str, declared: int, sent: bytes) -> None:
    """A PUT that declares ``declared`` bytes, sends ``sent`` of them and closes the connection."""
    parts = urlsplit(endpoint)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        head = (
            f"PUT /v1/uploads/{upload_id} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: {basic()}\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        )
        sock.sendall(head.encode() + sent)
        sock.shutdown(socket.SHUT_WR)  # the client goes away mid-body


def snapshot_task(ec2: Any, task_id: str) -> dict[str, Any]:
    return ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"][0]


def test_a_boto_signed_upload_in_ranges_is_imported_as_a_snapshot(
    uploading: Appliance, tmp_path: Path
) -> None:
    disk = imgs.raw_mbr(tmp_path, "disk.raw", size=8 * MiB).read_bytes()
    half = len(disk) // 2
    assert signed_put(uploading.endpoint, "disk1", disk[:half], f"bytes 0-{half - 1}/{len(disk)}")[0] == 201
    code, view = signed_put(
        uploading.endpoint, "disk1", disk[half:], f"bytes {half}-{len(disk) - 1}/{len(disk)}"
    )
    assert code == 200 and view["complete"] and view["received"] == len(disk)
    assert view["source"] == "upload://disk1"
    task_id = uploading.ec2.import_snapshot(DiskContainer={"Format": "RAW", "Url": "upload://disk1"})[
        "ImportTaskId"
    ]
    wait_for(
        lambda: (
            snapshot_task(uploading.ec2, task_id)["SnapshotTaskDetail"]["Status"] in ("completed", "deleted")
        ),
        what="the snapshot import to end",
    )
    detail = snapshot_task(uploading.ec2, task_id)["SnapshotTaskDetail"]
    assert detail["Status"] == "completed", detail
    [image] = list((uploading.state / "images").glob(f"{task_id}.*"))
    assert image.read_bytes() == disk


def test_a_signed_body_that_does_not_match_its_hash_is_not_kept(uploading: Appliance) -> None:
    url = f"{uploading.endpoint}/v1/uploads/tampered"
    body = b"x" * 4096
    request = AWSRequest(method="PUT", url=url, data=body, headers={"x-amz-content-sha256": "0" * 64})
    SigV4Auth(Credentials(TEST_ACCESS_KEY, TEST_SECRET_KEY), "ec2", REGION).add_auth(request)
    code, error = call("PUT", url, body, dict(request.headers.items()))
    assert (code, error["error"]["code"]) == (400, "Upload.PayloadMismatch")
    assert status(uploading.endpoint, "tampered")[1]["received"] == 0
    # a wrong secret is refused before any byte is read
    request = AWSRequest(method="PUT", url=url, data=body, headers={"x-amz-content-sha256": "0" * 64})
    SigV4Auth(Credentials(TEST_ACCESS_KEY, "not-the-secret-key"), "ec2", REGION).add_auth(request)
    code, error = call("PUT", url, body, dict(request.headers.items()))
    assert (code, error["error"]["code"]) == (403, "SignatureDoesNotMatch")


def test_an_upload_resumed_after_a_dropped_connection_is_imported_as_a_volume(
    uploading: Appliance, tmp_path: Path
) -> None:
    disk = imgs.raw_mbr(tmp_path, "disk.raw", size=6 * MiB).read_bytes()
    cut = 5 * MiB // 2
    put_and_drop(uploading.endpoint, "vol", len(disk), disk[:cut])
    # what arrived before the connection dropped is kept: the client resumes from there
    wait_for(lambda: status(uploading.endpoint, "vol")[1].get("received") == cut, what="the kept prefix")
    assert not status(uploading.endpoint, "vol")[1]["complete"]
    # a gap is refused, a range that repeats stored bytes is checked against them
    code, error = basic_put(
        uploading.endpoint, "vol", disk[cut + 1 :], f"bytes {cut + 1}-{len(disk) - 1}/{len(disk)}"
    )
    assert (code, error["error"]["code"]) == (416, "Upload.RangeGap")
    forged = b"\xff" * 16 + disk[cut:]
    code, error = basic_put(
        uploading.endpoint, "vol", forged, f"bytes {cut - 16}-{len(disk) - 1}/{len(disk)}"
    )
    assert (code, error["error"]["code"]) == (409, "Upload.RangeMismatch")
    code, view = basic_put(
        uploading.endpoint, "vol", disk[cut - 16 :], f"bytes {cut - 16}-{len(disk) - 1}/{len(disk)}"
    )
    assert code == 200 and view["complete"], view
    task = uploading.ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": len(disk), "ImportManifestUrl": "upload://vol"},
        Volume={"Size": 1},
    )["ConversionTask"]
    task_id = task["ConversionTaskId"]
    wait_for(
        lambda: conversion_task(uploading.ec2, task_id)["State"] in ("completed", "cancelled"),
        what="the volume import to end",
    )
    done = conversion_task(uploading.ec2, task_id)
    assert done["State"] == "completed", done
    assert done["ImportVolume"]["BytesConverted"] == len(disk)
    with open(uploading.volume_file(done["ImportVolume"]["Volume"]["Id"]), "rb") as f:
        assert f.read(len(disk)) == disk
    # the progress of the writing stage: bytes read from the upload and written to the volume; not
    # 100 % there (the volume is flushed by the next step)
    stages = admin_task(uploading, task_id)["progress"]["stages"]
    writing = [s for s in stages if s["phase"] == "writing"][-1]
    assert writing["read"] == writing["written"] == len(disk)
    assert writing["percent"] is not None and writing["percent"] <= 99.0


def test_an_expired_upload_is_removed_by_the_worker(uploading: Appliance, tmp_path: Path) -> None:
    assert basic_put(uploading.endpoint, "old", b"\0" * 4096)[0] == 201
    [meta] = list((uploading.state / "uploads").glob("*/old/meta.json"))
    data = json.loads(meta.read_text())
    assert parse_time(data["expires_at"]) > parse_time(data["created_at"])
    data["expires_at"] = format_time(parse_time(data["created_at"]))  # as if its hours had passed
    meta.write_text(json.dumps(data))
    # an expired upload is gone for clients at once, and its bytes once the worker sweeps
    assert status(uploading.endpoint, "old")[0] == 404
    uploading.worker.terminate()
    uploading.worker.wait()
    uploading.worker = uploading.start_worker()  # the first poll of a worker sweeps
    wait_for(lambda: not meta.parent.exists(), what="the worker to remove the expired upload")
    code, _ = call(
        "PUT",
        f"{uploading.endpoint}/v1/uploads/old",
        b"",
        {"Authorization": basic()},
    )
    assert code == 201  # the id is free again


def test_import_methods_are_listed_and_a_disabled_one_is_refused(
    appliance: Appliance, tmp_path: Path
) -> None:
    # the default methods: upload is not enabled
    code, info = call("GET", f"{appliance.endpoint}/v1/info", headers={"Authorization": basic()})
    assert info["import"]["sources"] == ["manifest", "s3", "url"]
    assert set(info["import"]["methods"]) == {"manifest", "s3", "url"}
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        appliance.ec2.import_snapshot(DiskContainer={"Format": "RAW", "Url": "upload://disk"})
    error = refused.value.response["Error"]
    assert error["Code"] == "UnsupportedOperation" and "import method upload" in error["Message"]
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        appliance.ec2.import_volume(
            AvailabilityZone="us-east-1a",
            Image={"Format": "RAW", "Bytes": 512, "ImportManifestUrl": "upload://disk"},
            Volume={"Size": 1},
            DryRun=True,
        )
    assert refused.value.response["Error"]["Code"] == "UnsupportedOperation"  # not DryRunOperation
    code, error = basic_put(appliance.endpoint, "disk", b"\0" * 512)
    assert (code, error["error"]["code"]) == (403, "ImportMethodDisabled")


def test_an_appliance_with_only_uploads_refuses_s3_and_lists_the_upload_limits(
    tmp_path: Path, moto: MotoServer, parts_server: TestHTTPServer, bucket: str
) -> None:
    with appliance_with(tmp_path, moto, parts_server, ["upload"]) as app:
        info = call("GET", f"{app.endpoint}/v1/info", headers={"Authorization": basic()})[1]
        assert info["import"]["sources"] == ["upload"]
        assert info["import"]["methods"]["upload"]["limits"]["max_size"] == 64 * MiB
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            app.ec2.import_snapshot(
                DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": "k"}}
            )
        error = refused.value.response["Error"]
        assert error["Code"] == "UnsupportedOperation" and "import method s3" in error["Message"]
        # an upload of another id, or not complete, is named as such
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            app.ec2.import_snapshot(DiskContainer={"Format": "RAW", "Url": "upload://nothing"})
        assert refused.value.response["Error"]["Code"] == "InvalidParameterValue"
        assert "no upload 'nothing'" in refused.value.response["Error"]["Message"]
