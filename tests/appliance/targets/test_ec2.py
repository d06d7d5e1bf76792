"""EC2 volume target against a moto server (the cloud's control plane) and real loop devices.

What is simulated: only the controlling cloud. moto answers CreateVolume/AttachVolume/DetachVolume/
DescribeVolumes/DeleteVolume over HTTP but attaches no disk, so :class:`FakeHypervisor` plays the part
of the hypervisor plus udev: when moto reports a volume attached to our instance it links
``<device_dir>/virtio-vol<hex>`` to one of the test's own loop devices, and removes the link on
detach. Everything on the appliance side (the API calls, waits, lookup by serial, block-device
checks, writes, fsync) is the real code.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from appliance import config
from appliance.errors import ConfigError
from appliance.targets import TargetError, get_volume_target, write_raw
from appliance.targets.ec2 import TASK_TAG, Ec2VolumeTarget
from appliance.targets.ec2attach import device_entry_matches
from tests.appliance.targets.test_device import loop_device, sparse_source
from tests.processes import wait_until
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY

MiB = 1024 * 1024


class FakeHypervisor:
    """Links attached volumes of ``instance_id`` to free loop devices in ``device_dir``, like udev would."""

    def __init__(self, ec2: Any, instance_id: str, device_dir: Path, loops: list[Path]) -> None:
        self.ec2, self.instance_id, self.device_dir = ec2, instance_id, device_dir
        self.free = list(loops)
        self.links: dict[str, tuple[Path, Path]] = {}  # volume id -> (link, loop device)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.boot_volumes = self._attached()  # the root disk is not ours to link

    def _attached(self) -> set[str]:
        volumes = self.ec2.describe_volumes(
            Filters=[{"Name": "attachment.instance-id", "Values": [self.instance_id]}]
        )["Volumes"]
        return {
            v["VolumeId"]
            for v in volumes
            if any(a["State"] == "attached" and a["InstanceId"] == self.instance_id for a in v["Attachments"])
        }

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            attached = self._attached() - self.boot_volumes
            for vid in attached - set(self.links):
                loop = self.free.pop(0)
                # virtio exposes the serial cut at 20 characters: "vol" + 17 hex digits fits exactly
                link = self.device_dir / f"virtio-{vid.replace('-', '')[:20]}"
                link.symlink_to(loop)
                self.links[vid] = (link, loop)
            for vid in set(self.links) - attached:
                link, loop = self.links.pop(vid)
                link.unlink()
                self.free.append(loop)

    def __enter__(self) -> FakeHypervisor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


@pytest.fixture
def cloud(moto, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fresh instance in moto, a device_dir, two loop devices and the hypervisor stand-in."""
    ec2 = moto.client("ec2")
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    inst = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro")["Instances"][
        0
    ]
    device_dir = tmp_path / "by-id"
    device_dir.mkdir()
    settings = {
        "type": "ec2",
        "endpoint_url": moto.endpoint,
        "region": REGION,
        "access_key": TEST_ACCESS_KEY,
        "secret_key": TEST_SECRET_KEY,
        "instance_id": inst["InstanceId"],
        "device_dir": str(device_dir),
        "poll_interval": 0.05,
        "wait_timeout": 10,
        "device_timeout": 10,
    }
    with ExitStack() as stack:
        # a new EBS volume reads as zeros: so do these
        loops = [stack.enter_context(loop_device(tmp_path / f"disk{i}.img", 8 * MiB)) for i in range(2)]
        yield {
            "ec2": ec2,
            "instance": inst,
            "settings": settings,
            "device_dir": device_dir,
            "loops": loops,
            "backing": [tmp_path / f"disk{i}.img" for i in range(2)],
            "hypervisor": lambda: FakeHypervisor(ec2, inst["InstanceId"], device_dir, loops),
        }
        ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])


def task_id() -> str:
    return "import-vol-" + uuid.uuid4().hex[:8]


def volume_state(ec2: Any, volume_id: str) -> dict[str, Any] | None:
    try:
        return ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    except ec2.exceptions.ClientError as exc:
        assert exc.response["Error"]["Code"] == "InvalidVolume.NotFound"
        return None


