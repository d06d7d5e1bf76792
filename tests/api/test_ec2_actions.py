"""The EC2 actions end to end: real clients (boto3, the AWS CLI, euca2ools-style requests) against
the real Falcon app and a real ImportService on a temporary SQLite store. No worker runs, so tasks
stay pending until a test cancels them or moves them on through the store."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import falcon
import falcon.testing
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError, WaiterError

from api.app import create_app
from api.ec2.resource import Ec2Resource, handles
from appliance.config import Config
from appliance.service.imports import ImportService
from appliance.store import TaskState
from tests.api.ec2_support import (
    FORM,
    HOST,
    MANIFEST_BASE,
    Prepared,
    ec2_app,
    ec2_config,
    error_of,
    parse,
    send,
    sign,
    wsgi_server,
)
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY

GiB = 1 << 30
MANIFEST = f"{MANIFEST_BASE}/bucket/disk.raw.manifest.xml?X-Amz-Signature=abc&Expires=1"
#: as Describe* echoes it: the bucket and key euca2ools' resume-import reads, not the signature
ECHOED_MANIFEST = f"{MANIFEST_BASE}/bucket/disk.raw.manifest.xml?X-Amz-Signature=REDACTED&Expires=1"


@dataclass
class Appliance:
    """A running API server with its service and a boto3 client pointed at it."""

    endpoint: str
    config: Config
    service: ImportService
    ec2: Any


def make_client(endpoint: str, **kwargs: Any) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=kwargs.pop("access_key", TEST_ACCESS_KEY),
        aws_secret_access_key=kwargs.pop("secret_key", TEST_SECRET_KEY),
        # errors must surface on the first answer, not after retries
        config=BotoConfig(retries={"max_attempts": 1}),
        **kwargs,
    )


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    config = ec2_config(tmp_path)
    service = ImportService(config)
    with wsgi_server(create_app(config, service=service)) as endpoint:
        yield Appliance(endpoint, config, service, make_client(endpoint))


def code_of(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return exc.value.response["Error"]["Code"]


def new_volume(ec2: Any, **overrides: Any) -> dict[str, Any]:
    params = {
        "AvailabilityZone": "us-east-1a",
        "Image": {"Format": "RAW", "Bytes": GiB, "ImportManifestUrl": MANIFEST},
        "Volume": {"Size": 1},
        "Description": "data disk",
    } | overrides
    return ec2.import_volume(**params)["ConversionTask"]


# -- legacy conversion tasks ------------------------------------------------------------------------


def test_describe_with_no_tasks_is_an_empty_list(appliance: Appliance) -> None:
    response = appliance.ec2.describe_conversion_tasks()
    assert response["ConversionTasks"] == []
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert (
        response["ResponseMetadata"]["RequestId"]
        == response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    )
    assert appliance.ec2.describe_import_image_tasks()["ImportImageTasks"] == []
    assert appliance.ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"] == []


def test_import_volume_returns_the_task_echoing_the_request(appliance: Appliance) -> None:
    task = new_volume(appliance.ec2)
    task_id = task.pop("ConversionTaskId")
    assert task_id.startswith("import-vol-") and len(task_id) == len("import-vol-") + 8
    assert task.pop("ExpirationTime").endswith("Z")
    assert task == {
        "State": "active",
        "StatusMessage": "pending",
        "ImportVolume": {
            "AvailabilityZone": "us-east-1a",
            "BytesConverted": 0,
            "Description": "data disk",
            "Image": {"Format": "RAW", "Size": GiB, "ImportManifestUrl": ECHOED_MANIFEST},
            "Volume": {"Size": 1},
        },
    }
    [described] = appliance.ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"]
    assert described["ConversionTaskId"] == task_id
    assert described["ImportVolume"]["Image"]["ImportManifestUrl"] == ECHOED_MANIFEST


def test_cancel_conversion_task_and_wait_for_cancelled(appliance: Appliance) -> None:
    task_id = new_volume(appliance.ec2)["ConversionTaskId"]
    response = appliance.ec2.cancel_conversion_task(ConversionTaskId=task_id, ReasonMessage="wrong disk")
    assert set(response) == {"ResponseMetadata"}
    waiter = appliance.ec2.get_waiter("conversion_task_cancelled")
    waiter.wait(ConversionTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 5})
    [task] = appliance.ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"]
    assert (task["State"], task["StatusMessage"]) == ("cancelled", "wrong disk")
    with pytest.raises(ClientError) as info:
        appliance.ec2.cancel_conversion_task(ConversionTaskId=task_id)
    assert code_of(info) == "IncorrectState"


def test_completed_waiter_stops_on_a_failed_task(appliance: Appliance) -> None:
    task_id = new_volume(appliance.ec2)["ConversionTaskId"]
    store = appliance.service.store
    store.claim(task_id, "test-worker", 30)
    store.set_state(
        task_id, TaskState.FAILED, error_code="CorruptImage", error_message="bad VMDK grain table"
    )
    waiter = appliance.ec2.get_waiter("conversion_task_completed")
    with pytest.raises(WaiterError, match="cancelled"):
        waiter.wait(ConversionTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 2})
    [task] = appliance.ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"]
    assert task["StatusMessage"] == "ClientError: CorruptImage: bad VMDK grain table"


def test_import_instance_with_the_botocore_form(appliance: Appliance) -> None:
    task = appliance.ec2.import_instance(
        Platform="Windows",
        Description="web server",
        LaunchSpecification={
            "Architecture": "x86_64",
            "InstanceType": "m1.small",
            "Placement": {"AvailabilityZone": "zone-1"},
            "Monitoring": True,
            "GroupNames": ["default"],
        },
        DiskImages=[
            {
                "Image": {"Format": "VMDK", "Bytes": 123456, "ImportManifestUrl": MANIFEST},
                "Volume": {"Size": 8},
                "Description": "disk1",
            }
        ],
    )["ConversionTask"]
    assert task["ConversionTaskId"].startswith("import-i-")
    details = task["ImportInstance"]
    assert (details["Platform"], details["Description"]) == ("Windows", "web server")
    [volume] = details["Volumes"]
    assert volume["Image"] == {"Format": "VMDK", "Size": 123456, "ImportManifestUrl": ECHOED_MANIFEST}
    assert (volume["Volume"], volume["Status"], volume["AvailabilityZone"]) == (
        {"Size": 8},
        "active",
        "zone-1",
    )
    stored = appliance.service.get(task["ConversionTaskId"], ["import-instance"])
    assert stored.params["launch"]["Monitoring"] is True and stored.params["instance_type"] == "m1.small"


def test_import_instance_with_the_euca2ools_form(tmp_path: Path) -> None:
    config = ec2_config(tmp_path)
    service = ImportService(config)
    app = ec2_app(config, service)
    params = {
        "Action": "ImportInstance",
        "Version": "2014-06-15",
        "Platform": "Linux",
        "LaunchSpecification.Architecture": "x86_64",
        "LaunchSpecification.InstanceType": "m1.small",
        "LaunchSpecification.Monitoring.Enabled": "true",
        "LaunchSpecification.UserData": "aGVsbG8=",
        "LaunchSpecification.KeyName": "mykey",
        "DiskImage.1.Image.Format": "vmdk",
        "DiskImage.1.Image.Bytes": "123456",
        "DiskImage.1.Image.ImportManifestUrl": MANIFEST,
        "DiskImage.1.Volume.Size": "1",
    }
    result = send(app, sign(params))
    assert result.status_code == 200, result.text
    task = parse("ImportInstance", result)["ConversionTask"]
    assert task["ImportInstance"]["Platform"] == "Linux"
    stored = service.get(task["ConversionTaskId"], ["import-instance"])
    assert stored.params["launch"] == {
        "Monitoring": True,
        "UserData": {"Data": "aGVsbG8="},
        "KeyName": "mykey",
    }
    assert stored.params["image_format"] == "VMDK"


def test_dry_run_answers_412_and_creates_nothing(appliance: Appliance) -> None:
    ec2 = appliance.ec2
    calls = [
        lambda: new_volume(ec2, DryRun=True),
        lambda: ec2.describe_conversion_tasks(DryRun=True),
        lambda: ec2.cancel_conversion_task(ConversionTaskId="import-vol-abcd1234", DryRun=True),
        lambda: ec2.import_image(DiskContainers=[{"Url": f"{MANIFEST_BASE}/b/d.vmdk"}], DryRun=True),
        lambda: ec2.import_snapshot(DiskContainer={"Url": f"{MANIFEST_BASE}/b/d.raw"}, DryRun=True),
        lambda: ec2.describe_import_image_tasks(DryRun=True),
        lambda: ec2.cancel_import_task(ImportTaskId="import-ami-0123456789abcdef0", DryRun=True),
    ]
    for call in calls:
        with pytest.raises(ClientError) as info:
            call()
        assert code_of(info) == "DryRunOperation"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert ec2.describe_conversion_tasks()["ConversionTasks"] == []
    assert ec2.describe_import_image_tasks()["ImportImageTasks"] == []
    # validation comes first: an invalid dry run is an invalid request
    with pytest.raises(ClientError) as info:
        new_volume(ec2, DryRun=True, Image={"Format": "QCOW2", "Bytes": 1, "ImportManifestUrl": MANIFEST})
    assert code_of(info) == "InvalidParameterValue"


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (
            lambda ec2: ec2.describe_conversion_tasks(ConversionTaskIds=["import-vol-zzzzzzzz"]),
            "InvalidConversionTaskId",
        ),
        (
            lambda ec2: ec2.cancel_conversion_task(ConversionTaskId="vol-123"),
            "InvalidConversionTaskId.Malformed",
        ),
        (
            lambda ec2: ec2.describe_conversion_tasks(ConversionTaskIds=["import-ami-0123456789abcdef0"]),
            "InvalidConversionTaskId.Malformed",
        ),
        (
            lambda ec2: new_volume(ec2, Image={"Format": "QCOW2", "Bytes": 1, "ImportManifestUrl": MANIFEST}),
            "InvalidParameterValue",
        ),
        (
            lambda ec2: new_volume(
                ec2, Image={"Format": "raw", "Bytes": 3 * GiB, "ImportManifestUrl": MANIFEST}
            ),
            "InvalidParameterValue",
        ),
        (lambda ec2: new_volume(ec2, Volume={"Size": 0}), "InvalidParameterValue"),
        (lambda ec2: new_volume(ec2, AvailabilityZone=None), "MissingParameter"),
        (lambda ec2: new_volume(ec2, AvailabilityZoneId="use1-az1"), "InvalidParameterValue"),
        (
            lambda ec2: ec2.import_image(
                DiskContainers=[{"Format": "QCOW2", "Url": f"{MANIFEST_BASE}/b/x.qcow2"}]
            ),
            "InvalidParameterValue",
        ),
        (lambda ec2: ec2.import_image(), "MissingParameter"),
        (
            lambda ec2: ec2.describe_import_image_tasks(
                Filters=[{"Name": "task-state", "Values": ["running"]}]
            ),
            "InvalidParameterValue",
        ),
        (lambda ec2: ec2.describe_import_image_tasks(NextToken="bm90LWEtdG9rZW4="), "InvalidPaginationToken"),
        (lambda ec2: ec2.cancel_import_task(), "MissingParameter"),
        (
            lambda ec2: ec2.cancel_import_task(ImportTaskId="import-snap-0123456789abcdef0"),
            "InvalidConversionTaskId",
        ),
    ],
)
def test_client_errors_reach_boto3_with_ec2_codes(appliance: Appliance, call: Any, code: str) -> None:
    with pytest.raises(ClientError) as info:
        call(_DropNone(appliance.ec2))
    assert code_of(info) == code
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


class _DropNone:
    """Client proxy that leaves out members given as None (so a test can omit a default)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        return lambda **kw: method(**{k: v for k, v in kw.items() if v is not None})


