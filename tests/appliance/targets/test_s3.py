"""S3 image target against a moto server process (small objects: moto keeps them in memory)."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance import config
from appliance.errors import Cancelled, ConfigError, LeaseLost
from appliance.targets import TargetError, get_image_target
from appliance.targets import s3 as s3_target
from appliance.targets.chunkdigest import digest_file
from appliance.targets.encryption import Encryption
from appliance.targets.s3 import S3ImageTarget
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY

MiB = 1024 * 1024


@pytest.fixture
def bucket(moto) -> str:
    name = f"img-target-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


def settings(moto, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "s3",
        "bucket": bucket,
        "prefix": "images/",
        "endpoint_url": moto.endpoint,
        "region": REGION,
        "access_key": TEST_ACCESS_KEY,
        "secret_key": TEST_SECRET_KEY,
        "addressing_style": "path",
        "part_size": "5MiB",
        "threads": 2,
        **extra,
    }


def write_source(path: Path, size: int, data_bytes: int) -> bytes:
    """``data_bytes`` of random data at the start, the rest a hole; returns the content."""
    with open(path, "wb") as f:
        f.write(os.urandom(data_bytes))
        f.truncate(size)
    return path.read_bytes()


def open_uploads(moto, bucket: str) -> list[dict[str, Any]]:
    return moto.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_multipart_upload_carries_sha256_metadata(tmp_path: Path, moto, bucket: str) -> None:
    cfg = config.from_dict({"state_dir": str(tmp_path), "targets": {"image": settings(moto, bucket)}})
    target = get_image_target(cfg)
    src = tmp_path / "disk.raw"
    expected = write_source(src, 12 * MiB, 7 * MiB)
    progress = []
    loc = target.store("import-ami-0123456789abcdef0", src, format="raw", on_progress=progress.append)
    sha = hashlib.sha256(expected).hexdigest()
    assert loc["bucket"] == bucket and loc["key"] == "images/import-ami-0123456789abcdef0.raw"
    assert loc["sha256"] == sha and loc["size"] == 12 * MiB and loc["type"] == "s3"
    assert loc["etag"].strip('"').endswith("-3")  # three 5 MiB-or-less parts: it was a multipart upload
    obj = moto.client("s3").get_object(Bucket=bucket, Key=loc["key"])
    body = obj["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha
    # the sha256-chunked as well, as a streamed import records it (an export's source check uses it)
    chunked = digest_file(src)
    assert loc["digest"]["value"] == chunked.hexdigest and loc["digest"]["chunks"] == chunked.chunks
    assert obj["Metadata"] == {
        "sha256": sha,
        "sha256-chunked": chunked.hexdigest,
        "digest-algorithm": "sha256-chunked",
        "digest-chunk-size": str(chunked.chunk_size),
        "digest-chunks": str(chunked.chunks),
    }
    assert progress[-1].done == 12 * MiB and progress[-1].phase == "uploading"
    assert open_uploads(moto, bucket) == []

    target.delete(loc)
    assert moto.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    target.delete(loc)  # already gone: fine


def test_small_image_goes_up_in_one_put(tmp_path: Path, moto, bucket: str) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket, prefix=""))
    src = tmp_path / "small.qcow2"
    expected = write_source(src, 2 * MiB, MiB)
    loc = target.store("import-snap-0123456789abcdef0", src, format="qcow2")
    assert loc["key"] == "import-snap-0123456789abcdef0.qcow2" and "-" not in loc["etag"]
    head = moto.client("s3").head_object(Bucket=bucket, Key=loc["key"])
    assert head["Metadata"]["sha256"] == hashlib.sha256(expected).hexdigest() == loc["sha256"]
    assert head["ContentLength"] == 2 * MiB


def test_cancel_between_parts_aborts_the_upload(tmp_path: Path, moto, bucket: str) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    src = tmp_path / "disk.raw"
    write_source(src, 16 * MiB, 16 * MiB)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        # the first progress report comes once the first part is on its way
        target.store("import-ami-1", src, format="raw", on_progress=lambda p: cancel.set(), cancel=cancel)
    assert open_uploads(moto, bucket) == []
    assert moto.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_failure_midway_aborts_the_upload(tmp_path: Path, moto, bucket: str) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    src = tmp_path / "disk.raw"
    write_source(src, 16 * MiB, 16 * MiB)

    def shrink_source(_progress: object) -> None:
        # the file changes under the upload once it has started: it must not complete
        with open(src, "r+b") as f:
            f.truncate(6 * MiB)

    with pytest.raises(TargetError) as exc:
        target.store("import-ami-2", src, format="raw", on_progress=shrink_source)
    assert exc.value.code == "UploadFailed"
    assert open_uploads(moto, bucket) == []
    assert moto.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_missing_bucket_is_upload_failed(tmp_path: Path, moto) -> None:
    target = S3ImageTarget.from_settings(settings(moto, "no-such-bucket-here"))
    src = tmp_path / "disk.raw"
    write_source(src, MiB, MiB)
    with pytest.raises(TargetError) as exc:
        target.store("import-ami-3", src, format="raw")
    assert exc.value.code == "UploadFailed" and "NoSuchBucket" in exc.value.message


def test_delete_aborts_upload_left_by_a_dead_worker(moto, bucket: str) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    key = target.key_for("import-ami-4", "raw")
    moto.client("s3").create_multipart_upload(Bucket=bucket, Key=key)
    assert len(open_uploads(moto, bucket)) == 1
    target.delete({"type": "s3", "bucket": bucket, "key": key})
    assert open_uploads(moto, bucket) == []


def test_settings_errors_name_the_key(moto) -> None:
    with pytest.raises(ConfigError) as exc:
        S3ImageTarget.from_settings(settings(moto, "ok-bucket", part_size="1MiB"))
    assert "targets.image.part_size" in exc.value.message
    with pytest.raises(ConfigError) as exc:
        S3ImageTarget.from_settings(settings(moto, "Bad_Bucket"))
    assert "targets.image.bucket" in exc.value.message
    assert "secret_key" not in S3ImageTarget.from_settings(settings(moto, "ok-bucket")).describe()


KMS_KEY = "arn:aws:kms:us-east-1:012345678910:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def sse_headers(moto, bucket: str, key: str) -> tuple[str | None, str | None]:
    """(ServerSideEncryption, SSEKMSKeyId) of the stored object, as S3 itself reports them."""
    head = moto.client("s3").head_object(Bucket=bucket, Key=key)
    return head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")


def test_encrypted_put_is_stored_with_aes256_and_records_it(tmp_path: Path, moto, bucket: str) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    src = tmp_path / "small.raw"
    write_source(src, 2 * MiB, MiB)
    loc = target.store("import-snap-0123456789abcdef1", src, format="raw", encryption=Encryption("AES256"))
    assert "-" not in loc["etag"]  # one PUT
    assert sse_headers(moto, bucket, loc["key"]) == ("AES256", None)
    assert loc["encryption"] == {"algorithm": "AES256", "kms_key_id": None}


def test_multipart_upload_with_a_kms_key_is_stored_under_that_key(tmp_path: Path, moto, bucket: str) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    src = tmp_path / "disk.raw"
    expected = write_source(src, 12 * MiB, 12 * MiB)
    loc = target.store(
        "import-snap-0123456789abcdef2", src, format="raw", encryption=Encryption("aws:kms", KMS_KEY)
    )
    assert loc["etag"].strip('"').endswith("-3")  # a multipart upload
    assert sse_headers(moto, bucket, loc["key"]) == ("aws:kms", KMS_KEY)
    assert loc["encryption"] == {"algorithm": "aws:kms", "kms_key_id": KMS_KEY}
    body = moto.client("s3").get_object(Bucket=bucket, Key=loc["key"])["Body"].read()
    assert body == expected


def test_an_unencrypted_store_records_what_the_bucket_applied(tmp_path: Path, moto, bucket: str) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    src = tmp_path / "disk.raw"
    write_source(src, MiB, MiB)
    loc = target.store("import-snap-0123456789abcdef3", src, format="raw")
    assert sse_headers(moto, bucket, loc["key"]) == (None, None)
    assert loc["encryption"] is None
    # a bucket that encrypts by default: the object is encrypted, and the location says so
    moto.client("s3").put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    loc = target.store("import-snap-0123456789abcdef4", src, format="raw")
    assert sse_headers(moto, bucket, loc["key"]) == ("AES256", None)
    assert loc["encryption"] == {"algorithm": "AES256", "kms_key_id": None}


@pytest.mark.parametrize("size", [MiB, 12 * MiB], ids=["put", "multipart"])
def test_a_store_that_ignores_the_encryption_headers_fails_and_keeps_no_object(
    tmp_path: Path, moto, bucket: str, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    # moto applies what it is asked; an S3-compatible store that silently drops the
    # x-amz-server-side-encryption headers cannot run here, so the target is made to leave them out
    monkeypatch.setattr(s3_target, "sse_arguments", lambda encryption: {})
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    src = tmp_path / "disk.raw"
    write_source(src, size, size)
    with pytest.raises(TargetError) as exc:
        target.store(
            "import-snap-0123456789abcdef5", src, format="raw", encryption=Encryption("aws:kms", KMS_KEY)
        )
    assert exc.value.code == "EncryptionNotApplied"
    assert "stored with no encryption although aws:kms with key" in exc.value.message
    assert "the object was deleted" in exc.value.message
    assert moto.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert open_uploads(moto, bucket) == []


@pytest.mark.parametrize("size", [2 * MiB, 12 * MiB], ids=["put", "multipart"])
def test_an_image_whose_run_lost_its_lease_is_not_uploaded(
    tmp_path: Path, moto, bucket: str, size: int
) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    src = tmp_path / "disk.raw"
    write_source(src, size, MiB)

    def fence() -> None:
        raise LeaseLost("task t-0: another worker owns it now")

    with pytest.raises(LeaseLost):
        target.store("import-snap-0123456789abcdef0", src, format="raw", fence=fence)
    assert moto.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert open_uploads(moto, bucket) == []