def test_device_entry_matching_by_serial() -> None:
    vid = "vol-0123456789abcdef0"
    assert device_entry_matches("virtio-vol0123456789abcdef0", vid)
    assert device_entry_matches("nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0", vid)
    assert device_entry_matches("nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0_1", vid)
    assert not device_entry_matches("virtio-vol0123456789abcdef0-part1", vid)
    assert not device_entry_matches("virtio-vol0123456789abcdef1", vid)
    # a dashed (Eucalyptus-style) serial cut at 20 characters
    assert device_entry_matches("virtio-vol-0123456789abcdef", vid)
    # old 8-digit ids must not match inside a longer id
    assert device_entry_matches("virtio-vol1234abcd", "vol-1234abcd")
    assert not device_entry_matches("virtio-vol1234abcd5678", "vol-1234abcd")


def test_create_attach_write_finalize(tmp_path: Path, cloud: dict[str, Any]) -> None:
    ec2, settings = cloud["ec2"], cloud["settings"]
    cfg = config.from_dict({"state_dir": str(tmp_path / "state"), "targets": {"volume": settings}})
    target = get_volume_target(cfg)
    tid = task_id()
    src = tmp_path / "image.raw"
    expected = sparse_source(src, 6 * MiB, {0: os.urandom(MiB), 4 * MiB: b"end" * 100})
    with cloud["hypervisor"]():
        volume = target.create(tid, 5 * MiB + 1)
        assert volume.path == cloud["loops"][0] and volume.size == 8 * MiB
        described = volume_state(ec2, volume.id)
        assert described["Size"] == 1 and described["State"] == "in-use"
        assert described["Attachments"][0]["Device"] == "/dev/sdf"
        assert {"Key": TASK_TAG, "Value": tid} in described["Tags"]
        assert described["AvailabilityZone"] == cloud["instance"]["Placement"]["AvailabilityZone"]

        write_raw(volume, src)  # fresh volume reads as zeros: holes are skipped
        result = target.finalize(volume)
    assert result == {
        "type": "ec2",
        "volume_id": volume.id,
        "size_gib": 1,
        "availability_zone": described["AvailabilityZone"],
        "state": "available",
    }
    after = volume_state(ec2, volume.id)
    assert after["State"] == "available" and after["Attachments"] == []
    data = cloud["backing"][0].read_bytes()
    assert hashlib.sha256(data[: 6 * MiB]).digest() == hashlib.sha256(expected).digest()
    target.delete(volume.info)
    assert volume_state(ec2, volume.id) is None


def test_second_volume_gets_next_device_name_and_delete_detaches(cloud: dict[str, Any]) -> None:
    ec2 = cloud["ec2"]
    target = Ec2VolumeTarget.from_settings(cloud["settings"])
    with cloud["hypervisor"]():
        first = target.create(task_id(), MiB)
        second = target.create(task_id(), MiB)
        assert (first.info["device_name"], second.info["device_name"]) == ("/dev/sdf", "/dev/sdg")
        assert {first.path, second.path} == set(cloud["loops"])

        # undo while attached: detached and deleted; twice is fine
        target.delete(second.info)
        assert volume_state(ec2, second.id) is None
        target.delete(second.info)

        # a crash inside create leaves no stored id: the task tag finds the volume
        target.delete({"type": "ec2", "task_id": first.info["task_id"]})
        assert volume_state(ec2, first.id) is None


def test_reopen_after_restart_finds_or_reattaches(cloud: dict[str, Any]) -> None:
    ec2 = cloud["ec2"]
    with cloud["hypervisor"]():
        volume = Ec2VolumeTarget.from_settings(cloud["settings"]).create(task_id(), MiB)
        restarted = Ec2VolumeTarget.from_settings(cloud["settings"])
        again = restarted.reopen(volume.info)
        assert again.path == volume.path and again.id == volume.id and again.info["zeroed"] is False

        # detached meanwhile (e.g. by an operator): reopen attaches it again
        ec2.detach_volume(VolumeId=volume.id, InstanceId=cloud["settings"]["instance_id"])
        wait_until(
            lambda: not any(p.is_symlink() for p in cloud["device_dir"].iterdir()),
            what="the detached volume's device link gone",
            interval=0.05,
        )
        reattached = restarted.reopen(volume.info)
        assert volume_state(ec2, volume.id)["State"] == "in-use"
        assert reattached.path in cloud["loops"]
        restarted.delete(volume.info)


