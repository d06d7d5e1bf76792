"""Multi-disk ImportImage as clients see it: several DiskContainers (or an OVA's disks) become one task
whose every disk is fetched, inspected, converted and stored, each a snapshot of the image. `imaging
serve` (gunicorn) and `imaging worker` as real processes, S3 on a moto server process, boto3 as the
client, every stored disk compared with its source by ``qemu-img compare``. While a disk's download is
held (:class:`~tests.stallproxy.StallingProxy` in front of the moto server), each disk's own status
shows: the disks before it completed, it active with its own progress, the disks after it pending."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.image.inspect import PREFLIGHT_HEAD
from appliance.targets.exportdest import FileDestination
from appliance.targets.exportova import OvaSource, export_ova
from tests import guestfactory
from tests import imagefactory as imgs
from tests.api.e2e_support import Appliance, admin_task, running_appliance, wait_for
from tests.httpfixtures import TestHTTPServer
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20


def _data_disk(path: Path, mib: int) -> Path:
    """A data disk: random bytes, then zeros (no partition table: a data disk need not have one)."""
    path.write_bytes(os.urandom(MiB) + bytes((mib - 1) * MiB))
    return path


def _identical(source: Path, stored: Path) -> None:
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), str(stored)],
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr


def _finished(appliance: Appliance, task_id: str) -> dict[str, Any]:
    def status() -> dict[str, Any]:
        return appliance.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]

    wait_for(lambda: status()["Status"] in ("completed", "deleted"), what="the image import")
    return status()


def _stored_disks(result: dict[str, Any]) -> list[Path]:
    disks = [result["disk"], *result.get("data_disks", []), *result.get("ova_data_disks", [])]
    # a sequential format streams into the image target (image.stream), any other goes through scratch
    return [Path((d.get("stored") or d["streamed"]["stored"])["path"]) for d in disks]


def _boot_disk_was_stored(appliance: Appliance, task_id: str) -> bool:
    """The task's ledger says the image target stored the boot disk (``<task id>.raw``) and removed it."""
    ledger = admin_task(appliance, task_id)["ledger"]
    stored = [e for e in ledger if f'/{task_id}.raw"' in e["resource"] and e["resource"].startswith("{")]
    return {e["action"] for e in stored} == {"created", "removed"}