def test_a_disk_container_without_url_or_user_bucket_is_told_to_give_one(appliance: Appliance) -> None:
    # neither source: the message must ask for one, not warn against giving both
    with pytest.raises(ClientError) as info:
        appliance.ec2.import_snapshot(DiskContainer={"Format": "RAW"})
    assert code_of(info) == "InvalidParameterValue"
    message = info.value.response["Error"]["Message"]
    assert "not both" not in message
    assert "Url" in message and "UserBucket" in message
    with pytest.raises(ClientError) as info:
        appliance.ec2.import_snapshot(
            DiskContainer={
                "Format": "RAW",
                "Url": "s3://disks/a.raw",
                "UserBucket": {"S3Bucket": "b", "S3Key": "k"},
            }
        )
    assert "not both" in info.value.response["Error"]["Message"]
    assert appliance.ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"] == []


def test_unknown_export_task_ids_are_named_without_the_internal_error_code(appliance: Appliance) -> None:
    # the EC2 code is the answer's Code; the message must not repeat the toolkit's TaskNotFound
    calls = [
        lambda: appliance.ec2.describe_export_tasks(ExportTaskIds=["export-i-0123456789abcdef0"]),
        lambda: appliance.ec2.describe_export_image_tasks(
            ExportImageTaskIds=["export-ami-0123456789abcdef0"]
        ),
        lambda: appliance.ec2.cancel_export_task(ExportTaskId="export-i-0123456789abcdef0"),
    ]
    for call in calls:
        with pytest.raises(ClientError) as info:
            call()
        assert code_of(info) == "InvalidExportTaskID.NotFound"
        message = info.value.response["Error"]["Message"]
        assert not message.startswith("TaskNotFound"), message
        assert "0123456789abcdef0" in message