def test_disk_never_appearing_fails_attach_and_removes_volume(cloud: dict[str, Any]) -> None:
    ec2 = cloud["ec2"]
    target = Ec2VolumeTarget.from_settings(dict(cloud["settings"], device_timeout=0.5))
    tid = task_id()
    # no hypervisor stand-in: the attachment succeeds in the API but no disk shows up
    with pytest.raises(TargetError) as exc:
        target.create(tid, MiB)
    assert exc.value.code == "FailureToAttachVolume" and "device_timeout" in exc.value.message
    left = ec2.describe_volumes(Filters=[{"Name": f"tag:{TASK_TAG}", "Values": [tid]}])["Volumes"]
    assert left == []


def test_other_availability_zone_is_refused(cloud: dict[str, Any]) -> None:
    ec2 = cloud["ec2"]
    target = Ec2VolumeTarget.from_settings(cloud["settings"])
    tid = task_id()
    zone = cloud["instance"]["Placement"]["AvailabilityZone"]
    other = zone[:-1] + ("b" if zone[-1] != "b" else "c")
    with pytest.raises(TargetError) as exc:
        target.create(tid, MiB, availability_zone=other)
    assert exc.value.code == "InvalidParameterValue" and zone in exc.value.message
    assert ec2.describe_volumes(Filters=[{"Name": f"tag:{TASK_TAG}", "Values": [tid]}])["Volumes"] == []
    assert target.describe()["availability_zone"] == zone
    assert "secret_key" not in target.describe()


def test_unknown_volume_reopen_is_not_found(cloud: dict[str, Any]) -> None:
    target = Ec2VolumeTarget.from_settings(cloud["settings"])
    with pytest.raises(TargetError) as exc:
        target.reopen({"type": "ec2", "volume_id": "vol-00000000000000000"})
    assert exc.value.code == "InvalidVolume.NotFound"
    target.delete({"type": "ec2", "volume_id": "vol-00000000000000000"})  # gone already: fine


def test_settings_errors_name_the_key(tmp_path: Path) -> None:
    cfg = config.from_dict({"state_dir": str(tmp_path), "targets": {"volume": {"type": "ec2"}}})
    with pytest.raises(ConfigError) as exc:
        get_volume_target(cfg)
    assert "targets.volume" in exc.value.message and "instance_id" in exc.value.message
    cfg = config.from_dict(
        {
            "state_dir": str(tmp_path),
            "targets": {
                "volume": {"type": "ec2", "instance_id": "i-0123456789abcdef0", "access_key": "AKIA"}
            },
        }
    )
    with pytest.raises(ConfigError) as exc:
        get_volume_target(cfg)
    assert "secret_key" in exc.value.message


# -- failover: the volume follows its task to the appliance that took it over --------------------------


