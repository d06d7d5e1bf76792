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


class _Recording:
    """The real boto3 client of the moto server, recording the names of the calls made through it (moto
    keeps no history: a stopped and restarted instance looks like one that never stopped)."""

    def __init__(self, client: object) -> None:
        self.client, self.calls = client, []  # type: ignore[var-annotated]

    def __getattr__(self, name: str) -> object:
        method = getattr(self.client, name)

        def call(*args: object, **kwargs: object) -> object:
            self.calls.append(name)
            return method(*args, **kwargs)

        return call


def _running_instance(ec2: object) -> str:
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]  # type: ignore[attr-defined]
    return ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]  # type: ignore[attr-defined,no-any-return]


def test_without_no_reboot_the_instance_is_stopped_for_the_snapshots_and_started_again(
    moto: MotoServer,
) -> None:
    ec2 = _Recording(moto.client("ec2"))
    instance = _running_instance(ec2.client)
    create_image_from_instance(ec2, instance, "consistent", sleep=lambda _s: None)
    calls = [
        c
        for c in ec2.calls
        if c in ("stop_instances", "create_snapshot", "register_image", "start_instances")
    ]
    assert calls == ["stop_instances", "create_snapshot", "register_image", "start_instances"]
    state = ec2.client.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] in ("pending", "running")

    ec2.calls.clear()
    create_image_from_instance(ec2, instance, "hot", no_reboot=True, sleep=lambda _s: None)
    assert "stop_instances" not in ec2.calls and "start_instances" not in ec2.calls


def test_a_failed_create_image_still_starts_the_instance_it_stopped(moto: MotoServer) -> None:
    ec2 = _Recording(moto.client("ec2"))
    instance = _running_instance(ec2.client)
    root = ec2.client.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0][
        "RootDeviceName"
    ]
    with pytest.raises(UsageError):
        # refused once the instance is stopped: its root device cannot be left out
        create_image_from_instance(
            ec2,
            instance,
            "rootless",
            block_device_mappings=[{"DeviceName": root, "NoDevice": ""}],
            sleep=lambda _s: None,
        )
    assert ec2.calls.count("stop_instances") == 1 and ec2.calls.count("start_instances") == 1
    assert "register_image" not in ec2.calls


def test_tag_specifications_tag_the_image_and_the_snapshots_and_other_types_are_refused(
    moto: MotoServer,
) -> None:
    ec2 = moto.client("ec2")
    instance = _running_instance(ec2)
    created = create_image_from_instance(
        ec2,
        instance,
        "tagged",
        no_reboot=True,
        tag_specifications=[
            {"ResourceType": "image", "Tags": [{"Key": "team", "Value": "web"}]},
            {"ResourceType": "snapshot", "Tags": [{"Key": "backup", "Value": "yes"}]},
        ],
        sleep=lambda _s: None,
    )
    image = ec2.describe_images(ImageIds=[created.image_id])["Images"][0]
    assert {"Key": "team", "Value": "web"} in image.get("Tags", [])
    snaps = ec2.describe_snapshots(SnapshotIds=list(created.snapshots.values()))["Snapshots"]
    assert all({"Key": "backup", "Value": "yes"} in s.get("Tags", []) for s in snaps)
    with pytest.raises(UsageError):
        create_image_from_instance(
            ec2,
            instance,
            "wrong type",
            no_reboot=True,
            tag_specifications=[{"ResourceType": "volume", "Tags": [{"Key": "k", "Value": "v"}]}],
            sleep=lambda _s: None,
        )