def test_three_disks_of_different_formats_import_as_one_image_with_a_snapshot_each(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    boot = guestfactory.linux_disk(tmp_path)
    second = _data_disk(tmp_path / "second.raw", 3)
    third = _data_disk(tmp_path / "third.raw", 5)
    s3 = moto.client("s3")
    s3.upload_file(
        str(guestfactory.convert(boot, tmp_path / "boot.vmdk", "vmdk", "subformat=streamOptimized")),
        bucket,
        "vm/boot.vmdk",
    )
    s3.upload_file(str(second), bucket, "vm/second.raw")
    s3.upload_file(
        str(guestfactory.convert(third, tmp_path / "third.vhd", "vpc", "force_size=on")),
        bucket,
        "vm/third.vhd",
    )
    containers = [
        {
            "Format": "VMDK",
            "UserBucket": {"S3Bucket": bucket, "S3Key": "vm/boot.vmdk"},
            "Description": "root",
        },
        {"Format": "RAW", "Url": f"s3://{bucket}/vm/second.raw"},
        {
            "Format": "VHD",
            "UserBucket": {"S3Bucket": bucket, "S3Key": "vm/third.vhd"},
            "DeviceName": "/dev/sdf",
        },
    ]
    task_id = appliance.ec2.import_image(DiskContainers=containers, Platform="Linux")["ImportTaskId"]

    final = _finished(appliance, task_id)
    assert final["Status"] == "completed", final
    details = final["SnapshotDetails"]
    # one detail per disk, in request order, each its own
    assert [d["DeviceName"] for d in details] == ["/dev/sda1", "/dev/sdb", "/dev/sdf"]
    assert [d["Format"] for d in details] == ["VMDK", "RAW", "VHD"]
    assert [d["DiskImageSize"] for d in details] == [
        float(boot.stat().st_size),
        float(3 * MiB),
        float(5 * MiB),
    ]
    assert details[0]["UserBucket"] == {"S3Bucket": bucket, "S3Key": "vm/boot.vmdk"}
    assert details[0]["Description"] == "root"
    assert details[1]["Url"] == f"s3://{bucket}/vm/second.raw"
    assert details[0]["SnapshotId"] == "snap-" + task_id[-17:]
    ids = [d["SnapshotId"] for d in details]
    assert len(set(ids)) == 3 and all(i.startswith("snap-") and len(i) == 22 for i in ids)
    assert {d["Status"] for d in details} == {"completed"}
    # the same on every read
    assert _finished(appliance, task_id)["SnapshotDetails"] == details

    detail = admin_task(appliance, task_id)
    stored = _stored_disks(detail["task"]["result"])
    assert len(set(stored)) == 3
    for source, out in zip([boot, second, third], stored, strict=True):
        _identical(source, out)
    # the boot disk was validated as bootable, the data disks (no partition table, no bootloader:
    # not bootable) as data disks, their boot findings only informational
    # (a streamed disk is validated by its stream step, on the disk it wrote; the others by
    # validate-guest)
    validated = [
        s["args"]["bootable"]
        for s in detail["steps"]
        if s["name"] in ("validate-guest", "stream") and s["state"] == "completed"
    ]
    assert sorted(validated) == [False, False, True]
    data_disks = detail["task"]["result"]["data_disks"]
    assert all((d.get("guest") or d["streamed"]["guest"])["ok"] for d in data_disks)


def test_a_hostile_second_disk_fails_the_whole_image_and_nothing_of_any_disk_is_stored(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    boot = guestfactory.linux_disk(tmp_path)
    hostile = imgs.qcow2_backing(tmp_path)  # qcow2 with /etc/passwd as backing file, claimed RAW
    s3 = moto.client("s3")
    s3.upload_file(str(boot), bucket, "vm/boot.raw")
    s3.upload_file(str(hostile), bucket, "vm/data.raw")
    task_id = appliance.ec2.import_image(
        DiskContainers=[
            {"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": "vm/boot.raw"}},
            {"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": "vm/data.raw"}},
        ]
    )["ImportTaskId"]

    final = _finished(appliance, task_id)
    assert final["Status"] == "deleted", final
    assert final["StatusMessage"].startswith("ClientError: UnsafeImage.BackingFile: "), final["StatusMessage"]
    assert [d["Status"] for d in final["SnapshotDetails"]] == ["deleted", "deleted"]
    # the boot disk had been stored before the second disk was fetched: removed again
    assert _boot_disk_was_stored(appliance, task_id)
    images = appliance.state / "images"
    assert not images.exists() or sorted(p.name for p in images.iterdir()) == []


