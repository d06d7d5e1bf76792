"""BundleInstance as clients see it: `imaging serve` (gunicorn on loopback) and `imaging worker` as real
processes, the controlling cloud and its object store the moto server, boto3 and the AWS CLI as clients
(every response parsed by botocore). The instance's root volume copy is a real loop device (moto attaches
no disk; the FakeHypervisor of test_ec2.py links the copy the worker attaches to it). The bundle the
worker stores unbundles byte-identical with the reference's own openssl steps."""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance.targets.ec2 import TASK_TAG
from appliance.targets.upload_policy import sign_upload_policy
from tests.api.awscli_support import aws_ec2
from tests.api.e2e_support import running_appliance, wait_for
from tests.api.test_ec2_bundle_actions import policy
from tests.appliance.targets.test_ec2 import cloud  # noqa: F401 (a fixture)
from tests.bundlefactory import make_keypair, unbundle_independently
from tests.httpfixtures import TestHTTPServer
from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer

pytestmark = pytest.mark.slow

MiB = 1 << 20


def test_bundle_instance_through_the_api_and_the_worker_unbundles_byte_identical(
    tmp_path: Path,
    moto: MotoServer,
    parts_server: TestHTTPServer,
    cloud: dict[str, Any],  # noqa: F811
) -> None:
    ec2, s3 = cloud["ec2"], moto.client("s3")
    keys = make_keypair(tmp_path, "cloud")
    bucket = f"bundles-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    run = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro")
    instance_id = run["Instances"][0]["InstanceId"]
    content = os.urandom(2 * MiB) + bytes(4 * MiB) + os.urandom(2 * MiB)
    with open(cloud["loops"][0], "r+b") as dev:
        dev.write(content)
    document = policy(bucket=bucket, prefix="winvm")
    try:
        with (
            running_appliance(
                tmp_path,
                moto,
                parts_server,
                targets={"volume": cloud["settings"]},
                extra={"bundles": {"cloud_private_key_file": str(keys.key)}},
                account=run["OwnerId"],
            ) as appliance,
            cloud["hypervisor"](),
        ):
            task = appliance.ec2.bundle_instance(
                InstanceId=instance_id,
                Storage={
                    "S3": {
                        "Bucket": bucket,
                        "Prefix": "winvm",
                        "AWSAccessKeyId": TEST_ACCESS_KEY,
                        # botocore base64-encodes the blob: the base64 text goes on the wire
                        "UploadPolicy": base64.b64decode(document),
                        "UploadPolicySignature": sign_upload_policy(document, TEST_SECRET_KEY),
                    }
                },
            )["BundleTask"]
            bundle_id = task["BundleId"]

            def shown() -> dict[str, Any]:
                return dict(appliance.ec2.describe_bundle_tasks(BundleIds=[bundle_id])["BundleTasks"][0])

            wait_for(lambda: shown()["State"] in ("complete", "failed"), what="the bundle task")
            done = shown()
            assert done["State"] == "complete" and done["Progress"] == "100%", done
            cli = aws_ec2(
                appliance.endpoint, "describe-bundle-tasks", "--filters", "Name=state,Values=complete"
            )
            assert cli.returncode == 0, cli.stderr
            assert [t["BundleId"] for t in json.loads(cli.stdout)["BundleTasks"]] == [bundle_id]
        names = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
        assert names == ["winvm.manifest.xml", "winvm.part.00"]
        local = tmp_path / "fetched"
        local.mkdir()
        for name in names:
            (local / name).write_bytes(s3.get_object(Bucket=bucket, Key=name)["Body"].read())
        assert unbundle_independently(local / "winvm.manifest.xml", keys.key, keys.cert) == content
        tagged = [{"Name": f"tag:{TASK_TAG}", "Values": [bundle_id]}]
        assert ec2.describe_volumes(Filters=tagged)["Volumes"] == []
        assert ec2.describe_snapshots(Filters=tagged)["Snapshots"] == []
    finally:
        ec2.terminate_instances(InstanceIds=[instance_id])
