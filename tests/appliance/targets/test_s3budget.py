"""The part size and memory bound of a streamed multipart upload (appliance.targets.s3budget), through the
writer against a moto server process: a stream of unknown size doubles its parts, S3 assembles them in
order, and grown parts are fewer in flight."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from appliance.targets import s3budget, s3parts, s3stream
from appliance.targets.s3 import S3ImageTarget
from tests.appliance.targets.test_s3 import settings

MiB = 1 << 20


def test_a_writer_of_unknown_size_grows_its_parts_and_s3_assembles_them_in_order(
    moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3budget, "GROW_EVERY", 1)  # double after every part (1000 in use)
    data = os.urandom(18 * MiB)
    client = S3ImageTarget.from_settings(settings(moto, bucket)).client
    with s3stream.MultipartWriter(
        client, bucket, "grown", part_size=5 * MiB, grow_parts=True, store_digest=False
    ) as w:
        for i in range(0, len(data), MiB):
            w.write(data[i : i + MiB])
        done = w.close()
    pieces = [data[: 5 * MiB], data[5 * MiB : 15 * MiB], data[15 * MiB :]]  # 5, 10, then the rest
    assert done["parts"] == 3
    # S3's ETag of the completed object names the parts as sent: 5 MiB, 10 MiB, then the rest
    assert done["etag"] == s3parts.multipart_etag([hashlib.md5(p).digest() for p in pieces])
    body = moto.client("s3").get_object(Bucket=bucket, Key="grown")["Body"].read()
    assert body == data


def test_grown_parts_of_a_long_stream_are_fewer_in_flight_so_memory_stays_bounded(
    moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3budget, "GROW_EVERY", 1)  # parts of 5, 10, 20 and 40 MiB
    client = S3ImageTarget.from_settings(settings(moto, bucket)).client
    lock = threading.Lock()
    in_flight, peak = [0], [0]

    def sent(params, context, **_) -> None:  # each part takes a while, as on a real network
        context["part_bytes"] = len(params["body"].getbuffer())
        with lock:
            in_flight[0] += context["part_bytes"]
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.3)

    def answered(context, **_) -> None:
        with lock:
            in_flight[0] -= context["part_bytes"]

    client.meta.events.register("before-call.s3.UploadPart", sent)
    client.meta.events.register("after-call.s3.UploadPart", answered)
    data = os.urandom(75 * MiB)
    with s3stream.MultipartWriter(
        client, bucket, "long", part_size=5 * MiB, threads=4, grow_parts=True, store_digest=False
    ) as w:
        for i in range(0, len(data), MiB):
            w.write(data[i : i + MiB])
        done = w.close()
    assert done["parts"] == 4
    # 4 threads x the first 5 MiB, or a single grown part when one is bigger than that: never all
    # four grown parts (75 MiB) at once
    assert peak[0] <= 40 * MiB
    assert moto.client("s3").get_object(Bucket=bucket, Key="long")["Body"].read() == data
