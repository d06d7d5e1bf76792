"""CreateImage of an instance with EBS volumes through the moto EC2 server (appliance.targets.ec2_images):
every EBS volume is snapshotted and the snapshots registered as one image at the instance's root device."""

from __future__ import annotations

import pytest

from appliance.errors import UsageError
from appliance.targets.ec2_images import CreateImageFailed, apply_mappings, create_image_from_instance
from tests.servers import MotoServer


def test_an_instance_with_two_ebs_volumes_becomes_an_image_of_their_snapshots(moto: MotoServer) -> None:
    ec2 = moto.client("ec2")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(
        ImageId=ami, MinCount=1, MaxCount=1, Placement={"AvailabilityZone": "us-east-1a"}
    )["Instances"][0]
    data = ec2.create_volume(Size=2, AvailabilityZone="us-east-1a")["VolumeId"]
    ec2.attach_volume(VolumeId=data, InstanceId=instance["InstanceId"], Device="/dev/sdf")
    described = ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"][0]["Instances"][
        0
    ]
    volumes = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in described["BlockDeviceMappings"]}
    assert len(volumes) == 2, described["BlockDeviceMappings"]

    created = create_image_from_instance(
        ec2, instance["InstanceId"], "web server (2026)", sleep=lambda _s: None
    )

    assert set(created.snapshots) == set(volumes)
    snaps = ec2.describe_snapshots(SnapshotIds=list(created.snapshots.values()))["Snapshots"]
    assert {s["SnapshotId"]: s["VolumeId"] for s in snaps} == {
        created.snapshots[device]: volume for device, volume in volumes.items()
    }
    assert created.request["RootDeviceName"] == described["RootDeviceName"]
    assert [m["DeviceName"] for m in created.request["BlockDeviceMappings"]] == list(volumes)
    image = ec2.describe_images(ImageIds=[created.image_id])["Images"][0]
    assert image["Name"] == "web server (2026)"


def test_an_unknown_instance_is_a_coded_failure(moto: MotoServer) -> None:
    with pytest.raises(CreateImageFailed):
        create_image_from_instance(
            moto.client("ec2"), "i-0123456789abcdef0", "nothing", sleep=lambda _s: None
        )


def test_create_image_block_device_mappings_leave_out_set_or_add_but_never_change_a_volume() -> None:
    own = [
        {"DeviceName": "/dev/sda1", "Ebs": {"VolumeId": "vol-1", "DeleteOnTermination": True}},
        {"DeviceName": "/dev/sdf", "Ebs": {"VolumeId": "vol-2", "DeleteOnTermination": False}},
    ]
    kept, extra = apply_mappings(
        "/dev/sda1",
        own,
        [
            {"DeviceName": "/dev/sdf", "NoDevice": ""},
            {"DeviceName": "/dev/sda1", "Ebs": {"DeleteOnTermination": False}},
            {"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"},
        ],
    )
    assert kept == [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeId": "vol-1", "DeleteOnTermination": False}}]
    assert extra == [{"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"}]
    assert own[0]["Ebs"]["DeleteOnTermination"] is True  # the instance's description is not changed
    for refused in (
        {"DeviceName": "/dev/sda1", "NoDevice": ""},
        {"DeviceName": "/dev/sdf", "Ebs": {"VolumeSize": 100}},
        {"DeviceName": "/dev/sdf", "Ebs": {"Encrypted": True}},
        {"Ebs": {"VolumeSize": 1}},
    ):
        with pytest.raises(UsageError):
            apply_mappings("/dev/sda1", own, [refused])
