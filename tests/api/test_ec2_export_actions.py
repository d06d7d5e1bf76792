"""The export actions on the wire: boto3 against the real Falcon app and a real ImportService on the
test's task database. No worker runs: the source images are completed import tasks recorded in the
store as the import workflows record them, the source instances are instances of the moto EC2
server (the controlling cloud), and the export tasks stay pending until a test cancels them or moves
them on through the store. The round trip with the worker is test_e2e_export.py."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError, WaiterError

from api.app import create_app
from appliance import config as appliance_config
from appliance.config import Config
from appliance.service.imports import ImportService
from appliance.store import Store, TaskState
from tests import stores
from tests.api.awscli_support import aws_ec2
from tests.api.ec2_support import ec2_config, wsgi_server
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer


@dataclass
class Appliance:
    endpoint: str
    config: Config
    service: ImportService
    ec2: Any


OTHER_KEY = "AKIAOTHERACCOUNT0001"


def client(endpoint: str, access_key: str = TEST_ACCESS_KEY) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=TEST_SECRET_KEY,
        config=BotoConfig(retries={"max_attempts": 1}),  # errors surface on the first answer
    )


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    config = ec2_config(tmp_path)
    service = ImportService(config)
    try:
        with wsgi_server(create_app(config, service=service)) as endpoint:
            yield Appliance(endpoint, config, service, client(endpoint))
    finally:
        service.store.close()


def _completed(store: Store, task_id: str, kind: str, result: dict[str, Any]) -> None:
    store.create_task(kind, kind, {}, task_id=task_id)
    store.claim(task_id, "test-worker", 30)
    store.set_state(task_id, TaskState.COMPLETED, result=result)


def issued_image(store: Store, tmp_path: Path) -> str:
    """An ``ami-…`` as a completed ImportImage records it (the import-image workflow's result layout)."""
    digits = secrets.token_hex(9)[:17]
    path = tmp_path / f"import-ami-{digits}.raw"
    path.write_bytes(b"\0" * 4096)
    stored = {"type": "file", "path": str(path), "format": "raw", "size": 4096, "sha256": "0" * 64}
    ids = {"snapshot_id": f"snap-{digits}", "image_id": f"ami-{digits}"}
    _completed(store, f"import-ami-{digits}", "import-image", {"disk": {"stored": stored}, "ids": ids})
    return f"ami-{digits}"


def code_of(info: pytest.ExceptionInfo[ClientError]) -> str:
    return str(info.value.response["Error"]["Code"])


@pytest.fixture
def cloud_appliance(tmp_path: Path, moto: MotoServer) -> Iterator[tuple[Appliance, Any, str]]:
    """The API with the ``ec2`` volume target on the moto server (the controlling cloud), its key acting
    for moto's account; yields (the appliance, moto's EC2 client, an instance of that cloud)."""
    ec2 = moto.client("ec2")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    run = ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2, InstanceType="t3.micro")
    me, other = (i["InstanceId"] for i in run["Instances"])
    config = appliance_config.from_dict(
        stores.with_store(
            {
                "state_dir": str(tmp_path / "state"),
                "api": {
                    "credentials": [
                        {
                            "access_key": TEST_ACCESS_KEY,
                            "secret_key": TEST_SECRET_KEY,
                            "account": run["OwnerId"],
                        },
                        {"access_key": OTHER_KEY, "secret_key": TEST_SECRET_KEY, "account": "999999999999"},
                    ]
                },
                "targets": {
                    "volume": {
                        "type": "ec2",
                        "endpoint_url": moto.endpoint,
                        "region": REGION,
                        "access_key": "testing",
                        "secret_key": "testing",
                        "instance_id": me,
                    }
                },
            }
        ),
        base_dir=tmp_path,
    )
    service = ImportService(config)
    try:
        with wsgi_server(create_app(config, service=service)) as endpoint:
            yield Appliance(endpoint, config, service, client(endpoint)), ec2, other
    finally:
        service.store.close()
        ec2.terminate_instances(InstanceIds=[me, other])


