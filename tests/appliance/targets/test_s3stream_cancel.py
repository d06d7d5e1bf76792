"""A streamed multipart upload (:class:`appliance.targets.s3stream.MultipartWriter`) cancelled while S3
does not answer one of its parts: it stops and aborts the upload without waiting for that part, whose
thread does not hold the process (a suspended task's child must exit within the worker's grace).

The part is held by :class:`~tests.stallproxy.StallingProxy` in front of the moto server, for as long as
the test wants: a connection S3 stopped answering.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from typing import Any

import boto3
import botocore.config
import pytest

from appliance.errors import Cancelled
from appliance.targets.s3stream import MultipartWriter
from tests.processes import wait_until
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy

MiB = 1 << 20


def client_of(endpoint: str) -> Any:
    # a read timeout far beyond the test's deadline: only the writer's own stop can end the wait
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(read_timeout=900, retries={"max_attempts": 1}),
    )


@pytest.mark.parametrize("waiting_in", ["write", "close"])
def test_a_cancel_while_s3_does_not_answer_a_part_aborts_the_upload_without_waiting_for_it(
    moto: MotoServer, waiting_in: str
) -> None:
    s3 = moto.client("s3")
    bucket, key = f"cancel-{uuid.uuid4().hex[:12]}", "disk.raw"
    s3.create_bucket(Bucket=bucket)
    # write: the writer waits for a free slot (one part in flight at most); close: for the last parts
    threads = 1 if waiting_in == "write" else 4
    cancel = threading.Event()
    errors: list[BaseException] = []
    before = set(threading.enumerate())
    with StallingProxy(moto.endpoint) as proxy:
        held = proxy.arm_request("PUT", "partNumber=2", f"/{bucket}/{key}")
        writer = MultipartWriter(
            client_of(proxy.endpoint), bucket, key, part_size=5 * MiB, threads=threads, cancel=cancel
        )

        def upload() -> None:
            try:
                with writer:
                    for _ in range(4):
                        writer.write(os.urandom(5 * MiB))
                    writer.close()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=upload, daemon=True)
        thread.start()
        [listed] = s3.list_multipart_uploads(Bucket=bucket)["Uploads"]

        def parts() -> int:
            return len(s3.list_parts(Bucket=bucket, Key=key, UploadId=listed["UploadId"]).get("Parts", []))

        wait_until(lambda: proxy.stalled_on(held) == 1 and parts() >= 1, what="part 2 held, part 1 stored")
        if waiting_in == "close":
            wait_until(lambda: parts() == 3, what="parts 1, 3 and 4 stored")
        cancel.set()
        wait_until(lambda: not thread.is_alive(), timeout=60, what="the cancelled writer to stop")
        # stopped while part 2 is still held: the upload is aborted, nothing is in the bucket
        assert proxy.stalled_on(held) == 1
        assert [type(e) for e in errors] == [Cancelled]
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
        # the thread still sending part 2 does not keep a process from exiting
        part_threads = [t for t in set(threading.enumerate()) - before if t.name.startswith("s3-part")]
        assert part_threads and all(t.daemon for t in part_threads)
        proxy.release(held)  # S3 answers the part at last: it belongs to no upload any more
        wait_until(lambda: not any(t.is_alive() for t in part_threads), what="the part's thread to end")
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


class LateStoringS3:
    """The moto server's client, but for what moto cannot do: S3 may still store a part that was in
    flight when its upload was aborted (its documentation says to abort again to free that part's
    bytes; moto refuses such a part). Part 2 is held until ``land`` is set, then "stored": answered with
    its MD5 as ETag, as S3 answers a stored part. Every AbortMultipartUpload is recorded and passed on."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.land = threading.Event()
        self.held = threading.Event()
        self.aborts: list[tuple[str, bool]] = []  # (upload id, whether part 2 had landed)
        self.landed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def upload_part(self, **kw: Any) -> dict[str, Any]:
        if kw["PartNumber"] != 2:
            return self.client.upload_part(**kw)
        self.held.set()
        self.land.wait(60)
        self.landed = True
        return {"ETag": '"' + hashlib.md5(kw["Body"]).hexdigest() + '"'}

    def abort_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.aborts.append((kw["UploadId"], self.landed))
        return self.client.abort_multipart_upload(**kw)


def test_a_part_that_lands_after_the_abort_makes_the_upload_abort_again(moto: MotoServer) -> None:
    s3 = moto.client("s3")
    bucket, key = f"late-{uuid.uuid4().hex[:12]}", "disk.raw"
    s3.create_bucket(Bucket=bucket)
    client = LateStoringS3(s3)
    cancel = threading.Event()
    writer = MultipartWriter(client, bucket, key, part_size=5 * MiB, threads=2, cancel=cancel)
    failed: list[BaseException] = []

    def upload() -> None:
        try:
            with writer:
                for _ in range(3):
                    writer.write(os.urandom(5 * MiB))
                writer.close()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    assert client.held.wait(60)
    cancel.set()
    wait_until(lambda: not thread.is_alive(), timeout=60, what="the cancelled writer to stop")
    # aborted at once, part 2 still in flight (another part that S3 answered only after the abort, as
    # part 3 may be, aborts it again too: the same upload)
    upload_id, landed = client.aborts[0]
    assert not landed and [type(e) for e in failed] == [Cancelled]
    assert {u for u, _ in client.aborts} == {upload_id} and not any(landed for _, landed in client.aborts)
    client.land.set()
    wait_until(
        lambda: any(landed for _, landed in client.aborts), what="the upload aborted again once part 2 landed"
    )
    assert {u for u, _ in client.aborts} == {upload_id}
