"""Static guest validation as clients see it: `imaging serve` (gunicorn) and `imaging worker` as real
processes, S3 on moto, boto3 (and raw SigV4 requests for the extra members boto3 refuses to send).

Every disk is a real guest built by :mod:`tests.guestfactory`: a bootable Debian-like Linux disk, one
with a broken fstab, a partition image (a bare ext4 Linux root) and a data disk with no OS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import guestfactory
from tests.api.e2e_support import Appliance, admin_task, conversion_task, wait_for
from tests.api.ec2_support import post_signed
from tests.euca_upload import presign_manifest_url, upload
from tests.servers import MotoServer

pytestmark = pytest.mark.slow

MISSING_UUID = "deadbeef-0000-4000-8000-00000000dead"
KERNEL_TOKEN = "[imaging:kernel=aki-1234abcd,virtualization=paravirtual]"


def put_disk(moto: MotoServer, bucket: str, disk: Path) -> dict[str, str]:
    """Upload ``disk`` to the user bucket; the UserBucket member that names it."""
    moto.client("s3").upload_file(str(disk), bucket, f"disks/{disk.name}")
    return {"S3Bucket": bucket, "S3Key": f"disks/{disk.name}"}


def image_task(appliance: Appliance, task_id: str) -> dict[str, Any]:
    return appliance.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]


def finished_image_task(appliance: Appliance, task_id: str) -> dict[str, Any]:
    wait_for(lambda: image_task(appliance, task_id)["Status"] in ("completed", "deleted"), what="the import")
    return image_task(appliance, task_id)


def step_actions(detail: dict[str, Any]) -> dict[str, str]:
    """``{action: state}`` of the steps the task ran (admin view)."""
    return {s["action"]: s["state"] for s in detail["steps"]}


def ran(detail: dict[str, Any], action: str) -> bool:
    """The task completed ``action`` (``image.convert``, ``guest.validate``), or a streamed disk's
    ``image.stream``, which decodes, validates and stores the disk in one step."""
    actions = step_actions(detail)
    return actions.get(action) == "completed" or actions.get("image.stream") == "completed"


def finding(detail: dict[str, Any], code: str) -> dict[str, Any]:
    found = [f for f in detail["findings"] if f["code"] == code]
    assert found, f"no {code} in {[f['code'] for f in detail['findings']]}"
    return found[0]


def assert_failed_before_conversion(appliance: Appliance, task_id: str, code: str) -> dict[str, Any]:
    """The image task ended failed with ``code``, said so in its StatusMessage with the start of the
    remediation, and never converted or stored anything."""
    final = finished_image_task(appliance, task_id)
    assert final["Status"] == "deleted", final
    status = final["StatusMessage"]
    assert status.startswith(f"ClientError: {code}"), status
    detail = admin_task(appliance, task_id)
    assert (detail["task"]["state"], detail["task"]["error_code"]) == ("failed", code)
    remediation = finding(detail, code)["message"]
    assert remediation[:20] in status  # the user reads what to do, not only a code
    actions = step_actions(detail)
    # A RAW/stream-VMDK/fixed-VHD disk streams into the image target (image.stream: one pass, no
    # scratch) and its guest is validated on the written partial image before it is published;
    # any other goes through scratch and is validated before qemu-img converts it.
    if actions.get("image.stream") == "failed":
        assert actions["source.fetch"] == "skipped" and "guest.validate" not in {
            a for a, state in actions.items() if state != "skipped"
        }
    else:
        assert actions["guest.validate"] == "failed"
    # before the long conversion: neither ran (a streamed disk's task lists them as skipped)
    assert actions.get("image.convert", "skipped") == "skipped"
    assert actions.get("image.store", "skipped") == "skipped"
    assert "ImageId" not in final or not final["ImageId"]
    return detail


def failed_report(detail: dict[str, Any]) -> dict[str, Any]:
    """The guest report of a task that validation failed: the admin view's ``guest`` (from the
    ``guest.validated`` event, since the task has no result)."""
    assert detail["task"]["result"] is None
    assert detail["guest"] is not None
    return detail["guest"]


def test_broken_fstab_fails_the_image_import_before_conversion(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    fstab = guestfactory.fstab_by_uuid(extra=f"UUID={MISSING_UUID} /srv ext4 defaults 0 2\n")
    disk = guestfactory.linux_disk(tmp_path, "broken-fstab.raw", fstab=fstab)
    task_id = appliance.ec2.import_image(
        Description="broken fstab",
        DiskContainers=[{"Format": "RAW", "UserBucket": put_disk(moto, bucket, disk)}],
    )["ImportTaskId"]
    detail = assert_failed_before_conversion(appliance, task_id, "Guest.FstabDeviceMissing")
    missing = finding(detail, "Guest.FstabDeviceMissing")
    assert missing["severity"] == "error" and MISSING_UUID in missing["message"]
    # the guest itself was understood: only the fstab entry is wrong
    validated = failed_report(detail)
    assert validated["os"]["distribution"] == "debian" and validated["layout"] == "disk"


def test_windows_platform_for_a_linux_disk_is_a_platform_mismatch(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = guestfactory.linux_disk(tmp_path)
    task_id = appliance.ec2.import_image(
        Platform="Windows", DiskContainers=[{"Format": "RAW", "UserBucket": put_disk(moto, bucket, disk)}]
    )["ImportTaskId"]
    detail = assert_failed_before_conversion(appliance, task_id, "Guest.PlatformMismatch")
    assert failed_report(detail)["os"]["family"] == "linux"


def test_partition_image_with_a_kernel_token_imports_paravirtual(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    image = guestfactory.partition_image(tmp_path)
    task_id = appliance.ec2.import_image(
        Description=f"eucalyptus root {KERNEL_TOKEN}",
        DiskContainers=[{"Format": "RAW", "UserBucket": put_disk(moto, bucket, image)}],
    )["ImportTaskId"]
    final = finished_image_task(appliance, task_id)
    assert final["Status"] == "completed", final
    detail = admin_task(appliance, task_id)
    assert detail["boot"] == {
        "kernel_id": "aki-1234abcd",
        "ramdisk_id": None,
        "virtualization_type": "paravirtual",
        "layout": "partition",
    }
    assert detail["task"]["result"]["boot"] == detail["boot"]  # in the result, for the controller
    assert detail["guest"]["root"]["filesystem"] == "ext4"
    assert not [f for f in detail["findings"] if f["severity"] == "error"]
    assert ran(detail, "image.convert")


def test_partition_image_as_hvm_needs_a_kernel(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    image = guestfactory.partition_image(tmp_path)
    user_bucket = put_disk(moto, bucket, image)
    status, parsed = post_signed(
        appliance.endpoint,
        {
            "Action": "ImportImage",
            "DiskContainer.1.Format": "RAW",
            "DiskContainer.1.UserBucket.S3Bucket": user_bucket["S3Bucket"],
            "DiskContainer.1.UserBucket.S3Key": user_bucket["S3Key"],
            "VirtualizationType": "hvm",
        },
    )
    assert status == 200, parsed
    detail = assert_failed_before_conversion(
        appliance, parsed["ImportTaskId"], "Guest.PartitionImageNeedsKernel"
    )
    assert detail["boot"]["virtualization_type"] == "hvm"
    assert failed_report(detail)["layout"] == "partition"


def test_snapshot_of_a_data_disk_completes_with_informational_findings(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = guestfactory.data_disk(tmp_path)
    task_id = appliance.ec2.import_snapshot(
        DiskContainer={"Format": "RAW", "UserBucket": put_disk(moto, bucket, disk)}
    )["ImportTaskId"]

    def snapshot() -> dict[str, Any]:
        tasks = appliance.ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"]
        return tasks[0]["SnapshotTaskDetail"]

    wait_for(lambda: snapshot()["Status"] in ("completed", "deleted"), what="the snapshot import")
    assert snapshot()["Status"] == "completed", snapshot()
    detail = admin_task(appliance, task_id)
    assert ran(detail, "guest.validate")
    # a data disk has no OS and no boot loader: said, but only as information
    assert detail["findings"] and {f["severity"] for f in detail["findings"]} == {"info"}
    assert detail["guest"]["os"]["family"] is None


def test_import_instance_of_a_bootable_disk_reports_its_distribution(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = guestfactory.linux_disk(tmp_path)
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, disk)
    upload(s3, pending, disk)
    size = disk.stat().st_size
    task_id = appliance.ec2.import_instance(
        Platform="Linux",
        LaunchSpecification={"Architecture": "x86_64", "InstanceType": "m1.small"},
        DiskImages=[
            {
                "Image": {"Format": "RAW", "Bytes": size, "ImportManifestUrl": pending.url},
                "Volume": {"Size": 1},
            }
        ],
    )["ConversionTask"]["ConversionTaskId"]
    appliance.ec2.get_waiter("conversion_task_completed").wait(
        ConversionTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 120}
    )
    volume = conversion_task(appliance.ec2, task_id)["ImportInstance"]["Volumes"][0]
    assert volume["Status"] == "completed"
    with open(appliance.volume_file(volume["Volume"]["Id"]), "rb") as f:
        assert f.read(size) == disk.read_bytes()
    detail = admin_task(appliance, task_id)
    guest = detail["guest"]
    assert (guest["os"]["family"], guest["os"]["distribution"], guest["os"]["version"]) == (
        "linux",
        "debian",
        "12",
    )
    assert (guest["layout"], guest["partition_table"], guest["boot_mode"]) == ("disk", "mbr", "bios")
    assert detail["boot"]["layout"] == detail["task"]["result"]["boot"]["layout"] == "disk"
    assert not [f for f in detail["findings"] if f["severity"] == "error"]


def test_an_image_import_that_named_no_platform_reports_what_guest_validation_found(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = guestfactory.linux_disk(tmp_path)
    task_id = appliance.ec2.import_image(
        DiskContainers=[{"Format": "RAW", "UserBucket": put_disk(moto, bucket, disk)}]
    )["ImportTaskId"]
    running = image_task(appliance, task_id)
    assert "Platform" not in running or running["Platform"] is None  # nothing asked, nothing found yet
    final = finished_image_task(appliance, task_id)
    assert final["Status"] == "completed", final
    guest = admin_task(appliance, task_id)["guest"]
    assert (guest["os"]["family"], guest["boot_mode"]) == ("linux", "bios")
    # as EC2 shows a completed import: the platform, architecture and boot mode of the disk it found
    assert (final["Platform"], final["Architecture"], final["BootMode"]) == (
        "Linux",
        guest["os"]["architecture"],
        "legacy-bios",
    )
    assert final["Architecture"]


def test_a_snapshot_import_given_only_a_description_shows_it_on_its_snapshot_detail_too(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = guestfactory.linux_disk(tmp_path)
    started = appliance.ec2.import_snapshot(
        Description="my server", DiskContainer={"Format": "RAW", "UserBucket": put_disk(moto, bucket, disk)}
    )
    assert started["Description"] == started["SnapshotTaskDetail"]["Description"] == "my server"
    given = appliance.ec2.import_snapshot(
        Description="my server",
        DiskContainer={
            "Format": "RAW",
            "Description": "its root disk",
            "UserBucket": put_disk(moto, bucket, disk),
        },
    )
    detail = given["SnapshotTaskDetail"]
    assert (given["Description"], detail["Description"]) == ("my server", "its root disk")