def test_export_image_answers_in_aws_shapes_and_states(appliance: Appliance, tmp_path: Path) -> None:
    image_id = issued_image(appliance.service.store, tmp_path)
    started = appliance.ec2.export_image(
        ImageId=image_id,
        DiskImageFormat="vhd",  # any case, as AWS
        S3ExportLocation={"S3Bucket": "exports", "S3Prefix": "p/"},
        Description="d",
        RoleName="vmimport",
        TagSpecifications=[{"ResourceType": "export-image-task", "Tags": [{"Key": "k", "Value": "v"}]}],
    )
    task_id = started["ExportImageTaskId"]
    assert task_id.startswith("export-ami-") and len(task_id) == 28
    assert {k: v for k, v in started.items() if k != "ResponseMetadata"} == {
        "Description": "d",
        "DiskImageFormat": "VHD",
        "ExportImageTaskId": task_id,
        "ImageId": image_id,
        "RoleName": "vmimport",
        "Progress": "0",
        "S3ExportLocation": {"S3Bucket": "exports", "S3Prefix": "p/"},
        "Status": "active",
        "StatusMessage": "pending",
        "Tags": [{"Key": "k", "Value": "v"}],
    }
    store = appliance.service.store
    store.claim(task_id, "test-worker", 30)
    store.set_state(task_id, TaskState.FAILED, error_code="UploadFailed", error_message="NoSuchBucket")
    [task] = appliance.ec2.describe_export_image_tasks(ExportImageTaskIds=[task_id])["ExportImageTasks"]
    assert task["Status"] == "deleted" and task["StatusMessage"] == "ClientError: UploadFailed: NoSuchBucket"
    assert "Progress" not in task
    deleted = appliance.ec2.describe_export_image_tasks(
        Filters=[{"Name": "task-state", "Values": ["deleted"]}]
    )
    assert [t["ExportImageTaskId"] for t in deleted["ExportImageTasks"]] == [task_id]
    by_image = appliance.ec2.describe_export_image_tasks(Filters=[{"Name": "image-id", "Values": ["ami-1"]}])
    assert by_image["ExportImageTasks"] == []


def test_create_instance_export_task_of_a_cloud_instance_and_its_cancel(
    cloud_appliance: tuple[Appliance, Any, str],
) -> None:
    appliance, cloud, instance_id = cloud_appliance
    task = appliance.ec2.create_instance_export_task(
        InstanceId=instance_id,
        TargetEnvironment="vmware",
        ExportToS3Task={"DiskImageFormat": "VMDK", "S3Bucket": "exports", "S3Prefix": "vms/"},
        Description="web",
    )["ExportTask"]
    task_id = task["ExportTaskId"]
    assert task_id.startswith("export-i-") and len(task_id) == 26
    assert task == {
        "Description": "web",
        "ExportTaskId": task_id,
        "ExportToS3Task": {"DiskImageFormat": "VMDK", "S3Bucket": "exports", "S3Key": f"vms/{task_id}.vmdk"},
        "InstanceExportDetails": {"InstanceId": instance_id, "TargetEnvironment": "vmware"},
        "State": "active",
        "StatusMessage": "pending",
    }
    [reservation] = cloud.describe_instances(InstanceIds=[instance_id])["Reservations"]
    root = reservation["Instances"][0]["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    source = appliance.service.store.get_task(task_id).params["source"]
    assert source["volume_id"] == root
    # the OS an OVA of it would name: the cloud's Platform (EC2 sets it for Windows only)
    windows = reservation["Instances"][0].get("Platform") == "windows"
    assert source["platform"] == ("windows" if windows else "linux")
    active = appliance.ec2.describe_export_tasks(Filters=[{"Name": "state", "Values": ["active"]}])
    assert [t["ExportTaskId"] for t in active["ExportTasks"]] == [task_id]
    by_instance = appliance.ec2.describe_export_tasks(Filters=[{"Name": "instance-id", "Values": ["i-1"]}])
    assert by_instance["ExportTasks"] == []

    assert appliance.ec2.cancel_export_task(ExportTaskId=task_id)["ResponseMetadata"]["HTTPStatusCode"] == 200
    appliance.ec2.get_waiter("export_task_cancelled").wait(
        ExportTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 2}
    )
    [after] = appliance.ec2.describe_export_tasks(ExportTaskIds=[task_id])["ExportTasks"]
    assert after["State"] == "cancelled" and after["StatusMessage"] == "Cancelled by user"
    with pytest.raises(ClientError) as info:
        appliance.ec2.cancel_export_task(ExportTaskId=task_id)
    assert code_of(info) == "IncorrectState"
    # the waiter for completion stops at once on a cancelled (or failed) export
    with pytest.raises(WaiterError):
        appliance.ec2.get_waiter("export_task_completed").wait(
            ExportTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 1}
        )
    # the cloud's instance of another account does not exist for a caller of this one, nor an unknown id
    other = client(appliance.endpoint, OTHER_KEY)
    for caller, instance in [(other, instance_id), (appliance.ec2, "i-0123456789abcdef0")]:
        with pytest.raises(ClientError) as info:
            caller.create_instance_export_task(
                InstanceId=instance,
                TargetEnvironment="citrix",
                ExportToS3Task={"DiskImageFormat": "VHD", "S3Bucket": "exports"},
            )
        assert code_of(info) == "InvalidInstanceID.NotFound"
    with pytest.raises(ClientError) as info:
        other.describe_export_tasks(ExportTaskIds=[task_id])
    assert code_of(info) == "InvalidExportTaskID.NotFound"