def test_disallowed_source_url_is_invalid_parameter_value(appliance: Appliance) -> None:
    with pytest.raises(ClientError) as info:
        new_volume(
            appliance.ec2,
            Image={"Format": "RAW", "Bytes": 1, "ImportManifestUrl": "http://169.254.169.254/x"},
        )
    assert code_of(info) == "InvalidParameterValue"
    assert "169.254.169.254" in info.value.response["Error"]["Message"]


def test_source_url_whose_host_does_not_resolve_is_refused_naming_the_host(appliance: Appliance) -> None:
    # the real resolver on a reserved name (RFC 6761: .invalid never resolves)
    with pytest.raises(ClientError) as info:
        new_volume(
            appliance.ec2,
            Image={"Format": "RAW", "Bytes": 1, "ImportManifestUrl": "http://parts.nowhere.invalid/m.xml"},
        )
    assert code_of(info) == "InvalidParameterValue"
    message = info.value.response["Error"]["Message"]
    assert "could not be resolved" in message and "'parts.nowhere.invalid'" in message
    assert "http://parts.nowhere.invalid/m.xml" in message and "Errno" not in message, message


@pytest.mark.parametrize(
    "overrides",
    [
        {"Volume": {"Size": 2**63 - 1}},
        {"Volume": {"Size": 16385}},
        {"Image": {"Format": "VMDK", "Bytes": 2**63 - 1, "ImportManifestUrl": MANIFEST}},
    ],
)
def test_sizes_beyond_aws_limits_are_refused_at_submit_and_create_no_task(
    appliance: Appliance, overrides: dict[str, Any]
) -> None:
    # issue 10 item 8: the task used to be accepted and to fail later with an OverflowError
    with pytest.raises(ClientError) as info:
        new_volume(appliance.ec2, **overrides)
    message = info.value.response["Error"]["Message"]
    assert code_of(info) == "InvalidParameterValue" and ("16384" in message or "16 TiB" in message)
    assert appliance.ec2.describe_conversion_tasks()["ConversionTasks"] == []


