"""The bundle actions on the wire: boto3 and the AWS CLI against the real Falcon app and a real
ImportService on the test's task database, the controlling cloud a moto EC2 server. No worker runs here:
BundleInstance tasks stay pending until a test cancels them or moves them on through the store."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError

from appliance.service.bundles import BUNDLE_INSTANCE
from appliance.store import TaskState
from appliance.targets.upload_policy import sign_upload_policy
from tests.api.awscli_support import aws_ec2
from tests.api.test_ec2_export_actions import (  # noqa: F401 (cloud_appliance is a fixture)
    OTHER_KEY,
    Appliance,
    client,
    cloud_appliance,
    code_of,
)
from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY


def policy(
    bucket: str = "bundles", prefix: str = "winvm", hours: float = 24, acl: str = "ec2-bundle-read"
) -> str:
    """An upload policy as euca-bundle-instance writes it (base64 of the JSON document)."""
    doc = {
        "expiration": (datetime.now(UTC) + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "conditions": [{"acl": acl}, {"bucket": bucket}, ["starts-with", "$key", prefix]],
    }
    return base64.b64encode(json.dumps(doc).encode()).decode()


def storage(
    bucket: str = "bundles", prefix: str = "winvm", document: str | None = None, secret: str = TEST_SECRET_KEY
) -> dict[str, Any]:
    """``Storage`` of a BundleInstance; botocore base64-encodes ``UploadPolicy`` (a blob) itself, so the
    policy is passed as the bytes of its base64 text, which puts that text on the wire as euca2ools does."""
    text = document if document is not None else policy(bucket, prefix)
    return {
        "S3": {
            "Bucket": bucket,
            "Prefix": prefix,
            "AWSAccessKeyId": TEST_ACCESS_KEY,
            "UploadPolicy": base64.b64decode(text),
            "UploadPolicySignature": sign_upload_policy(text, secret),
        }
    }


def _bundle_tasks(appliance: Appliance) -> list[Any]:
    return appliance.service.store.list_tasks(kind=[BUNDLE_INSTANCE], limit=None)


def test_bundle_instance_with_a_forged_expired_or_foreign_upload_policy_is_refused_and_nothing_is_queued(
    cloud_appliance: tuple[Appliance, Any, str],  # noqa: F811
) -> None:
    appliance, _cloud, instance_id = cloud_appliance
    expired = policy(hours=-1)
    cases = [
        ("UploadPolicyInvalid.Signature", storage(secret="not-the-secret")),
        ("UploadPolicyInvalid.Expired", storage(document=expired)),
        ("UploadPolicyInvalid.Bucket", storage(document=policy(bucket="elsewhere"))),
        ("UploadPolicyInvalid.Key", storage(document=policy(prefix="other"))),
    ]
    # a policy changed after it was signed (another bucket granted) fails on its signature
    tampered = storage()
    tampered["S3"]["UploadPolicy"] = base64.b64decode(policy(bucket="bundles", prefix=""))
    cases.append(("UploadPolicyInvalid.Signature", tampered))
    for code, store in cases:
        with pytest.raises(ClientError) as info:
            appliance.ec2.bundle_instance(InstanceId=instance_id, Storage=store)
        assert code_of(info) == code, info.value.response
        assert TEST_SECRET_KEY not in str(info.value.response)
    # another account's key cannot sign a policy for this caller
    with pytest.raises(ClientError) as info:
        client(appliance.endpoint, OTHER_KEY).bundle_instance(InstanceId=instance_id, Storage=storage())
    assert code_of(info) == "UploadPolicyInvalid.Signature"
    # a dry run checks the policy, then answers DryRunOperation without queueing
    with pytest.raises(ClientError) as info:
        appliance.ec2.bundle_instance(InstanceId=instance_id, Storage=storage(), DryRun=True)
    assert code_of(info) == "DryRunOperation"
    assert _bundle_tasks(appliance) == []


def test_bundle_instance_answers_a_bundle_task_that_describe_filters_and_cancel_stops(
    cloud_appliance: tuple[Appliance, Any, str],  # noqa: F811
) -> None:
    appliance, cloud, instance_id = cloud_appliance
    sent = storage()
    task = appliance.ec2.bundle_instance(InstanceId=instance_id, Storage=sent)["BundleTask"]
    bundle_id = task["BundleId"]
    assert bundle_id.startswith("bun-") and len(bundle_id) == 21
    assert task["State"] == "pending" and task["Progress"] == "0%" and task["InstanceId"] == instance_id
    # the policy comes back as botocore decodes the blob; the signature is never echoed
    assert task["Storage"]["S3"] == {
        "AWSAccessKeyId": TEST_ACCESS_KEY,
        "Bucket": "bundles",
        "Prefix": "winvm",
        "UploadPolicy": sent["S3"]["UploadPolicy"],
    }
    stored = appliance.service.store.get_task(bundle_id)
    [reservation] = cloud.describe_instances(InstanceIds=[instance_id])["Reservations"]
    root = reservation["Instances"][0]["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    assert stored.params["source"]["volume_id"] == root and stored.params["acl"] == "aws-exec-read"

    described = appliance.ec2.describe_bundle_tasks(BundleIds=[bundle_id])["BundleTasks"]
    assert [t["BundleId"] for t in described] == [bundle_id]
    for name, values, found in [
        ("state", ["pending"], [bundle_id]),
        ("state", ["complete", "failed"], []),
        ("instance-id", [instance_id], [bundle_id]),
        ("s3-bucket", ["other"], []),
        ("s3-prefix", ["winvm"], [bundle_id]),
    ]:
        got = appliance.ec2.describe_bundle_tasks(Filters=[{"Name": name, "Values": values}])["BundleTasks"]
        assert [t["BundleId"] for t in got] == found, (name, values)

    # a pending task stops at once: failed, with the cancel as its error
    cancelled = appliance.ec2.cancel_bundle_task(BundleId=bundle_id)["BundleTask"]
    assert cancelled["BundleId"] == bundle_id and cancelled["State"] == "failed"
    [after] = appliance.ec2.describe_bundle_tasks(BundleIds=[bundle_id])["BundleTasks"]
    assert after["State"] == "failed"
    assert after["BundleTaskError"] == {"Code": "Cancelled", "Message": "Cancelled by user"}
    with pytest.raises(ClientError) as info:
        appliance.ec2.cancel_bundle_task(BundleId=bundle_id)
    assert code_of(info) == "IncorrectState"
    # another account's task, an unknown and a malformed id
    for caller, ident in [
        (client(appliance.endpoint, OTHER_KEY), bundle_id),
        (appliance.ec2, "bun-0123456789abcdef0"),
        (appliance.ec2, "bundle-1"),
    ]:
        with pytest.raises(ClientError) as info:
            caller.describe_bundle_tasks(BundleIds=[ident])
        assert code_of(info) == "InvalidBundleID.NotFound"


def test_bundle_task_states_follow_the_run_as_aws_names_them(
    cloud_appliance: tuple[Appliance, Any, str],  # noqa: F811
) -> None:
    appliance, _cloud, instance_id = cloud_appliance
    store = appliance.service.store
    bundle_id = appliance.ec2.bundle_instance(InstanceId=instance_id, Storage=storage())["BundleTask"][
        "BundleId"
    ]

    def shown() -> dict[str, Any]:
        return dict(appliance.ec2.describe_bundle_tasks(BundleIds=[bundle_id])["BundleTasks"][0])

    store.claim(bundle_id, "test-worker", 30)
    assert shown()["State"] == "waiting-for-shutdown"
    store.update_progress(bundle_id, phase="bundling", percent=42.5)
    assert (shown()["State"], shown()["Progress"]) == ("bundling", "42%")
    store.update_progress(bundle_id, phase="bundling", percent=100.0)
    assert shown()["State"] == "storing"
    store.set_state(
        bundle_id, TaskState.FAILED, error_code="UploadFailed", error_message="the bucket refused"
    )
    failed = shown()
    assert failed["State"] == "failed"
    assert failed["BundleTaskError"] == {"Code": "UploadFailed", "Message": "the bucket refused"}
    by_code = appliance.ec2.describe_bundle_tasks(
        Filters=[{"Name": "error-code", "Values": ["UploadFailed"]}]
    )
    assert [t["BundleId"] for t in by_code["BundleTasks"]] == [bundle_id]


def test_the_aws_cli_bundles_describes_cancels_and_creates_images(
    cloud_appliance: tuple[Appliance, Any, str],  # noqa: F811
) -> None:
    appliance, cloud, instance_id = cloud_appliance
    bundle = ["bundle-instance", "--instance-id", instance_id, "--bucket", "bundles", "--prefix", "cli"]
    bundle += ["--owner-akid", TEST_ACCESS_KEY]
    # the CLI writes the policy document (24 hours, ec2-bundle-read) and signs it with --owner-sak
    forged = aws_ec2(appliance.endpoint, *bundle, "--owner-sak", "not-the-secret")
    assert forged.returncode != 0 and "UploadPolicyInvalid.Signature" in forged.stderr
    assert _bundle_tasks(appliance) == []
    run = aws_ec2(appliance.endpoint, *bundle, "--owner-sak", TEST_SECRET_KEY)
    assert run.returncode == 0, run.stderr
    bundle_id = json.loads(run.stdout)["BundleTask"]["BundleId"]
    run = aws_ec2(appliance.endpoint, "describe-bundle-tasks", "--bundle-ids", bundle_id)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["BundleTasks"][0]["State"] == "pending"
    run = aws_ec2(appliance.endpoint, "cancel-bundle-task", "--bundle-id", bundle_id)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["BundleTask"]["BundleId"] == bundle_id
    run = aws_ec2(
        appliance.endpoint, "create-image", "--instance-id", instance_id, "--name", "web (cli)", "--no-reboot"
    )
    assert run.returncode == 0, run.stderr
    image_id = json.loads(run.stdout)["ImageId"]
    assert cloud.describe_images(ImageIds=[image_id])["Images"][0]["Name"] == "web (cli)"


def test_create_image_registers_the_snapshots_of_a_cloud_instance(
    cloud_appliance: tuple[Appliance, Any, str],  # noqa: F811
) -> None:
    appliance, cloud, instance_id = cloud_appliance
    image_id = appliance.ec2.create_image(InstanceId=instance_id, Name="web server (2026)", Description="d")[
        "ImageId"
    ]
    image = cloud.describe_images(ImageIds=[image_id])["Images"][0]
    assert image["Name"] == "web server (2026)" and image["Description"] == "d"
    # the root volume's snapshot, made for this image (moto's DescribeImages does not echo the mappings)
    [snapshot] = cloud.describe_snapshots(
        Filters=[{"Name": "tag:imaging:instance", "Values": [instance_id]}]
    )["Snapshots"]
    [reservation] = cloud.describe_instances(InstanceIds=[instance_id])["Reservations"]
    assert snapshot["VolumeId"] == reservation["Instances"][0]["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    # a further device is added to the image as given
    with_ephemeral = appliance.ec2.create_image(
        InstanceId=instance_id,
        Name="web with scratch",
        NoReboot=True,
        BlockDeviceMappings=[{"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"}],
    )["ImageId"]
    assert cloud.describe_images(ImageIds=[with_ephemeral])["Images"][0]["Name"] == "web with scratch"
    root_device = reservation["Instances"][0]["RootDeviceName"]
    for kwargs, code in [
        ({"InstanceId": instance_id, "Name": "web!server"}, "InvalidParameterValue"),
        (
            {
                "InstanceId": instance_id,
                "Name": "bigger",
                "BlockDeviceMappings": [{"DeviceName": root_device, "Ebs": {"VolumeSize": 500}}],
            },
            "InvalidParameterValue",
        ),
        (
            {
                "InstanceId": instance_id,
                "Name": "rootless",
                "BlockDeviceMappings": [{"DeviceName": root_device, "NoDevice": ""}],
            },
            "InvalidParameterValue",
        ),
        ({"InstanceId": "i-0123456789abcdef0", "Name": "nothing"}, "InvalidInstanceID.NotFound"),
        ({"InstanceId": instance_id, "Name": "dry", "DryRun": True}, "DryRunOperation"),
        # members the appliance cannot honour are refused, not ignored
        (
            {"InstanceId": instance_id, "Name": "outpost", "SnapshotLocation": "local"},
            "InvalidParameterValue",
        ),
        ({"InstanceId": instance_id, "Name": "uefi", "BootModeOverride": "uefi"}, "InvalidParameterValue"),
        (
            {
                "InstanceId": instance_id,
                "Name": "tags",
                "TagSpecifications": [{"ResourceType": "volume", "Tags": [{"Key": "k", "Value": "v"}]}],
            },
            "InvalidParameterValue",
        ),
    ]:
        with pytest.raises(ClientError) as info:
            appliance.ec2.create_image(**kwargs)
        assert code_of(info) == code
    with pytest.raises(ClientError) as info:
        client(appliance.endpoint, OTHER_KEY).create_image(InstanceId=instance_id, Name="theirs")
    assert code_of(info) == "InvalidInstanceID.NotFound"