def test_create_instance_export_task_with_the_ova_container_through_boto3_and_the_aws_cli(
    cloud_appliance: tuple[Appliance, Any, str],
) -> None:
    # ContainerFormat=ova (VMDK disks) is taken and the object's key ends in .ova; the written OVA
    # itself is read back in tests/appliance/service/test_exports.py
    appliance, _cloud, instance_id = cloud_appliance
    task = appliance.ec2.create_instance_export_task(
        InstanceId=instance_id,
        TargetEnvironment="vmware",
        ExportToS3Task={
            "ContainerFormat": "ova",
            "DiskImageFormat": "VMDK",
            "S3Bucket": "exports",
            "S3Prefix": "vms/",
        },
    )["ExportTask"]
    task_id = task["ExportTaskId"]
    assert task["ExportToS3Task"] == {
        "ContainerFormat": "ova",
        "DiskImageFormat": "VMDK",
        "S3Bucket": "exports",
        "S3Key": f"vms/{task_id}.ova",
    }
    assert appliance.service.store.get_task(task_id).params["container_format"] == "ova"
    out = aws_ec2(
        appliance.endpoint,
        "create-instance-export-task",
        "--instance-id",
        instance_id,
        "--target-environment",
        "vmware",
        "--export-to-s3-task",
        "ContainerFormat=ova,DiskImageFormat=VMDK,S3Bucket=exports",
    )
    assert out.returncode == 0, out.stderr
    cli_task = json.loads(out.stdout)["ExportTask"]
    assert cli_task["ExportToS3Task"]["S3Key"] == f"{cli_task['ExportTaskId']}.ova"
    assert cli_task["ExportToS3Task"]["ContainerFormat"] == "ova"
    for t in (task_id, cli_task["ExportTaskId"]):
        appliance.ec2.cancel_export_task(ExportTaskId=t)
    # an OVA holds VMDK disks only
    with pytest.raises(ClientError) as info:
        appliance.ec2.create_instance_export_task(
            InstanceId=instance_id,
            TargetEnvironment="vmware",
            ExportToS3Task={"ContainerFormat": "ova", "DiskImageFormat": "RAW", "S3Bucket": "exports"},
        )
    assert code_of(info) == "InvalidParameterValue"


def test_export_image_client_token_and_dry_run(appliance: Appliance, tmp_path: Path) -> None:
    image_id = issued_image(appliance.service.store, tmp_path)
    request = {
        "ImageId": image_id,
        "DiskImageFormat": "RAW",
        "S3ExportLocation": {"S3Bucket": "exports"},
        "ClientToken": "once",
    }
    first = appliance.ec2.export_image(**request)["ExportImageTaskId"]
    assert appliance.ec2.export_image(**request)["ExportImageTaskId"] == first
    with pytest.raises(ClientError) as info:
        appliance.ec2.export_image(**(request | {"DiskImageFormat": "VMDK"}))
    assert code_of(info) == "IdempotentParameterMismatch"
    with pytest.raises(ClientError) as info:
        appliance.ec2.export_image(**(request | {"ClientToken": "dry", "DryRun": True}))
    assert code_of(info) == "DryRunOperation"
    with pytest.raises(ClientError) as info:
        appliance.ec2.export_image(**(request | {"ImageId": "ami-0123456789abcdef0", "DryRun": True}))
    assert code_of(info) == "InvalidAMIID.NotFound"
    assert len(appliance.ec2.describe_export_image_tasks()["ExportImageTasks"]) == 1