@pytest.mark.parametrize(
    ("call", "member"),
    [
        (
            lambda ec2: ec2.import_snapshot(
                DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": "Invalid_Bucket", "S3Key": "k"}}
            ),
            "UserBucket.S3Bucket",
        ),
        (
            lambda ec2: ec2.import_image(
                DiskContainers=[{"Format": "RAW", "UserBucket": {"S3Bucket": "ab", "S3Key": "k"}}]
            ),
            "UserBucket.S3Bucket",
        ),
        (
            lambda ec2: ec2.import_snapshot(
                DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": "disks", "S3Key": "a/../../b/k"}}
            ),
            "UserBucket.S3Key",
        ),
        (lambda ec2: ec2.import_image(DiskContainers=[{"Url": "s3://bad..bucket/k"}]), "bucket name"),
        (lambda ec2: ec2.import_snapshot(DiskContainer={"Url": "s3://disks/" + "k" * 1025}), "object key"),
        (
            lambda ec2: new_volume(
                ec2, Image={"Format": "RAW", "Bytes": 1, "ImportManifestUrl": "s3://disks/m.xml"}
            ),
            "ImportManifestUrl",
        ),
    ],
)
def test_s3_names_s3_would_refuse_are_refused_at_submit(appliance: Appliance, call: Any, member: str) -> None:
    # issue 10 item 9: accepted before, the task then failed with botocore's ParamValidationError text
    with pytest.raises(ClientError) as info:
        call(appliance.ec2)
    message = info.value.response["Error"]["Message"]
    assert code_of(info) == "InvalidParameterValue" and member in message
    assert appliance.ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"] == []
    assert appliance.ec2.describe_import_image_tasks()["ImportImageTasks"] == []
    assert appliance.ec2.describe_conversion_tasks()["ConversionTasks"] == []


def test_active_task_limit_is_resource_limit_exceeded(tmp_path: Path) -> None:
    config = ec2_config(tmp_path)
    config = dataclasses.replace(config, max_active_tasks=1)
    service = ImportService(config)
    with wsgi_server(create_app(config, service=service)) as endpoint:
        ec2 = make_client(endpoint)
        new_volume(ec2)
        with pytest.raises(ClientError) as info:
            new_volume(ec2)
        assert code_of(info) == "ResourceLimitExceeded"


# -- image and snapshot imports ---------------------------------------------------------------------


def test_import_image_then_describe_it(appliance: Appliance) -> None:
    result = appliance.ec2.import_image(
        Description="web",
        Architecture="x86_64",
        Platform="linux",
        BootMode="uefi",
        LicenseType="BYOL",
        RoleName="vmimport",
        DiskContainers=[{"Format": "vmdk", "UserBucket": {"S3Bucket": "import-bucket", "S3Key": "web.vmdk"}}],
        TagSpecifications=[{"ResourceType": "import-image-task", "Tags": [{"Key": "team", "Value": "web"}]}],
    )
    task_id = result["ImportTaskId"]
    assert task_id.startswith("import-ami-")
    expected = {
        "Architecture": "x86_64",
        "Description": "web",
        "Encrypted": False,
        "ImportTaskId": task_id,
        "LicenseType": "BYOL",
        "Platform": "Linux",
        "Progress": "0",
        "SnapshotDetails": [
            {
                "DeviceName": "/dev/sda1",
                "Format": "VMDK",
                "Progress": "0",
                "Status": "active",
                "StatusMessage": "pending",
                "UserBucket": {"S3Bucket": "import-bucket", "S3Key": "web.vmdk"},
            }
        ],
        "Status": "active",
        "StatusMessage": "pending",
        "Tags": [{"Key": "team", "Value": "web"}],
    }
    assert {k: v for k, v in result.items() if k != "ResponseMetadata"} == expected
    [described] = appliance.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"]
    assert described == expected | {"BootMode": "uefi"}


def test_client_token_makes_import_image_idempotent(appliance: Appliance) -> None:
    def submit() -> str:
        return appliance.ec2.import_image(
            ClientToken="token-1", DiskContainers=[{"Url": f"{MANIFEST_BASE}/b/a.vmdk", "Format": "VMDK"}]
        )["ImportTaskId"]

    assert submit() == submit()
    assert len(appliance.ec2.describe_import_image_tasks()["ImportImageTasks"]) == 1


