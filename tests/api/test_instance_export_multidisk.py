"""CreateInstanceExportTask of an instance with several disks, through boto3: the OVA container holds all
of them (issue 13 §4), the root device first; without a container the request is refused as AWS refuses it
(``UnsupportedOperation``, "This instance has multiple volumes attached", ec2-import-api.md §10).

The source is an instance of the controlling cloud (the moto EC2 server) with two EBS volumes. What is
simulated is what tests/appliance/targets/test_ec2_export.py simulates: moto attaches no disk, so the
:class:`FakeHypervisor` links each volume copy the export attaches here to one of the test's loop devices,
which hold the bytes the copies would hold (the copies are attached one after another, root first, so the
first loop device is the root's copy). The API (in a thread), the engine running the export-instance
workflow, the S3 upload (moto server) and the re-import are the real code.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from api.app import create_app
from appliance.config import Config
from appliance.image.ova import unpack_ova
from appliance.service.imports import ImportService
from appliance.store import TaskState
from appliance.targets.ec2 import TASK_TAG
from appliance.workflow.engine import Engine
from tests import guestfactory, stores
from tests.api.ec2_support import wsgi_server
from tests.appliance.targets.test_device import loop_device
from tests.appliance.targets.test_ec2 import FakeHypervisor
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer

pytestmark = pytest.mark.slow

MiB = 1 << 20
BUCKET = "exports-multidisk"


def _run(config: Config, task_id: str) -> Any:
    engine = Engine(config, poll_interval=0.1)
    try:
        return engine.run(task_id)
    finally:
        engine.store.close()


def _compare(raw: Path, other: Path, fmt: str) -> None:
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(other)], capture_output=True, text=True
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr


@pytest.fixture
def two_disk_cloud(moto: MotoServer, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The appliance's instance and a two-disk source instance in moto, the API on the ``ec2`` volume
    target, and two loop devices holding what the copies of the source's root and data volumes read."""
    ec2 = moto.client("ec2")
    # a Linux image: the source disks hold a Linux guest, and the OVA names the instance's OS as the
    # cloud reports it (its Platform), which the re-import checks against the boot disk
    image = next(
        i for i in ec2.describe_images(Owners=["amazon"])["Images"] if i.get("Platform") != "windows"
    )
    me = ec2.run_instances(ImageId=image["ImageId"], MinCount=1, MaxCount=1, InstanceType="t3.micro")[
        "Instances"
    ][0]["InstanceId"]
    root_device = image.get("RootDeviceName") or "/dev/sda1"
    # the data disk is listed first: the export must still put the root device first
    run = ec2.run_instances(
        ImageId=image["ImageId"],
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.micro",
        BlockDeviceMappings=[
            {"DeviceName": "/dev/sdf", "Ebs": {"VolumeSize": 1}},
            {"DeviceName": root_device, "Ebs": {"VolumeSize": 2}},
        ],
    )
    source = run["Instances"][0]
    boot = guestfactory.linux_disk(tmp_path)
    data = tmp_path / "data.raw"
    data.write_bytes(os.urandom(MiB) + bytes(5 * MiB) + os.urandom(MiB))
    device_dir = tmp_path / "by-id"
    device_dir.mkdir()
    volume = {
        "type": "ec2",
        "endpoint_url": moto.endpoint,
        "region": REGION,
        "access_key": TEST_ACCESS_KEY,
        "secret_key": TEST_SECRET_KEY,
        "instance_id": me,
        "device_dir": str(device_dir),
        "poll_interval": 0.05,
        "wait_timeout": 10,
        "device_timeout": 10,
    }
    s3 = {"endpoint_url": moto.endpoint, "region": REGION, "access_key": "testing", "secret_key": "testing"}
    config = stores.config(
        {
            "state_dir": str(tmp_path / "state"),
            "api": {
                "credentials": [
                    {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY, "account": run["OwnerId"]}
                ]
            },
            "sources": {"allowed_endpoints": [moto.endpoint], "s3": s3},
            "targets": {"volume": volume},
        },
        base_dir=tmp_path,
    )
    moto.client("s3").create_bucket(Bucket=BUCKET)
    service = ImportService(config)
    with ExitStack() as stack:
        loops = []
        for disk in (boot, data):
            loop = stack.enter_context(loop_device(tmp_path / f"{disk.name}.loop", disk.stat().st_size))
            with open(loop, "r+b") as dev:
                dev.write(disk.read_bytes())
            loops.append(loop)
        endpoint = stack.enter_context(wsgi_server(create_app(config, service=service)))
        api = boto3.client(
            "ec2",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
            config=BotoConfig(retries={"max_attempts": 1}),
        )
        try:
            yield {
                "api": api,
                "config": config,
                "service": service,
                "ec2": ec2,
                "s3": moto.client("s3"),
                "source": source,
                "root_device": root_device,
                "disks": [boot, data],
                "hypervisor": lambda: FakeHypervisor(ec2, me, device_dir, loops),
            }
        finally:
            service.store.close()
            ec2.terminate_instances(InstanceIds=[me, source["InstanceId"]])


