"""Export as clients see it: `imaging serve` and `imaging worker` as real processes, S3 on the moto server,
boto3 and the AWS CLI as clients (every response parsed by botocore), the exported disk compared with
the imported original by ``qemu-img compare``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from appliance import config as config_mod
from appliance.targets.exportdest import FileDestination
from appliance.targets.exportova import OvaSource, export_ova
from tests import guestfactory
from tests.api.awscli_support import aws_ec2
from tests.api.e2e_support import Appliance, admin_task, wait_for
from tests.servers import MotoServer

pytestmark = pytest.mark.slow


def _import(appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path) -> tuple[Path, str]:
    """ImportImage of a bootable Linux disk (VHD in a user bucket) through the API; (the RAW disk, ami id)."""
    raw = guestfactory.linux_disk(tmp_path)
    vhd = guestfactory.convert(raw, tmp_path / "disk.vhd", "vpc", "force_size=on")
    moto.client("s3").upload_file(str(vhd), bucket, "disks/disk.vhd")
    task_id = appliance.ec2.import_image(
        DiskContainers=[{"Format": "VHD", "UserBucket": {"S3Bucket": bucket, "S3Key": "disks/disk.vhd"}}]
    )["ImportTaskId"]

    def status() -> dict[str, Any]:
        return appliance.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]

    wait_for(lambda: status()["Status"] in ("completed", "deleted"), what="the image import")
    assert status()["Status"] == "completed", status()
    return raw, status()["ImageId"]


def test_import_then_export_image_with_boto3_and_the_aws_cli_matches_the_original(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    raw, image_id = _import(appliance, moto, bucket, tmp_path)
    s3 = moto.client("s3")

    # boto3: ExportImage to VMDK (stream-optimized)
    started = appliance.ec2.export_image(
        ImageId=image_id,
        DiskImageFormat="VMDK",
        S3ExportLocation={"S3Bucket": bucket, "S3Prefix": "exports/"},
        Description="round trip",
        RoleName="vmimport",
    )
    export_id = started["ExportImageTaskId"]
    assert export_id.startswith("export-ami-") and started["Status"] == "active"
    assert started["DiskImageFormat"] == "VMDK" and started["RoleName"] == "vmimport"
    assert started["S3ExportLocation"] == {"S3Bucket": bucket, "S3Prefix": "exports/"}

    def export_status() -> dict[str, Any]:
        tasks = appliance.ec2.describe_export_image_tasks(ExportImageTaskIds=[export_id])["ExportImageTasks"]
        return tasks[0]

    wait_for(lambda: export_status()["Status"] in ("completed", "deleted"), what="the export")
    final = export_status()
    assert final["Status"] == "completed", final
    assert "Progress" not in final
    exported = tmp_path / "exported.vmdk"
    s3.download_file(bucket, f"exports/{export_id}.vmdk", str(exported))
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "vmdk", str(raw), str(exported)],
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    # provenance on /v1/tasks/{id}
    shown = admin_task(appliance, export_id)
    record = shown["provenance"]
    assert record == shown["task"]["result"]["exported"]["provenance"]
    # a dynamic VHD went through scratch: the file target recorded the plain sha256 as it copied the
    # image, and the export checked that on its one read of the stored disk
    assert (
        record["source"]["id"] == image_id
        and record["source"]["sha256"] == record["source"]["recorded_sha256"]
    )

    # the AWS CLI: export-image (VHD), describe-export-image-tasks with a filter and pagination
    out = aws_ec2(
        appliance.endpoint,
        "export-image",
        "--image-id",
        image_id,
        "--disk-image-format",
        "VHD",
        "--s3-export-location",
        f"S3Bucket={bucket},S3Prefix=cli/",
    )
    assert out.returncode == 0, out.stderr
    cli_id = json.loads(out.stdout)["ExportImageTaskId"]

    def cli_status() -> dict[str, Any]:
        r = aws_ec2(
            appliance.endpoint, "describe-export-image-tasks", "--export-image-task-ids", cli_id, check=True
        )
        return json.loads(r.stdout)["ExportImageTasks"][0]

    wait_for(lambda: cli_status()["Status"] in ("completed", "deleted"), what="the CLI export")
    assert cli_status()["Status"] == "completed", cli_status()
    vhd = tmp_path / "exported.vhd"
    s3.download_file(bucket, f"cli/{cli_id}.vhd", str(vhd))
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "vpc", str(raw), str(vhd)], capture_output=True, text=True
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr

    first = appliance.ec2.describe_export_image_tasks(MaxResults=1)
    assert len(first["ExportImageTasks"]) == 1 and first["NextToken"]
    second = appliance.ec2.describe_export_image_tasks(MaxResults=1, NextToken=first["NextToken"])
    assert "NextToken" not in second
    assert {
        first["ExportImageTasks"][0]["ExportImageTaskId"],
        second["ExportImageTasks"][0]["ExportImageTaskId"],
    } == {
        export_id,
        cli_id,
    }
    completed = appliance.ec2.describe_export_image_tasks(
        Filters=[{"Name": "task-state", "Values": ["completed"]}]
    )
    assert len(completed["ExportImageTasks"]) == 2
    active = appliance.ec2.describe_export_image_tasks(Filters=[{"Name": "task-state", "Values": ["active"]}])
    assert active["ExportImageTasks"] == []


def test_unknown_ids_answer_ec2_not_found_codes_through_boto3_and_the_aws_cli(
    appliance: Appliance, bucket: str
) -> None:
    calls = [
        (
            lambda: appliance.ec2.create_instance_export_task(
                InstanceId="i-0123456789abcdef0",
                TargetEnvironment="vmware",
                ExportToS3Task={"DiskImageFormat": "VMDK", "S3Bucket": bucket, "S3Prefix": "vms/"},
            ),
            "InvalidInstanceID.NotFound",
        ),
        (
            lambda: appliance.ec2.export_image(
                ImageId="ami-0123456789abcdef0", DiskImageFormat="RAW", S3ExportLocation={"S3Bucket": bucket}
            ),
            "InvalidAMIID.NotFound",
        ),
        (
            lambda: appliance.ec2.describe_export_tasks(ExportTaskIds=["export-i-0123456789abcdef0"]),
            "InvalidExportTaskID.NotFound",
        ),
        (
            lambda: appliance.ec2.cancel_export_task(ExportTaskId="export-i-0123456789abcdef0"),
            "InvalidExportTaskID.NotFound",
        ),
        (
            lambda: appliance.ec2.describe_export_image_tasks(
                ExportImageTaskIds=["export-ami-0123456789abcdef0"]
            ),
            "InvalidExportTaskID.NotFound",
        ),
        (
            lambda: appliance.ec2.export_image(
                ImageId="ami-0123456789abcdef0",
                DiskImageFormat="QCOW2",
                S3ExportLocation={"S3Bucket": bucket},
            ),
            "InvalidParameterValue",
        ),
    ]
    for call, code in calls:
        with pytest.raises(botocore.exceptions.ClientError) as exc:
            call()
        assert exc.value.response["Error"]["Code"] == code
    assert appliance.ec2.describe_export_tasks()["ExportTasks"] == []
    assert appliance.ec2.describe_export_image_tasks()["ExportImageTasks"] == []

    for argv, code in [
        (
            [
                "create-instance-export-task",
                "--instance-id",
                "i-0123456789abcdef0",
                "--target-environment",
                "vmware",
                "--export-to-s3-task",
                f"DiskImageFormat=RAW,ContainerFormat=ova,S3Bucket={bucket},S3Prefix=vms/",
            ],
            "InvalidParameterValue",
        ),  # an OVA holds VMDK disks only
        (
            [
                "create-instance-export-task",
                "--instance-id",
                "i-0123456789abcdef0",
                "--target-environment",
                "vmware",
                "--export-to-s3-task",
                f"DiskImageFormat=VMDK,S3Bucket={bucket},S3Prefix=vms/",
            ],
            "InvalidInstanceID.NotFound",
        ),
        (
            ["cancel-export-task", "--export-task-id", "export-i-0123456789abcdef0"],
            "InvalidExportTaskID.NotFound",
        ),
        (
            ["describe-export-tasks", "--export-task-ids", "export-i-0123456789abcdef0"],
            "InvalidExportTaskID.NotFound",
        ),
    ]:
        r = aws_ec2(appliance.endpoint, *argv)
        assert r.returncode != 0 and f"({code})" in r.stderr, (argv, r.stderr)
    r = aws_ec2(appliance.endpoint, "describe-export-tasks", check=True)
    assert json.loads(r.stdout) == {"ExportTasks": []}


def test_an_ova_imports_with_boto3_its_boot_disk_becoming_the_image(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    # a two-disk OVA written by the project's OVA writer: ImportImage Format=ova stores the boot
    # disk (qemu-img compare with the original) and records the data disk (stored too: test_e2e_multidisk.py)
    boot = guestfactory.linux_disk(tmp_path)
    data = tmp_path / "data.raw"
    data.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    ova = tmp_path / "vm.ova"
    (tmp_path / "ova-work").mkdir()
    export_ova(
        [OvaSource(boot), OvaSource(data)],
        FileDestination(ova),
        name="vm",
        config=config_mod.load(appliance.config),
        workdir=tmp_path / "ova-work",
    )
    moto.client("s3").upload_file(str(ova), bucket, "vms/vm.ova")
    task_id = appliance.ec2.import_image(
        DiskContainers=[{"Format": "ova", "UserBucket": {"S3Bucket": bucket, "S3Key": "vms/vm.ova"}}]
    )["ImportTaskId"]

    def status() -> dict[str, Any]:
        return appliance.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]

    wait_for(lambda: status()["Status"] in ("completed", "deleted"), what="the OVA import")
    assert status()["Status"] == "completed", status()
    result = admin_task(appliance, task_id)["task"]["result"]
    stored = Path(result["disk"]["stored"]["path"])
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(boot), str(stored)],
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    opened = result["disk"]["opened"]
    assert [d["name"] for d in opened["ova"]["disks"]] == ["vm-disk1.vmdk", "vm-disk2.vmdk"]
    assert opened["ova"]["manifest_verified"]
    [second] = opened["data_disks"]
    assert second["capacity"] == data.stat().st_size and second["format"] == "vmdk"