def test_describe_import_image_tasks_pages_and_filters(appliance: Appliance) -> None:
    ids = [
        appliance.ec2.import_image(DiskContainers=[{"Url": f"{MANIFEST_BASE}/b/{i}.raw", "Format": "RAW"}])[
            "ImportTaskId"
        ]
        for i in range(3)
    ]
    paginator = appliance.ec2.get_paginator("describe_import_image_tasks")
    pages = list(paginator.paginate(PaginationConfig={"PageSize": 2}))
    assert [len(p["ImportImageTasks"]) for p in pages] == [2, 1]
    listed = [t["ImportTaskId"] for p in pages for t in p["ImportImageTasks"]]
    assert listed == list(reversed(ids))  # newest first, each exactly once

    appliance.ec2.cancel_import_task(ImportTaskId=ids[1], CancelReason="duplicate")

    def with_state(*states: str) -> list[str]:
        tasks = appliance.ec2.describe_import_image_tasks(
            Filters=[{"Name": "task-state", "Values": list(states)}]
        )
        return sorted(t["ImportTaskId"] for t in tasks["ImportImageTasks"])

    assert with_state("deleted") == [ids[1]]
    assert with_state("active") == sorted([ids[0], ids[2]])
    assert with_state("active", "deleted") == sorted(ids)
    assert with_state("completed") == []


def test_import_snapshot_cancel_import_task_and_states(appliance: Appliance) -> None:
    result = appliance.ec2.import_snapshot(
        Description="data",
        DiskContainer={"Format": "raw", "Url": f"{MANIFEST_BASE}/b/data.raw", "Description": "d"},
        Encrypted=False,
    )
    task_id = result["ImportTaskId"]
    assert task_id.startswith("import-snap-")
    assert result["SnapshotTaskDetail"] == {
        "Description": "d",
        "Encrypted": False,
        "Format": "RAW",
        "Progress": "0",
        "Status": "active",
        "StatusMessage": "pending",
        "Url": f"{MANIFEST_BASE}/b/data.raw",
    }
    cancelled = appliance.ec2.cancel_import_task(ImportTaskId=task_id, CancelReason="not needed")
    assert (cancelled["ImportTaskId"], cancelled["PreviousState"], cancelled["State"]) == (
        task_id,
        "active",
        "deleted",
    )
    [task] = appliance.ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"]
    assert (task["SnapshotTaskDetail"]["Status"], task["SnapshotTaskDetail"]["StatusMessage"]) == (
        "deleted",
        "not needed",
    )
    with pytest.raises(ClientError) as info:
        appliance.ec2.cancel_import_task(ImportTaskId=task_id)
    assert code_of(info) == "IncorrectState"


# -- server-side encryption ------------------------------------------------------------------------

KMS_KEY_ARN = "arn:aws:kms:us-east-1:012345678910:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.fixture
def s3_appliance(tmp_path: Path) -> Iterator[Appliance]:
    """The API with the s3 image target configured (no worker runs, so S3 is never contacted)."""
    base = ec2_config(tmp_path)
    config = dataclasses.replace(
        base,
        targets=base.targets | {"image": {"type": "s3", "bucket": "images", "endpoint_url": MANIFEST_BASE}},
    )
    service = ImportService(config)
    with wsgi_server(create_app(config, service=service)) as endpoint:
        yield Appliance(endpoint, config, service, make_client(endpoint))


def test_encrypted_import_is_invalid_parameter_where_the_image_target_cannot_encrypt(
    appliance: Appliance,
) -> None:
    ec2 = appliance.ec2
    container = {"Format": "RAW", "Url": f"{MANIFEST_BASE}/b/d.raw"}
    calls = [
        lambda: ec2.import_snapshot(DiskContainer=container, Encrypted=True),
        lambda: ec2.import_snapshot(DiskContainer=container, Encrypted=True, KmsKeyId=KMS_KEY_ARN),
        lambda: ec2.import_image(DiskContainers=[container], Encrypted=True),
        lambda: ec2.import_image(DiskContainers=[container], Encrypted=True, KmsKeyId="alias/disks"),
        # a dry run of a request the appliance would refuse is refused the same way
        lambda: ec2.import_snapshot(DiskContainer=container, Encrypted=True, DryRun=True),
    ]
    for call in calls:
        with pytest.raises(ClientError) as info:
            call()
        assert code_of(info) == "InvalidParameter"
        message = info.value.response["Error"]["Message"]
        assert "file image target (targets.image.type: file)" in message
    assert ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"] == []
    assert ec2.describe_import_image_tasks()["ImportImageTasks"] == []
    # not asking for encryption is fine
    result = ec2.import_snapshot(DiskContainer=container, Encrypted=False)
    assert result["SnapshotTaskDetail"]["Encrypted"] is False


def test_kms_key_id_without_encrypted_is_invalid_parameter_dependency(s3_appliance: Appliance) -> None:
    ec2 = s3_appliance.ec2
    container = {"Format": "RAW", "Url": f"{MANIFEST_BASE}/b/d.raw"}
    for call in (
        lambda: ec2.import_snapshot(DiskContainer=container, KmsKeyId=KMS_KEY_ARN),
        lambda: ec2.import_snapshot(DiskContainer=container, Encrypted=False, KmsKeyId=KMS_KEY_ARN),
        lambda: ec2.import_image(DiskContainers=[container], KmsKeyId="alias/disks"),
    ):
        with pytest.raises(ClientError) as info:
            call()
        assert code_of(info) == "InvalidParameterDependency"
        assert info.value.response["Error"]["Message"] == (
            "The parameter KmsKeyId requires the parameter Encrypted to be set."
        )
    assert ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"] == []


