"""Exporting an instance of the controlling cloud (moto's EC2 server) whose disk is a real loop device.

What is simulated is what test_ec2.py simulates: moto attaches no disk, so its FakeHypervisor links the
volume the export attaches here to one of the test's loop devices, which holds the bytes the
snapshot's copy would hold. Everything on the appliance side (DescribeInstances, CreateSnapshot,
CreateVolume, AttachVolume, the lookup by serial, the read, the upload to S3, the detach and the
deletes) is the real code, run by the real engine through the export-instance workflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ImagingError
from appliance.service.exports import ExportService, object_key
from appliance.store import TaskState
from appliance.targets.ec2 import TASK_TAG
from appliance.workflow.engine import Engine
from tests import stores
from tests.appliance.targets.test_ec2 import cloud, volume_state  # noqa: F401 (a fixture)
from tests.servers import REGION, MotoServer

pytestmark = pytest.mark.slow

MiB = 1 << 20


def test_a_cloud_instance_exports_from_a_snapshot_copy_and_leaves_nothing_behind(
    tmp_path: Path,
    moto: MotoServer,
    cloud: dict[str, Any],  # noqa: F811
) -> None:
    ec2, s3 = cloud["ec2"], moto.client("s3")
    s3.create_bucket(Bucket="exports-cloud")
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    source = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro")[
        "Instances"
    ][0]
    root_volume = source["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    # the copy's bytes: what the loop device the hypervisor links to the new volume holds
    content = os.urandom(MiB) + bytes(6 * MiB) + os.urandom(MiB)
    with open(cloud["loops"][0], "r+b") as dev:
        dev.write(content)
    cfg = stores.config(
        {
            "state_dir": str(tmp_path / "state"),
            "sources": {
                "allowed_endpoints": [moto.endpoint],
                "s3": {
                    "endpoint_url": moto.endpoint,
                    "region": REGION,
                    "access_key": "testing",
                    "secret_key": "testing",
                },
            },
            "targets": {"volume": cloud["settings"]},
        },
        base_dir=tmp_path,
    )

    def attached_to_appliance() -> set[str]:
        volumes = ec2.describe_volumes(
            Filters=[{"Name": "attachment.instance-id", "Values": [cloud["instance"]["InstanceId"]]}]
        )["Volumes"]
        return {v["VolumeId"] for v in volumes}

    before = attached_to_appliance()
    exports = ExportService(cfg)
    try:
        with pytest.raises(ImagingError) as exc:
            exports.export_instance(
                "i-0123456789abcdef0",
                target_environment="vmware",
                disk_image_format="RAW",
                bucket="exports-cloud",
            )
        assert exc.value.code == "InvalidInstanceID.NotFound"

        task = exports.export_instance(
            source["InstanceId"], target_environment="vmware", disk_image_format="RAW", bucket="exports-cloud"
        )
        assert task.id.startswith("export-i-")
        assert task.params["source"]["volume_id"] == root_volume
        with cloud["hypervisor"]():
            engine = Engine(cfg, poll_interval=0.1)
            try:
                done = engine.run(task.id)
            finally:
                engine.store.close()
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        body = s3.get_object(Bucket="exports-cloud", Key=object_key(task))["Body"].read()
        assert body == content

        # what the export created is gone; the instance and its volume are untouched
        tagged = [{"Name": f"tag:{TASK_TAG}", "Values": [task.id]}]
        assert ec2.describe_volumes(Filters=tagged)["Volumes"] == []
        assert ec2.describe_snapshots(Filters=tagged)["Snapshots"] == []
        root = volume_state(ec2, root_volume)
        assert root is not None and root["Attachments"][0]["InstanceId"] == source["InstanceId"]
        assert attached_to_appliance() == before
        assert done.result["exported"]["provenance"]["source"]["type"] == "cloud-instance"
    finally:
        exports.store.close()
        ec2.terminate_instances(InstanceIds=[source["InstanceId"]])