def test_bad_export_requests_are_refused_before_anything_is_queued(
    appliance: Appliance, tmp_path: Path
) -> None:
    image_id = issued_image(appliance.service.store, tmp_path)
    instance_id = "i-0123456789abcdef0"
    s3 = {"DiskImageFormat": "VMDK", "S3Bucket": "exports"}
    cases = [
        (
            lambda: appliance.ec2.create_instance_export_task(
                InstanceId=instance_id, TargetEnvironment="hyperv", ExportToS3Task=s3
            ),
            "InvalidParameterValue",
        ),
        (
            lambda: appliance.ec2.create_instance_export_task(
                InstanceId=instance_id, TargetEnvironment="vmware", ExportToS3Task={"S3Bucket": "exports"}
            ),
            "MissingParameter",
        ),
        (
            lambda: appliance.ec2.create_instance_export_task(
                InstanceId="i-123", TargetEnvironment="vmware", ExportToS3Task=s3
            ),
            "InvalidInstanceID.Malformed",
        ),
        (
            lambda: appliance.ec2.create_instance_export_task(
                InstanceId=instance_id,
                TargetEnvironment="vmware",
                ExportToS3Task=s3 | {"S3Bucket": "Bad_Bucket"},
            ),
            "InvalidParameterValue",
        ),
        (
            lambda: appliance.ec2.export_image(
                ImageId=image_id,
                DiskImageFormat="VMDK",
                S3ExportLocation={"S3Bucket": "exports"},
                Description="x" * 256,
            ),
            "InvalidParameterValue",
        ),
        (lambda: appliance.ec2.describe_export_image_tasks(MaxResults=501), "InvalidParameterValue"),
        (
            lambda: appliance.ec2.describe_export_tasks(Filters=[{"Name": "owner", "Values": ["x"]}]),
            "InvalidParameterValue",
        ),
        (
            lambda: appliance.ec2.describe_export_tasks(ExportTaskIds=["export-ami-0123456789abcdef0"]),
            "InvalidExportTaskID.NotFound",
        ),
    ]
    for call, code in cases:
        with pytest.raises(ClientError) as info:
            call()
        assert code_of(info) == code
    assert appliance.ec2.describe_export_tasks()["ExportTasks"] == []
    assert appliance.ec2.describe_export_image_tasks()["ExportImageTasks"] == []


def test_a_failed_instance_export_shows_cancelled_with_the_client_error_and_stops_the_waiter(
    cloud_appliance: tuple[Appliance, Any, str],
) -> None:
    # ExportTaskState has no failed: AWS ends a failed export as cancelled, its reason a ClientError
    appliance, _cloud, instance_id = cloud_appliance
    task_id = appliance.ec2.create_instance_export_task(
        InstanceId=instance_id,
        TargetEnvironment="microsoft",
        ExportToS3Task={"DiskImageFormat": "VHD", "S3Bucket": "exports", "S3Prefix": "hyperv/"},
    )["ExportTask"]["ExportTaskId"]
    store = appliance.service.store
    store.claim(task_id, "test-worker", 30)
    store.set_state(task_id, TaskState.FAILED, error_code="NotExportable", error_message="no EBS root")
    [task] = appliance.ec2.describe_export_tasks(ExportTaskIds=[task_id])["ExportTasks"]
    assert task["State"] == "cancelled" and task["StatusMessage"] == "ClientError: NotExportable: no EBS root"
    assert task["ExportToS3Task"]["S3Key"] == f"hyperv/{task_id}.vhd"
    assert task["InstanceExportDetails"] == {"InstanceId": instance_id, "TargetEnvironment": "microsoft"}
    cancelled = appliance.ec2.describe_export_tasks(Filters=[{"Name": "state", "Values": ["cancelled"]}])
    assert [t["ExportTaskId"] for t in cancelled["ExportTasks"]] == [task_id]
    with pytest.raises(WaiterError):
        appliance.ec2.get_waiter("export_task_completed").wait(
            ExportTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 1}
        )
    with pytest.raises(ClientError) as info:
        appliance.ec2.cancel_export_task(ExportTaskId=task_id)
    assert code_of(info) == "IncorrectState"