@pytest.mark.parametrize(
    "key", ["my-key", "alias/", "arn:aws:kms:us-east-1:012345678910:key/nope", "1234abcd", "x" * 5000]
)
def test_malformed_kms_key_id_is_invalid_parameter_value_and_creates_no_task(
    s3_appliance: Appliance, key: str
) -> None:
    with pytest.raises(ClientError) as info:
        s3_appliance.ec2.import_snapshot(
            DiskContainer={"Format": "RAW", "Url": f"{MANIFEST_BASE}/b/d.raw"}, Encrypted=True, KmsKeyId=key
        )
    assert code_of(info) == "InvalidParameterValue"
    message = info.value.response["Error"]["Message"]
    assert "is not a KMS key identifier" in message and len(message) < 600
    assert s3_appliance.ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"] == []


def test_encrypted_imports_are_accepted_and_echoed_where_the_s3_image_target_encrypts(
    s3_appliance: Appliance,
) -> None:
    ec2 = s3_appliance.ec2
    container = {"Format": "RAW", "Url": f"{MANIFEST_BASE}/b/d.raw"}
    snapshot = ec2.import_snapshot(DiskContainer=container, Encrypted=True, KmsKeyId=KMS_KEY_ARN)
    detail = snapshot["SnapshotTaskDetail"]
    assert (detail["Encrypted"], detail["KmsKeyId"]) == (True, KMS_KEY_ARN)
    [described] = ec2.describe_import_snapshot_tasks(ImportTaskIds=[snapshot["ImportTaskId"]])[
        "ImportSnapshotTasks"
    ]
    assert (described["SnapshotTaskDetail"]["Encrypted"], described["SnapshotTaskDetail"]["KmsKeyId"]) == (
        True,
        KMS_KEY_ARN,
    )
    task = s3_appliance.service.store.get_task(snapshot["ImportTaskId"])
    assert (task.params["encrypted"], task.params["kms_key_id"]) == (True, KMS_KEY_ARN)

    image = ec2.import_image(DiskContainers=[container], Encrypted=True, ClientToken="enc-1")
    assert image["Encrypted"] is True and "KmsKeyId" not in image
    [described] = ec2.describe_import_image_tasks(ImportTaskIds=[image["ImportTaskId"]])["ImportImageTasks"]
    assert described["Encrypted"] is True and "KmsKeyId" not in described
    # the same client token without encryption is another request
    with pytest.raises(ClientError) as info:
        ec2.import_image(DiskContainers=[container], ClientToken="enc-1")
    assert code_of(info) == "IdempotentParameterMismatch"


def test_snapshot_imported_waiter_succeeds_once_the_task_completes(appliance: Appliance) -> None:
    task_id = appliance.ec2.import_snapshot(
        DiskContainer={"Format": "VMDK", "Url": f"{MANIFEST_BASE}/b/d.vmdk"}
    )["ImportTaskId"]
    store = appliance.service.store
    store.claim(task_id, "test-worker", 30)
    store.set_state(
        task_id,
        TaskState.COMPLETED,
        result={"ids": {"snapshot_id": "snap-0abc"}, "disk": {"source_image": {"virtual_size": 4096}}},
    )
    waiter = appliance.ec2.get_waiter("snapshot_imported")
    waiter.wait(ImportTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 2})
    [task] = appliance.ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"]
    assert task["SnapshotTaskDetail"]["SnapshotId"] == "snap-0abc"
    assert task["SnapshotTaskDetail"]["DiskImageSize"] == 4096.0


# -- the resource itself ----------------------------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> falcon.App:
    config = ec2_config(tmp_path, max_request_bytes=4096)
    return ec2_app(config, ImportService(config))


def test_missing_and_unknown_actions(app: falcon.App) -> None:
    assert error_of(send(app, sign({"Version": "2016-11-15"})))[:2] == (400, "MissingAction")
    status, code, message = error_of(send(app, sign({"Action": "RunInstances"})))
    assert (status, code) == (400, "InvalidAction") and "RunInstances" in message


def test_unknown_parameter_is_refused(app: falcon.App) -> None:
    status, code, message = error_of(
        send(app, sign({"Action": "DescribeConversionTasks", "Filter.1.Name": "x"}))
    )
    assert (status, code, message) == (
        400,
        "UnknownParameter",
        "The parameter Filter.1.Name is not recognized",
    )


def test_oversized_body_is_413_before_anything_else(app: falcon.App) -> None:
    body = b"Action=DescribeConversionTasks&Description=" + b"x" * 5000
    result = send(app, Prepared("POST", "", {"Host": HOST, "Content-Type": FORM}, body))
    status, code, _ = error_of(result)
    assert (status, code) == (413, "RequestEntityTooLarge")