def test_a_two_disk_instance_exports_as_one_ova_root_first_and_reimports(
    two_disk_cloud: dict[str, Any], tmp_path: Path
) -> None:
    cloud = two_disk_cloud
    api, s3, instance_id = cloud["api"], cloud["s3"], cloud["source"]["InstanceId"]
    boot, data = cloud["disks"]

    # without the OVA container: refused, as AWS refuses a multi-volume instance; nothing queued
    with pytest.raises(ClientError) as refused:
        api.create_instance_export_task(
            InstanceId=instance_id,
            TargetEnvironment="vmware",
            ExportToS3Task={"DiskImageFormat": "VMDK", "S3Bucket": BUCKET},
        )
    assert refused.value.response["Error"]["Code"] == "UnsupportedOperation"
    assert "multiple volumes" in refused.value.response["Error"]["Message"]
    assert api.describe_export_tasks()["ExportTasks"] == []

    task = api.create_instance_export_task(
        InstanceId=instance_id,
        TargetEnvironment="vmware",
        ExportToS3Task={
            "ContainerFormat": "ova",
            "DiskImageFormat": "VMDK",
            "S3Bucket": BUCKET,
            "S3Prefix": "vms/",
        },
    )["ExportTask"]
    task_id = task["ExportTaskId"]
    key = f"vms/{task_id}.ova"
    assert task["ExportToS3Task"]["S3Key"] == key
    with cloud["hypervisor"]():
        done = _run(cloud["config"], task_id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    [described] = api.describe_export_tasks(ExportTaskIds=[task_id])["ExportTasks"]
    assert described["State"] == "completed"

    ova = tmp_path / "exported.ova"
    s3.download_file(BUCKET, key, str(ova))
    # the tar, as Python's tarfile reads it: .ovf, .mf, then the disks, root first
    with tarfile.open(ova) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == [f"{task_id}.ovf", f"{task_id}.mf", f"{task_id}-disk1.vmdk", f"{task_id}-disk2.vmdk"]
        assert all(m.isreg() for m in members)
        blobs = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    manifest = blobs[f"{task_id}.mf"].decode()
    assert manifest.splitlines() == [
        f"SHA256({name})= {hashlib.sha256(blobs[name]).hexdigest()}"
        for name in names
        if not name.endswith(".mf")
    ]
    ovf = blobs[f"{task_id}.ovf"].decode()
    assert ovf.index(f"{task_id}-disk1.vmdk") < ovf.index(f"{task_id}-disk2.vmdk")

    # the project's OVA reader: manifest verified, two disks in order, each identical to its source
    with open(ova, "rb") as f:
        package = unpack_ova(f, tmp_path / "unpacked", config=cloud["config"])
    try:
        assert package.manifest_verified
        assert [d.name for d in package.disks] == [f"{task_id}-disk1.vmdk", f"{task_id}-disk2.vmdk"]
        assert [d.capacity for d in package.disks] == [boot.stat().st_size, data.stat().st_size]
        for disk, original in zip(package.disks, (boot, data), strict=True):
            _compare(original, disk.path, "vmdk")
    finally:
        package.remove()

    # provenance names both volumes, root first; what the export created in the cloud is gone
    volumes = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in cloud["source"]["BlockDeviceMappings"]}
    disks = done.result["exported"]["provenance"]["sources"]
    assert [(d["device_name"], d["volume_id"]) for d in disks] == [
        (cloud["root_device"], volumes[cloud["root_device"]]),
        ("/dev/sdf", volumes["/dev/sdf"]),
    ]
    assert [d["size"] for d in disks] == [boot.stat().st_size, data.stat().st_size]
    tagged = [{"Name": f"tag:{TASK_TAG}", "Values": [task_id]}]
    assert cloud["ec2"].describe_volumes(Filters=tagged)["Volumes"] == []
    assert cloud["ec2"].describe_snapshots(Filters=tagged)["Snapshots"] == []

    # round trip: ImportImage Format=ova of the exported object stores the boot disk and records the data disk
    imported = api.import_image(
        DiskContainers=[{"Format": "ova", "UserBucket": {"S3Bucket": BUCKET, "S3Key": key}}]
    )["ImportTaskId"]
    again = _run(cloud["config"], imported)
    assert again.state is TaskState.COMPLETED, (again.error_code, again.error_message)
    result = again.result
    _compare(boot, Path(result["disk"]["stored"]["path"]), "raw")
    opened = result["disk"]["opened"]
    assert [d["name"] for d in opened["ova"]["disks"]] == [f"{task_id}-disk1.vmdk", f"{task_id}-disk2.vmdk"]
    [second] = opened["data_disks"]
    assert second["capacity"] == data.stat().st_size and second["format"] == "vmdk"