class MovingDisks:
    """The hypervisor stand-in for several instances (``device_dirs``: instance id → its ``device_dir``):
    a volume's disk, one loop device picked at its first attachment, follows the volume from instance to
    instance, as an EBS volume's does."""

    def __init__(self, ec2: Any, device_dirs: dict[str, Path], loops: list[Path]) -> None:
        self.ec2, self.device_dirs = ec2, device_dirs
        self.free = list(loops)
        self.disks: dict[str, Path] = {}  # volume id -> its loop device
        self.links: dict[tuple[str, str], Path] = {}  # (instance, volume) -> link
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.boot_volumes = {vid for _, vid in self._attached()}  # the root disks are not ours to link

    def _attached(self) -> set[tuple[str, str]]:
        return {
            (a["InstanceId"], v["VolumeId"])
            for v in self.ec2.describe_volumes()["Volumes"]
            for a in v["Attachments"]
            if a["State"] == "attached" and a["InstanceId"] in self.device_dirs
        }

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            attached = {(i, v) for i, v in self._attached() if v not in self.boot_volumes}
            for instance, vid in attached - set(self.links):
                if vid not in self.disks:
                    self.disks[vid] = self.free.pop(0)
                loop = self.disks[vid]
                link = self.device_dirs[instance] / f"virtio-{vid.replace('-', '')[:20]}"
                link.symlink_to(loop)
                self.links[(instance, vid)] = link
            for key in set(self.links) - attached:
                self.links.pop(key).unlink()

    def __enter__(self) -> MovingDisks:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def test_a_volume_attached_to_a_dead_appliance_is_force_detached_and_attached_to_the_one_taking_over(
    cloud: dict[str, Any], tmp_path: Path
) -> None:
    ec2, dead_settings = cloud["ec2"], cloud["settings"]
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    placement = cloud["instance"]["Placement"]
    other = ec2.run_instances(
        ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro", Placement=placement
    )["Instances"][0]["InstanceId"]
    dead, alive = dead_settings["instance_id"], other
    alive_dir = tmp_path / "by-id-alive"
    alive_dir.mkdir()
    alive_settings = dict(dead_settings, instance_id=alive, device_dir=str(alive_dir))
    data = os.urandom(MiB)
    try:
        with MovingDisks(ec2, {dead: cloud["device_dir"], alive: alive_dir}, cloud["loops"]):
            # the appliance that dies: it created the volume, attached it and wrote part of the disk
            volume = Ec2VolumeTarget.from_settings(dead_settings).create(task_id(), 4 * MiB)
            assert volume.info["instance_id"] == dead
            fd = os.open(volume.path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            # ... and is gone: its attachment stays. The appliance that took the task over reopens the
            # volume from the step's recorded result
            taking_over = Ec2VolumeTarget.from_settings(alive_settings)
            moved = taking_over.reopen(volume.info)
            described = volume_state(ec2, volume.id)
            assert [(a["InstanceId"], a["State"]) for a in described["Attachments"]] == [(alive, "attached")]
            assert moved.info["instance_id"] == alive and moved.info["zeroed"] is False
            with open(moved.path, "rb") as f:
                assert f.read(MiB) == data  # the same disk, as the dead appliance left it
            # the dead appliance's stale view of the volume cannot take it back
            with pytest.raises(TargetError) as exc:
                Ec2VolumeTarget.from_settings(dead_settings).reopen(volume.info)
            assert exc.value.code == "FailureToAttachVolume"
            assert [a["InstanceId"] for a in volume_state(ec2, volume.id)["Attachments"]] == [alive]
            result = taking_over.finalize(moved)
        assert result["state"] == "available" and volume_state(ec2, volume.id)["Attachments"] == []
        taking_over.delete(moved.info)
        assert volume_state(ec2, volume.id) is None
    finally:
        ec2.terminate_instances(InstanceIds=[other])


def test_undo_after_a_takeover_force_detaches_the_volume_from_the_dead_appliance_and_deletes_it(
    cloud: dict[str, Any], tmp_path: Path
) -> None:
    ec2, dead_settings = cloud["ec2"], cloud["settings"]
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    other = ec2.run_instances(
        ImageId=image_id,
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.micro",
        Placement=cloud["instance"]["Placement"],
    )["Instances"][0]["InstanceId"]
    alive_dir = tmp_path / "by-id-alive"
    alive_dir.mkdir()
    alive_settings = dict(dead_settings, instance_id=other, device_dir=str(alive_dir), wait_timeout=5)
    try:
        with MovingDisks(
            ec2, {dead_settings["instance_id"]: cloud["device_dir"], other: alive_dir}, cloud["loops"]
        ):
            volume = Ec2VolumeTarget.from_settings(dead_settings).create(task_id(), MiB)
            # the task taken over fails (or is cancelled) before it reopened the volume: its undo deletes it
            Ec2VolumeTarget.from_settings(alive_settings).delete(volume.info)
        assert volume_state(ec2, volume.id) is None
    finally:
        ec2.terminate_instances(InstanceIds=[other])