def test_body_that_is_not_a_form_is_refused(app: falcon.App) -> None:
    result = send(
        app, Prepared("POST", "", {"Host": HOST, "Content-Type": "application/json"}, b'{"Action": 1}')
    )
    assert error_of(result)[:2] == (400, "InvalidParameterValue")


def test_internal_error_hides_the_details_and_logs_them_with_the_request_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ec2_config(tmp_path)
    service = ImportService(config)
    service.store.close()  # every store call now fails with an unexpected sqlite3 error
    app = ec2_app(config, service)
    with caplog.at_level(logging.ERROR, logger="api.ec2.resource"):
        result = send(app, sign({"Action": "DescribeConversionTasks"}))
    status, code, message = error_of(result)
    assert (status, code, message) == (500, "InternalError", "An internal error has occurred")
    assert b"Traceback" not in result.content and b"sqlite" not in result.content.lower()
    request_id = result.headers["x-amzn-RequestId"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None


def test_handles_recognises_ec2_requests_and_keeps_the_body_for_the_resource(tmp_path: Path) -> None:
    config = ec2_config(tmp_path)
    resource = Ec2Resource(config, ImportService(config))
    assert handles(falcon.testing.create_req(path="/", query_string="Action=DescribeConversionTasks"))
    assert not handles(falcon.testing.create_req(path="/"))
    req = sign({"Action": "DescribeConversionTasks"})
    post = falcon.testing.create_req(method="POST", path="/", headers=req.headers, body=req.body)
    assert resource.handles(post)
    resp = falcon.Response()
    resource.on_post(post, resp)  # the body handles() read is still there, bytes intact for the signature
    assert resp.status in (falcon.HTTP_200, 200)
    json_post = falcon.testing.create_req(
        method="POST", path="/", body=b'{"x": 1}', headers={"Content-Type": "application/json"}
    )
    assert not handles(json_post)


def test_request_parameters_may_come_in_the_query_string_of_a_post(app: falcon.App) -> None:
    req = sign({"Version": "2016-11-15"}, query={"Action": "DescribeConversionTasks"})
    result = send(app, req)
    assert result.status_code == 200 and parse("DescribeConversionTasks", result)["ConversionTasks"] == []


# -- the AWS CLI ------------------------------------------------------------------------------------

AWS = Path(sys.executable).with_name("aws")


def aws(endpoint: str, *args: str) -> Any:
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_MAX_ATTEMPTS="1",
    )
    env.pop("AWS_PROFILE", None)
    proc = subprocess.run(
        [str(AWS), "ec2", *args, "--endpoint-url", endpoint, "--region", REGION, "--output", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"aws {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return json.loads(proc.stdout) if proc.stdout.strip() else None


@pytest.mark.slow
@pytest.mark.skipif(not AWS.exists(), reason="the AWS CLI is not installed in this environment")
def test_aws_cli_conversion_and_image_commands(appliance: Appliance) -> None:
    endpoint = appliance.endpoint
    assert aws(endpoint, "describe-conversion-tasks") == {"ConversionTasks": []}
    # awscli v1 removed `ec2 import-volume`/`import-instance` (customizations/removals.py): create with boto3
    task_id = new_volume(appliance.ec2)["ConversionTaskId"]
    [task] = aws(endpoint, "describe-conversion-tasks", "--conversion-task-ids", task_id)["ConversionTasks"]
    assert (task["ConversionTaskId"], task["State"]) == (task_id, "active")
    image = task["ImportVolume"]["Image"]
    assert image == {"Format": "RAW", "Size": GiB, "ImportManifestUrl": ECHOED_MANIFEST}
    assert (
        aws(endpoint, "cancel-conversion-task", "--conversion-task-id", task_id, "--reason-message", "cli")
        is None
    )
    [task] = aws(endpoint, "describe-conversion-tasks", "--conversion-task-ids", task_id)["ConversionTasks"]
    assert (task["State"], task["StatusMessage"]) == ("cancelled", "cli")

    image = aws(
        endpoint,
        "import-image",
        "--description",
        "from the cli",
        "--disk-containers",
        f"Format=vmdk,Url={MANIFEST_BASE}/b/disk.vmdk",
    )
    assert image["ImportTaskId"].startswith("import-ami-") and image["Status"] == "active"
    tasks = aws(endpoint, "describe-import-image-tasks", "--import-task-ids", image["ImportTaskId"])
    assert [t["Description"] for t in tasks["ImportImageTasks"]] == ["from the cli"]
    snapshot = aws(endpoint, "import-snapshot", "--disk-container", f"Format=RAW,Url={MANIFEST_BASE}/b/d.raw")
    cancelled = aws(endpoint, "cancel-import-task", "--import-task-id", snapshot["ImportTaskId"])
    assert (cancelled["PreviousState"], cancelled["State"]) == ("active", "deleted")
    assert len(aws(endpoint, "describe-import-snapshot-tasks")["ImportSnapshotTasks"]) == 1


@pytest.mark.slow
@pytest.mark.skipif(not AWS.exists(), reason="the AWS CLI is not installed in this environment")
def test_aws_cli_reports_ec2_errors(appliance: Appliance) -> None:
    with pytest.raises(AssertionError, match="InvalidConversionTaskId"):
        aws(appliance.endpoint, "describe-conversion-tasks", "--conversion-task-ids", "import-vol-zzzzzzzz")


# -- a per-disk expected sha256 (beyond AWS) ---------------------------------------------------------

DIGEST_1 = "1" * 64
DIGEST_2 = "2" * 64
DISKS = [
    {"Format": "RAW", "UserBucket": {"S3Bucket": "import-bucket", "S3Key": "boot.raw"}},
    {"Format": "RAW", "UserBucket": {"S3Bucket": "import-bucket", "S3Key": "data.raw"}},
]


def _import_image_with(ec2: Any, extra: dict[str, str], **kwargs: Any) -> str:
    """ImportImage of ``DISKS`` with ``extra`` members botocore does not know, added to the signed body."""

    def add(params: dict[str, Any], **_: Any) -> None:
        params["body"].update(extra)

    ec2.meta.events.register("before-call.ec2.ImportImage", add)
    try:
        return str(ec2.import_image(DiskContainers=kwargs.pop("containers", DISKS), **kwargs)["ImportTaskId"])
    finally:
        ec2.meta.events.unregister("before-call.ec2.ImportImage", add)


def test_each_disk_container_carries_its_own_expected_sha256(appliance: Appliance) -> None:
    # the second disk by its extra member, the first by the request's member (the first disk's)
    task_id = _import_image_with(
        appliance.ec2, {"DiskContainer.2.ExpectedSha256": DIGEST_2.upper(), "ExpectedSha256": DIGEST_1}
    )
    containers = appliance.service.store.get_task(task_id).params["disk_containers"]
    assert [c.get("expected_sha256") for c in containers] == [DIGEST_1, DIGEST_2]
    # the token in a container's Description, and the first container's own equal to the request's
    tokened = [DISKS[0] | {"Description": f"boot [imaging:sha256={DIGEST_1}]"}, DISKS[1]]
    task_id = _import_image_with(
        appliance.ec2, {"DiskContainer.2.ExpectedSha256": DIGEST_2}, containers=tokened,
        Description=f"[imaging:sha256={DIGEST_1}]",
    )  # fmt: skip
    containers = appliance.service.store.get_task(task_id).params["disk_containers"]
    assert [c.get("expected_sha256") for c in containers] == [DIGEST_1, DIGEST_2]
    # a disk without one carries none
    task_id = appliance.ec2.import_image(DiskContainers=DISKS)["ImportTaskId"]
    assert all(
        "expected_sha256" not in c
        for c in appliance.service.store.get_task(task_id).params["disk_containers"]
    )


def test_import_snapshots_disk_container_may_carry_the_expected_sha256(appliance: Appliance) -> None:
    container = DISKS[1] | {"Description": f"data [imaging:sha256={DIGEST_2}]"}
    task_id = appliance.ec2.import_snapshot(DiskContainer=container)["ImportTaskId"]
    assert appliance.service.store.get_task(task_id).params["disk_container"]["expected_sha256"] == DIGEST_2


@pytest.mark.parametrize(
    ("extra", "kwargs", "code", "named"),
    [
        # the request's digest is the first disk's: DiskContainer.1 may not say another
        ({"ExpectedSha256": DIGEST_1, "DiskContainer.1.ExpectedSha256": DIGEST_2}, {},
         "InvalidParameterCombination", "DiskContainer.1"),
        ({"DiskContainer.1.ExpectedSha256": DIGEST_2}, {"Description": f"[imaging:sha256={DIGEST_1}]"},
         "InvalidParameterCombination", "DiskContainer.1"),
        # a container's member and its Description's token disagree
        ({"DiskContainer.2.ExpectedSha256": DIGEST_1},
         {"containers": [DISKS[0], DISKS[1] | {"Description": f"[imaging:sha256={DIGEST_2}]"}]},
         "InvalidParameterCombination", "DiskContainer.2.ExpectedSha256"),
        ({"DiskContainer.2.ExpectedSha256": "abc"}, {},
         "InvalidParameterValue", "DiskContainer.2.ExpectedSha256"),
        # a disk's token is for its digest only
        ({}, {"containers": [DISKS[0], DISKS[1] | {"Description": "[imaging:kernel=aki-1234abcd]"}]},
         "InvalidParameterValue", "DiskContainer.2.Description"),
    ],
)  # fmt: skip
def test_an_ambiguous_or_malformed_per_disk_digest_is_refused_and_nothing_is_created(
    appliance: Appliance, extra: dict[str, str], kwargs: dict[str, Any], code: str, named: str
) -> None:
    with pytest.raises(ClientError) as exc:
        _import_image_with(appliance.ec2, extra, **kwargs)
    assert code_of(exc) == code, exc.value.response["Error"]
    assert named in exc.value.response["Error"]["Message"]
    assert appliance.ec2.describe_import_image_tasks()["ImportImageTasks"] == []
