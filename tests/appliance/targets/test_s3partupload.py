"""One part of a multipart upload sent and checked (appliance.targets.s3partupload), through the
streamed writer against a moto server process: a part S3 acknowledges with another ETag than its MD5
fails the upload, and nothing is left."""

from __future__ import annotations

import os
from typing import Any

import pytest

from appliance.targets.base import TargetError
from appliance.targets.s3stream import MultipartWriter
from tests.appliance.targets.test_diskexport import leftovers, s3

MiB = 1 << 20


def test_a_part_whose_etag_is_not_its_md5_fails_the_upload(moto, bucket: str) -> None:
    # fault injection around a real client: S3 answers a different ETag for part 1
    client = s3(moto)
    real_upload = client.upload_part

    def upload_part(**kw: Any) -> Any:
        answer = real_upload(**kw)
        return {**answer, "ETag": '"00000000000000000000000000000000"'}

    client.upload_part = upload_part
    with pytest.raises(TargetError) as exc, MultipartWriter(client, bucket, "bad", part_size=5 * MiB) as w:
        w.write(os.urandom(6 * MiB))
        w.close()
    assert exc.value.code == "UploadFailed" and "MD5" in exc.value.message
    assert leftovers(moto, bucket) == (0, [])
