"""``bundle.write`` then ``image.register`` through the real engine: a disk file of the appliance is
bundled into the moto S3 server, unbundles byte-identical with the reference's openssl steps
(tests/bundlefactory.py), and is registered with the moto EC2 server from its manifest location; a
failing later step removes the bundle's objects and deregisters the image."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.store import TaskState
from appliance.workflow import Engine
from tests.bundlefactory import KeyPair, make_keypair, unbundle_independently
from tests.servers import MotoServer

from ..workflow.support import config_dict, make_registry, write_workflow


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keypair(tmp_path_factory.mktemp("keys"), "cloud")


@pytest.fixture
def engine(tmp_path: Path, moto: MotoServer, cloud: KeyPair) -> Engine:
    raw = config_dict(tmp_path)
    creds = {"endpoint_url": moto.endpoint, "region": "us-east-1", "access_key": "t", "secret_key": "t"}
    raw["sources"] = {"allowed_endpoints": [moto.endpoint], "s3": creds}
    raw["bundles"] = {"cloud_private_key_file": str(cloud.key)}
    raw["targets"] = {"volume": {"type": "ec2", "instance_id": "i-00000001", **creds}}
    e = Engine(config_mod.from_dict(raw, base_dir=tmp_path), registry=make_registry(), poll_interval=0.05)
    yield e
    e.store.close()


def _workflow(disk: Path, bucket: str, *, fail_after: bool = False) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {
            "name": "bundle",
            "action": "bundle.write",
            "with": {
                "path": str(disk),
                "prefix": "disk.img",
                "bucket": bucket,
                "key_prefix": "b/",
                "user": "1",
            },
            "register": "bundle",
        },
        {
            "name": "register",
            "action": "image.register",
            "with": {"name": "bundled disk", "image_location": "{{ bundle.image_location }}"},
            "register": "registered",
        },
    ]
    if fail_after:
        steps.append({"name": "later", "action": "util.fail", "with": {}})
    return {"steps": steps}


def test_a_disk_is_bundled_into_s3_and_registered_from_its_manifest(
    engine: Engine, tmp_path: Path, moto: MotoServer, cloud: KeyPair
) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(3 << 20) + bytes(3 << 20))
    bucket = f"out-{uuid.uuid4().hex[:12]}"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=bucket)
    write_workflow(tmp_path, "bw", _workflow(disk, bucket))
    task = engine.run(engine.submit("bw"))
    assert task.state is TaskState.COMPLETED, task.error_message
    assert task.result["bundle"]["image_location"] == f"{bucket}/b/disk.img.manifest.xml"
    assert task.result["bundle"]["signed"] is True

    local = tmp_path / "fetched"
    local.mkdir()
    for key in task.result["bundle"]["keys"]:
        (local / key.rsplit("/", 1)[1]).write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    # signed with the cloud key: the cloud certificate verifies it
    assert unbundle_independently(local / "disk.img.manifest.xml", cloud.key, cloud.cert) == disk.read_bytes()
    image_id = task.result["registered"]["image_id"]
    assert moto.client("ec2").describe_images(ImageIds=[image_id])["Images"][0]["Name"] == "bundled disk"


def test_a_failing_later_step_removes_the_bundle_and_deregisters_it(
    engine: Engine, tmp_path: Path, moto: MotoServer
) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(1 << 20))
    bucket = f"out-{uuid.uuid4().hex[:12]}"
    s3, ec2 = moto.client("s3"), moto.client("ec2")
    s3.create_bucket(Bucket=bucket)
    before = {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]}
    write_workflow(tmp_path, "bw", _workflow(disk, bucket, fail_after=True))
    task = engine.run(engine.submit("bw"))
    assert task.state is TaskState.FAILED
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]} == before
