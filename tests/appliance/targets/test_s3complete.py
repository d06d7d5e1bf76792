"""The checks of a completed multipart object (appliance.targets.s3complete), through the streamed
writer against a moto server process: the completed object's ETag is S3's multipart form of the parts
sent, its composite checksum theirs; an object that fails either is deleted, nothing is left."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import pytest

from appliance.targets.base import TargetError
from appliance.targets.s3parts import multipart_etag
from appliance.targets.s3stream import MultipartWriter
from tests.appliance.targets.test_diskexport import leftovers, s3

MiB = 1 << 20


def test_the_multipart_etag_is_what_s3_computes(moto, bucket: str) -> None:
    data = os.urandom(11 * MiB)
    with MultipartWriter(s3(moto), bucket, "k", part_size=5 * MiB) as w:
        w.write(data)
        done = w.close()
    md5s = [hashlib.md5(data[i : i + 5 * MiB]).digest() for i in range(0, len(data), 5 * MiB)]
    head = moto.client("s3").head_object(Bucket=bucket, Key="k")
    assert multipart_etag(md5s).endswith("-3") and done["parts"] == 3
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest() == done["sha256"]


def test_a_completed_object_whose_etag_is_not_of_the_parts_sent_fails_and_is_deleted(
    moto, bucket: str
) -> None:
    # fault injection around a real client: S3 completes the object and answers another ETag for it
    client = s3(moto)
    real_complete = client.complete_multipart_upload

    def complete(**kw: Any) -> Any:
        return {**real_complete(**kw), "ETag": '"00000000000000000000000000000000-2"'}

    client.complete_multipart_upload = complete
    with pytest.raises(TargetError) as exc, MultipartWriter(client, bucket, "k", part_size=5 * MiB) as w:
        w.write(os.urandom(6 * MiB))
        w.close()
    assert exc.value.code == "UploadFailed" and "for the completed object" in exc.value.message
    assert leftovers(moto, bucket) == (0, [])  # the object that was completed is gone again


def test_a_store_reporting_another_composite_checksum_than_the_parts_sent_fails_and_leaves_nothing(
    moto, bucket: str
) -> None:
    client = s3(moto)
    real_head = client.head_object
    other = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()

    def head_object(**kw: Any) -> Any:
        answer = real_head(**kw)
        return {**answer, "ChecksumSHA256": f"{other}-2"} if kw.get("ChecksumMode") else answer

    client.head_object = head_object
    with (
        pytest.raises(TargetError) as exc,
        MultipartWriter(client, bucket, "k", part_size=5 * MiB, checksums=True, full_sha256=False) as w,
    ):
        w.write(os.urandom(6 * MiB))
        w.close()
    assert exc.value.code == "UploadFailed" and f"S3 reports the checksum {other}-2" in exc.value.message
    assert leftovers(moto, bucket) == (0, [])
