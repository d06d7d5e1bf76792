"""Encrypted imports as clients see them: boto3 and the AWS CLI → `imaging serve` (gunicorn) → the
worker → the s3 image target on a moto server process. What the appliance reports (Describe*,
``/v1/tasks/{id}``) is checked against the headers S3 itself gives for the stored object."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from tests import guestfactory
from tests.api.awscli_support import AWS, aws_ec2
from tests.api.e2e_support import Appliance, admin_task, wait_for
from tests.servers import MotoServer

pytestmark = pytest.mark.slow


@pytest.fixture
def data_disk(tmp_path: Path, moto: MotoServer, bucket: str) -> str:
    """A RAW data disk (MBR, one ext4 partition) uploaded to ``bucket``; its key."""
    moto.client("s3").upload_file(str(guestfactory.data_disk(tmp_path)), bucket, "disks/data.raw")
    return "disks/data.raw"


def kms_key(moto: MotoServer) -> str:
    """The ARN of a new KMS key on the moto server."""
    return moto.client("kms").create_key(Description="imports")["KeyMetadata"]["Arn"]


def wait_for_snapshot(ec2: Any, task_id: str) -> dict[str, Any]:
    def task() -> dict[str, Any]:
        return ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"][0]

    wait_for(lambda: task()["SnapshotTaskDetail"]["Status"] in ("completed", "error"), what=task_id)
    final = task()
    assert final["SnapshotTaskDetail"]["Status"] == "completed", final
    return final["SnapshotTaskDetail"]


def stored_object(moto: MotoServer, bucket: str, task_id: str) -> tuple[str | None, str | None]:
    """(ServerSideEncryption, SSEKMSKeyId) of the one object the import left in ``bucket``, as S3
    reports them."""
    s3 = moto.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert f"images/{task_id}.raw" in keys, keys
    head = s3.head_object(Bucket=bucket, Key=f"images/{task_id}.raw")
    return head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")


def test_encrypted_import_snapshot_with_a_kms_key_is_stored_sse_kms_and_reported_so(
    s3_appliance: Appliance, moto: MotoServer, bucket: str, image_bucket: str, data_disk: str
) -> None:
    key = kms_key(moto)
    result = s3_appliance.ec2.import_snapshot(
        DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": data_disk}},
        Encrypted=True,
        KmsKeyId=key,
    )
    task_id = result["ImportTaskId"]
    echoed = result["SnapshotTaskDetail"]
    assert (echoed["Encrypted"], echoed["KmsKeyId"]) == (True, key)
    detail = wait_for_snapshot(s3_appliance.ec2, task_id)

    assert stored_object(moto, image_bucket, task_id) == ("aws:kms", key)
    assert (detail["Encrypted"], detail["KmsKeyId"]) == (True, key)
    encryption = admin_task(s3_appliance, task_id)["encryption"]
    assert encryption == {
        "requested": {"algorithm": "aws:kms", "kms_key_id": key},
        "applied": {"algorithm": "aws:kms", "kms_key_id": key},
    }


def test_import_snapshot_reports_encrypted_exactly_when_the_stored_object_is(
    s3_appliance: Appliance, moto: MotoServer, bucket: str, image_bucket: str, data_disk: str
) -> None:
    container = {"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": data_disk}}
    encrypted = s3_appliance.ec2.import_snapshot(DiskContainer=container, Encrypted=True)["ImportTaskId"]
    plain = s3_appliance.ec2.import_snapshot(DiskContainer=container)["ImportTaskId"]

    detail = wait_for_snapshot(s3_appliance.ec2, encrypted)
    assert stored_object(moto, image_bucket, encrypted) == ("AES256", None)
    assert detail["Encrypted"] is True and "KmsKeyId" not in detail
    assert admin_task(s3_appliance, encrypted)["encryption"] == {
        "requested": {"algorithm": "AES256", "kms_key_id": None},
        "applied": {"algorithm": "AES256", "kms_key_id": None},
    }

    detail = wait_for_snapshot(s3_appliance.ec2, plain)
    assert stored_object(moto, image_bucket, plain) == (None, None)
    assert detail["Encrypted"] is False and "KmsKeyId" not in detail
    assert admin_task(s3_appliance, plain)["encryption"] == {"requested": None, "applied": None}


def test_encrypted_import_image_is_stored_encrypted_and_reported_so(
    s3_appliance: Appliance, moto: MotoServer, bucket: str, image_bucket: str, tmp_path: Path
) -> None:
    # ImportImage validates the guest: a real bootable Linux disk
    moto.client("s3").upload_file(str(guestfactory.linux_disk(tmp_path)), bucket, "disks/linux.raw")
    key = kms_key(moto)
    task_id = s3_appliance.ec2.import_image(
        DiskContainers=[{"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": "disks/linux.raw"}}],
        Encrypted=True,
        KmsKeyId=key,
    )["ImportTaskId"]

    def task() -> dict[str, Any]:
        return s3_appliance.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]

    wait_for(lambda: task()["Status"] in ("completed", "deleted"), what=task_id)
    final = task()
    assert final["Status"] == "completed", final
    assert stored_object(moto, image_bucket, task_id) == ("aws:kms", key)
    assert (final["Encrypted"], final["KmsKeyId"]) == (True, key)


def test_encrypted_import_is_refused_by_an_appliance_whose_image_target_is_a_file(
    appliance: Appliance, bucket: str, data_disk: str
) -> None:
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        appliance.ec2.import_snapshot(
            DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": data_disk}},
            Encrypted=True,
        )
    error = exc.value.response["Error"]
    assert error["Code"] == "InvalidParameter"
    assert "file image target (targets.image.type: file)" in error["Message"]
    assert appliance.ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"] == []


@pytest.mark.skipif(not AWS.exists(), reason="the AWS CLI is not installed in this environment")
def test_aws_cli_import_snapshot_encrypted_with_a_kms_key_alias(
    s3_appliance: Appliance, moto: MotoServer, bucket: str, image_bucket: str, data_disk: str
) -> None:
    # the moto server lives for the session and this test runs once per store backend: an alias of its own
    alias = f"alias/disks-{uuid.uuid4().hex[:8]}"
    moto.client("kms").create_alias(AliasName=alias, TargetKeyId=kms_key(moto))

    def aws(*args: str) -> Any:
        proc = aws_ec2(s3_appliance.endpoint, *args, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    created = aws(
        "import-snapshot",
        "--encrypted",
        "--kms-key-id",
        alias,
        "--disk-container",
        f"Format=RAW,UserBucket={{S3Bucket={bucket},S3Key={data_disk}}}",
    )
    task_id = created["ImportTaskId"]
    assert created["SnapshotTaskDetail"]["Encrypted"] is True

    def detail() -> dict[str, Any]:
        tasks = aws("describe-import-snapshot-tasks", "--import-task-ids", task_id)
        return tasks["ImportSnapshotTasks"][0]["SnapshotTaskDetail"]

    wait_for(lambda: detail()["Status"] in ("completed", "error"), what=task_id)
    final = detail()
    assert final["Status"] == "completed", final
    # moto's S3 names the key as the request did; S3 on AWS names the key the alias points to
    assert stored_object(moto, image_bucket, task_id) == ("aws:kms", alias)
    assert (final["Encrypted"], final["KmsKeyId"]) == (True, alias)