def test_a_multi_disk_ova_imports_every_disk_in_ovf_order_with_its_size(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    # an OVA of a UEFI guest (firmware efi in its OVF) and two data disks, written by the project's writer
    boot = guestfactory.uefi_disk(tmp_path)
    second = _data_disk(tmp_path / "second.raw", 4)
    third = _data_disk(tmp_path / "third.raw", 2)
    ova = tmp_path / "vm.ova"
    (tmp_path / "ova-work").mkdir()
    export_ova(
        [OvaSource(boot), OvaSource(second), OvaSource(third)],
        FileDestination(ova),
        name="vm",
        config=config_mod.load(appliance.config),
        workdir=tmp_path / "ova-work",
        firmware="efi",
    )
    moto.client("s3").upload_file(str(ova), bucket, "vms/vm.ova")
    task_id = appliance.ec2.import_image(
        DiskContainers=[{"Format": "ova", "UserBucket": {"S3Bucket": bucket, "S3Key": "vms/vm.ova"}}]
    )["ImportTaskId"]

    final = _finished(appliance, task_id)
    assert final["Status"] == "completed", final
    details = final["SnapshotDetails"]
    assert [d["DeviceName"] for d in details] == ["/dev/sda1", "/dev/sdb", "/dev/sdc"]
    assert [d["Format"] for d in details] == ["VMDK", "VMDK", "VMDK"]
    assert [d["DiskImageSize"] for d in details] == [
        float(boot.stat().st_size),
        float(4 * MiB),
        float(2 * MiB),
    ]
    assert {d["UserBucket"]["S3Key"] for d in details} == {"vms/vm.ova"}
    assert len({d["SnapshotId"] for d in details}) == 3
    result = admin_task(appliance, task_id)["task"]["result"]
    assert result["disk"]["opened"]["boot_mode"] == "uefi"
    for source, out in zip([boot, second, third], _stored_disks(result), strict=True):
        _identical(source, out)


def test_an_ova_claiming_efi_whose_boot_disk_boots_only_by_bios_fails_with_boot_mode_mismatch(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    # AWS fails an import whose VM asks for a boot mode its boot disk does not support; so does this
    boot = guestfactory.linux_disk(tmp_path)
    ova = tmp_path / "vm.ova"
    (tmp_path / "ova-work").mkdir()
    export_ova(
        [OvaSource(boot), OvaSource(_data_disk(tmp_path / "data.raw", 2))],
        FileDestination(ova),
        name="vm",
        config=config_mod.load(appliance.config),
        workdir=tmp_path / "ova-work",
        firmware="efi",
    )
    moto.client("s3").upload_file(str(ova), bucket, "vms/vm.ova")
    task_id = appliance.ec2.import_image(
        DiskContainers=[{"Format": "ova", "UserBucket": {"S3Bucket": bucket, "S3Key": "vms/vm.ova"}}]
    )["ImportTaskId"]

    final = _finished(appliance, task_id)
    assert final["Status"] == "deleted", final
    assert "Guest.BootModeMismatch" in final["StatusMessage"], final["StatusMessage"]
    images = appliance.state / "images"
    assert not images.exists() or sorted(p.name for p in images.iterdir()) == []


# -- each disk's own status while the import runs ----------------------------------------------------


@pytest.fixture
def held(
    tmp_path: Path, moto: MotoServer, parts_server: TestHTTPServer
) -> Iterator[tuple[Appliance, StallingProxy]]:
    """The appliance reading S3 through a :class:`StallingProxy` (which can hold a download)."""
    with StallingProxy(moto.endpoint) as proxy:
        sources = {
            "allowed_endpoints": [proxy.endpoint, moto.endpoint, parts_server.endpoint],
            # ranged GETs of 1 MiB: the ranges before a held byte are handed over as they complete
            "range_size": "1MiB",
            "s3": {
                "endpoint_url": proxy.endpoint,
                "region": REGION,
                "access_key": "testing",
                "secret_key": "testing",
            },
        }
        with running_appliance(tmp_path, moto, parts_server, extra={"sources": sources}) as app:
            try:
                yield app, proxy
            finally:
                proxy.release()


@pytest.mark.parametrize(
    ("fmt", "phase"),
    [
        ("RAW", "writing"),  # a sequential format streams into the image target
        ("VHDX", "downloading"),  # a random-access one is downloaded into scratch first
    ],
)
def test_while_the_second_disk_downloads_the_first_is_completed_it_is_active_and_the_third_pending(
    held: tuple[Appliance, StallingProxy], moto: MotoServer, bucket: str, tmp_path: Path, fmt: str, phase: str
) -> None:
    appliance, proxy = held
    boot = guestfactory.linux_disk(tmp_path)
    second = _data_disk(tmp_path / "second.raw", 12)
    third = _data_disk(tmp_path / "third.raw", 2)
    if fmt == "VHDX":
        second_object = guestfactory.convert(second, tmp_path / "second.vhdx", "vhdx")
    else:
        second_object = second
    key = f"vm/second.{fmt.lower()}"
    s3 = moto.client("s3")
    s3.upload_file(str(boot), bucket, "vm/boot.raw")
    s3.upload_file(str(second_object), bucket, key)
    s3.upload_file(str(third), bucket, "vm/third.raw")
    # the second disk's download stops past the preflight's first bytes and the streaming decoder's
    # first 4 MiB piece (a streamed disk's written bytes are its progress), until released
    proxy.arm(key, PREFLIGHT_HEAD + 5 * MiB)
    task_id = appliance.ec2.import_image(
        DiskContainers=[
            {"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": "vm/boot.raw"}},
            {"Format": fmt, "UserBucket": {"S3Bucket": bucket, "S3Key": key}, "Description": "data"},
            {"Format": "RAW", "Url": f"s3://{bucket}/vm/third.raw"},
        ],
        Platform="Linux",
    )["ImportTaskId"]
    overall: list[int] = []

    def status() -> dict[str, Any]:
        task = appliance.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
        if task.get("Progress") is not None:
            overall.append(int(task["Progress"]))
        return task

    wait_for(lambda: proxy.stalled_on(key) >= 1, what="the second disk's download to be held")
    # the held download's bytes so far are the second disk's own progress
    wait_for(lambda: status()["SnapshotDetails"][1].get("Progress") not in (None, "0"), what="its progress")
    running = status()
    assert running["Status"] == "active"
    first, held_disk, last = running["SnapshotDetails"]
    assert [d["DeviceName"] for d in running["SnapshotDetails"]] == ["/dev/sda1", "/dev/sdb", "/dev/sdc"]
    # the boot disk is stored: completed, with its own size and snapshot id
    assert first["Status"] == "completed" and first.get("Progress") is None
    assert first["SnapshotId"] == "snap-" + task_id[-17:]
    assert first["DiskImageSize"] == float(boot.stat().st_size) and first["Format"] == "RAW"
    # the second disk runs: its own phase, progress and the size of what it transfers
    assert held_disk["Status"] == "active" and held_disk["StatusMessage"] == phase
    assert 0 < int(held_disk["Progress"]) < 100
    assert held_disk["DiskImageSize"] == float(second_object.stat().st_size)
    assert held_disk["Format"] == fmt and held_disk["Description"] == "data"
    assert held_disk.get("SnapshotId") is None
    # the third disk's turn has not come
    assert last["Status"] == "pending" and last["StatusMessage"] == "pending" and last["Progress"] == "0"
    assert last.get("DiskImageSize") is None and last.get("SnapshotId") is None
    assert last["Url"] == f"s3://{bucket}/vm/third.raw"
    # the task's progress counts each disk alike: one of three done, the second on its way
    assert 33 <= int(running["Progress"]) < 67
    assert not any(path.endswith("/vm/third.raw") for path in proxy.served_by_path)  # not even preflighted

    proxy.release(key)
    wait_for(lambda: status()["Status"] in ("completed", "deleted"), what="the image import")
    final = status()
    assert final["Status"] == "completed", final
    details = final["SnapshotDetails"]
    assert [d["Status"] for d in details] == ["completed"] * 3
    assert [d["DiskImageSize"] for d in details] == [
        float(boot.stat().st_size),
        float(12 * MiB),
        float(2 * MiB),
    ]
    # the task's progress never went back while it ran
    assert overall == sorted(overall), overall
    stored = _stored_disks(admin_task(appliance, task_id)["task"]["result"])
    for source, out in zip([boot, second, third], stored, strict=True):
        _identical(source, out)


# -- an expected sha256 per disk ----------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_with(appliance: Appliance, containers: list[dict[str, Any]], extra: dict[str, str]) -> str:
    """ImportImage with ``extra`` members botocore does not know (``DiskContainer.N.ExpectedSha256``),
    added to the body before it is signed."""

    def add(params: dict[str, Any], **_: Any) -> None:
        params["body"].update(extra)

    appliance.ec2.meta.events.register("before-call.ec2.ImportImage", add)
    try:
        return str(appliance.ec2.import_image(DiskContainers=containers)["ImportTaskId"])
    finally:
        appliance.ec2.meta.events.unregister("before-call.ec2.ImportImage", add)


@pytest.mark.parametrize(
    ("fmt", "via", "checked_by"),
    [
        ("RAW", "member", "stream"),  # streamed into the image target: checked before it is published
        ("VHDX", "token", "fetch"),  # downloaded into scratch: checked before it is converted
    ],
)
def test_a_second_disk_that_is_not_its_expected_sha256_fails_the_image_naming_it_and_stores_nothing(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path, fmt: str, via: str, checked_by: str
) -> None:
    boot = guestfactory.linux_disk(tmp_path)
    second = _data_disk(tmp_path / "second.raw", 3)
    obj = guestfactory.convert(second, tmp_path / "second.vhdx", "vhdx") if fmt == "VHDX" else second
    key = f"vm/second.{fmt.lower()}"
    s3 = moto.client("s3")
    s3.upload_file(str(boot), bucket, "vm/boot.raw")
    s3.upload_file(str(obj), bucket, key)
    wrong = hashlib.sha256(b"another disk").hexdigest()
    containers = [
        # the boot disk's own digest is right: it is stored, then removed again
        {
            "Format": "RAW",
            "UserBucket": {"S3Bucket": bucket, "S3Key": "vm/boot.raw"},
            "Description": f"root [imaging:sha256={_sha256(boot)}]",
        },
        {"Format": fmt, "UserBucket": {"S3Bucket": bucket, "S3Key": key}},
    ]
    extra = {}
    if via == "token":
        containers[1]["Description"] = f"data [imaging:sha256={wrong}]"
    else:
        extra["DiskContainer.2.ExpectedSha256"] = wrong
    task_id = _import_with(appliance, containers, extra)

    final = _finished(appliance, task_id)
    assert final["Status"] == "deleted", final
    assert final["StatusMessage"].startswith("ClientError: Source.DigestMismatch: "), final["StatusMessage"]
    shown = admin_task(appliance, task_id)
    message = shown["task"]["error_message"]
    assert wrong in message and _sha256(obj) in message
    assert f"s3://{bucket}/{key} of disk2 (DiskContainer.2)" in message
    failed = [s["name"] for s in shown["steps"] if s["state"] == "failed" and "/include/" in s["idx"]]
    assert failed == [checked_by]
    assert _boot_disk_was_stored(appliance, task_id)
    images = appliance.state / "images"
    assert not images.exists() or sorted(p.name for p in images.iterdir()) == []


def test_every_disk_with_its_right_expected_sha256_completes_and_the_record_lists_each(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    boot = guestfactory.linux_disk(tmp_path)
    second = _data_disk(tmp_path / "second.raw", 3)
    s3 = moto.client("s3")
    s3.upload_file(str(boot), bucket, "vm/boot.raw")
    s3.upload_file(str(second), bucket, "vm/second.raw")
    containers = [
        {"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": "vm/boot.raw"}},
        {"Format": "RAW", "Url": f"s3://{bucket}/vm/second.raw"},
    ]
    # the request's member is the first disk's; the second's is its own
    extra = {"ExpectedSha256": _sha256(boot), "DiskContainer.2.ExpectedSha256": _sha256(second).upper()}
    task_id = _import_with(appliance, containers, extra)
    assert _finished(appliance, task_id)["Status"] == "completed"
    sources = admin_task(appliance, task_id)["provenance"]["sources"]
    assert [(s["sha256"], s["expected_sha256"]) for s in sources] == [
        (_sha256(boot), _sha256(boot)),
        (_sha256(second), _sha256(second)),
    ]
