"""BundleInstance run by the real engine through the bundle-instance workflow: an instance of the
controlling cloud (moto's EC2 server) whose root volume's copy is a real loop device (moto attaches no
disk; its FakeHypervisor links the attached copy to the loop device, as in test_ec2.py), bundled into the
moto S3 server under a verified upload policy. The bundle unbundles byte-identical with the reference's
own openssl steps (``unbundle_independently``), and what the run created in the cloud is gone after."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance.service.bundles import BundleService
from appliance.store import TaskState
from appliance.targets.ec2 import TASK_TAG
from appliance.targets.upload_policy import sign_upload_policy
from appliance.workflow.engine import Engine
from tests import stores
from tests.api.test_ec2_bundle_actions import policy
from tests.appliance.targets.test_ec2 import cloud  # noqa: F401 (a fixture)
from tests.bundlefactory import KeyPair, make_keypair, unbundle_independently
from tests.processes import wait_until
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20


@pytest.fixture(scope="module")
def cloud_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keypair(tmp_path_factory.mktemp("keys"), "cloud")


def _service(
    tmp_path: Path, s3_endpoint: str, settings: dict[str, Any], keys: KeyPair, owner: str
) -> BundleService:
    cfg = stores.config(
        {
            "state_dir": str(tmp_path / "state"),
            "api": {
                "credentials": [
                    {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY, "account": owner}
                ]
            },
            "sources": {
                "allowed_endpoints": [s3_endpoint],
                "s3": {
                    "endpoint_url": s3_endpoint,
                    "region": REGION,
                    "access_key": "testing",
                    "secret_key": "testing",
                },
            },
            "targets": {"volume": settings},
            "bundles": {"cloud_private_key_file": str(keys.key)},
        },
        base_dir=tmp_path,
    )
    return BundleService(cfg)


def test_an_instance_root_volume_is_bundled_under_its_upload_policy_and_unbundles_byte_identical(
    tmp_path: Path,
    moto: MotoServer,
    cloud: dict[str, Any],  # noqa: F811
    cloud_keys: KeyPair,
) -> None:
    ec2, s3 = cloud["ec2"], moto.client("s3")
    bucket = f"bundles-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    run = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro")
    instance = run["Instances"][0]
    content = os.urandom(MiB) + bytes(5 * MiB) + os.urandom(2 * MiB)
    with open(cloud["loops"][0], "r+b") as dev:
        dev.write(content)
    bundles = _service(tmp_path, moto.endpoint, cloud["settings"], cloud_keys, run["OwnerId"])
    document = policy(bucket=bucket, prefix="winvm")
    try:
        task = bundles.bundle_instance(
            instance["InstanceId"],
            bucket=bucket,
            prefix="winvm",
            access_key=TEST_ACCESS_KEY,
            upload_policy=document,
            upload_policy_signature=sign_upload_policy(document, TEST_SECRET_KEY),
            account=run["OwnerId"],
        )
        assert task is not None and task.id.startswith("bun-")
        with cloud["hypervisor"]():
            engine = Engine(bundles.config, poll_interval=0.1)
            try:
                done = engine.run(task.id)
            finally:
                engine.store.close()
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
        assert keys == ["winvm.manifest.xml", "winvm.part.00"]
        local = tmp_path / "fetched"
        local.mkdir()
        for key in keys:
            (local / key).write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert (
            unbundle_independently(local / "winvm.manifest.xml", cloud_keys.key, cloud_keys.cert) == content
        )
        # the snapshot and the volume copy are gone; the instance's root volume is untouched
        tagged = [{"Name": f"tag:{TASK_TAG}", "Values": [task.id]}]
        assert ec2.describe_volumes(Filters=tagged)["Volumes"] == []
        assert ec2.describe_snapshots(Filters=tagged)["Snapshots"] == []
    finally:
        bundles.store.close()
        ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])


def test_cancel_bundle_task_while_the_manifest_is_being_stored_leaves_no_part_in_the_bucket(
    tmp_path: Path,
    moto: MotoServer,
    cloud: dict[str, Any],  # noqa: F811
    cloud_keys: KeyPair,
) -> None:
    ec2, s3 = cloud["ec2"], moto.client("s3")
    bucket = f"bundles-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    run = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro")
    instance = run["Instances"][0]
    with open(cloud["loops"][0], "r+b") as dev:
        dev.write(os.urandom(4 * MiB))
    with StallingProxy(moto.endpoint) as proxy:
        # the object store reached through the proxy, which holds the manifest's PUT: the part is stored
        bundles = _service(tmp_path, proxy.endpoint, cloud["settings"], cloud_keys, run["OwnerId"])
        proxy.arm_object_request("PUT", "/winvm.manifest.xml")
        document = policy(bucket=bucket, prefix="winvm")
        try:
            task = bundles.bundle_instance(
                instance["InstanceId"],
                bucket=bucket,
                prefix="winvm",
                access_key=TEST_ACCESS_KEY,
                upload_policy=document,
                upload_policy_signature=sign_upload_policy(document, TEST_SECRET_KEY),
                account=run["OwnerId"],
            )
            assert task is not None
            outcome: dict[str, Any] = {}
            with cloud["hypervisor"]():
                engine = Engine(bundles.config, poll_interval=0.1)
                runner = threading.Thread(target=lambda: outcome.update(task=engine.run(task.id)))
                runner.start()
                try:
                    wait_until(
                        lambda: proxy.stalled_on("/winvm.manifest.xml") == 1, what="the manifest's PUT"
                    )
                    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [
                        "winvm.part.00"
                    ]
                    assert bundles.cancel(task.id).state is TaskState.CANCELLING
                finally:
                    proxy.release()
                    runner.join()
                    engine.store.close()
            assert outcome["task"].state is TaskState.CANCELLED, outcome["task"].error_message
            assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
            tagged = [{"Name": f"tag:{TASK_TAG}", "Values": [task.id]}]
            assert ec2.describe_volumes(Filters=tagged)["Volumes"] == []
            assert ec2.describe_snapshots(Filters=tagged)["Snapshots"] == []
        finally:
            bundles.store.close()
            ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
