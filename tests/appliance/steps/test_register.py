"""``image.register`` through the real engine against the moto EC2 server: the image is registered with
the kernel, ramdisk and virtualization type of the task's ``boot`` result, recorded in the task result,
and deregistered when a later step fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import botocore.session
import pytest

from appliance import config as config_mod
from appliance.errors import ConfigError
from appliance.steps.register import register_request
from appliance.store import TaskState
from appliance.workflow import Engine
from tests.servers import MotoServer

from ..workflow.support import config_dict, make_registry, write_workflow


@pytest.fixture
def engine(tmp_path: Path, moto: MotoServer) -> Engine:
    raw = config_dict(tmp_path)
    raw["targets"] = {
        "volume": {
            "type": "ec2",
            "endpoint_url": moto.endpoint,
            "region": "us-east-1",
            "access_key": "testing",
            "secret_key": "testing",
            "instance_id": "i-00000001",
        }
    }
    e = Engine(config_mod.from_dict(raw, base_dir=tmp_path), registry=make_registry(), poll_interval=0.05)
    yield e
    e.store.close()


BOOT = {
    "kernel_id": "eki-12345678",
    "ramdisk_id": "eri-12345678",
    "virtualization_type": None,
    "layout": "partition",
}


def _steps(register: dict[str, Any], *, fail_after: bool = False) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {"name": "boot", "action": "util.echo", "with": BOOT, "register": "boot"},
        {"name": "register", "action": "image.register", "with": register, "register": "registered"},
    ]
    if fail_after:
        steps.append({"name": "later", "action": "util.fail", "with": {"message": "a later step fails"}})
    return {"steps": steps}


def test_a_bundle_is_registered_with_the_boot_results_kernel_and_recorded_in_the_task_result(
    engine: Engine, tmp_path: Path, moto: MotoServer
) -> None:
    write_workflow(
        tmp_path,
        "reg",
        _steps(
            {"name": "bundled disk", "image_location": "images/disk.img.manifest.xml", "boot": "{{ boot }}"}
        ),
    )
    task = engine.run(engine.submit("reg"))
    assert task.state is TaskState.COMPLETED, task.error_message
    registered = task.result["registered"]
    assert registered["image_id"].startswith("ami-")
    assert registered["request"]["KernelId"] == "eki-12345678"
    assert registered["request"]["RamdiskId"] == "eri-12345678"
    assert registered["request"]["VirtualizationType"] == "paravirtual"
    images = moto.client("ec2").describe_images(ImageIds=[registered["image_id"]])["Images"]
    assert [i["Name"] for i in images] == ["bundled disk"]


def test_an_ebs_registration_is_deregistered_when_a_later_step_fails(
    engine: Engine, tmp_path: Path, moto: MotoServer
) -> None:
    ec2 = moto.client("ec2")
    volume = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
    write_workflow(
        tmp_path,
        "ebs",
        _steps({"name": "ebs disk", "snapshot_id": snapshot, "boot": "{{ boot }}"}, fail_after=True),
    )
    before = {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]}
    task = engine.run(engine.submit("ebs"))
    assert task.state is not TaskState.COMPLETED
    after = {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]}
    assert after == before, "the image registered by the failed task was deregistered"


def test_the_request_is_what_botocore_puts_on_the_wire_for_register_image() -> None:
    request = register_request(
        name="ebs disk",
        snapshot_id="snap-0123456789abcdef0",
        architecture="x86_64",
        boot={"kernel_id": None, "virtualization_type": None},
        block_device_mappings=[{"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"}],
    )
    serializer = (
        botocore.session.get_session()
        .create_client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        ._serializer
    )
    model = botocore.session.get_session().get_service_model("ec2").operation_model("RegisterImage")
    body = serializer.serialize_to_request(request, model)["body"]
    assert body["Action"] == "RegisterImage" and body["VirtualizationType"] == "hvm"
    assert body["RootDeviceName"] == "/dev/sda1"
    assert body["BlockDeviceMapping.1.DeviceName"] == "/dev/sda1"
    assert body["BlockDeviceMapping.1.Ebs.SnapshotId"] == "snap-0123456789abcdef0"
    assert body["BlockDeviceMapping.2.VirtualName"] == "ephemeral0"
    with pytest.raises(ConfigError):
        register_request(name="neither")
