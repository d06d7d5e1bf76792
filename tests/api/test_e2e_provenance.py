"""Import provenance and the expected source digest as clients see them: boto3 → `imaging serve`
(gunicorn) → `imaging worker` → the file or s3 image target / the file volume target, S3 on a moto
server process. The digests the appliance records are compared with ``sha256sum`` of the bytes
themselves (the source object as uploaded, the stored file, the written volume)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from appliance import config as config_mod
from appliance.targets.exportdest import FileDestination
from appliance.targets.exportova import OvaSource, export_ova
from tests import guestfactory
from tests.api.e2e_support import Appliance, admin_task, conversion_task, wait_for
from tests.euca_upload import presign_manifest_url, random_file, upload
from tests.servers import MotoServer

pytestmark = pytest.mark.slow

MiB = 1 << 20


def sha256sum(path: Path) -> str:
    """``sha256sum PATH``: the digest as the coreutils tool reads the file."""
    return subprocess.run(
        ["sha256sum", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()[0]


def imaging_digest(path: Path) -> str:
    """``imaging digest PATH``: the chunked digest as a user recomputes it."""
    res = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "digest", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return str(json.loads(res.stdout)["value"])


def snapshot_task(ec2: Any, task_id: str) -> dict[str, Any]:
    return ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"][0]


def finished_snapshot(ec2: Any, task_id: str) -> dict[str, Any]:
    wait_for(
        lambda: (
            snapshot_task(ec2, task_id)["SnapshotTaskDetail"]["Status"] in ("completed", "deleted", "error")
        ),
        what=task_id,
    )
    return snapshot_task(ec2, task_id)["SnapshotTaskDetail"]


@pytest.fixture
def data_disk(tmp_path: Path, moto: MotoServer, bucket: str) -> Path:
    """A RAW data disk (MBR, one ext4 partition) uploaded to ``bucket`` as ``disks/data.raw`` with an
    ``x-amz-checksum-sha256`` (S3 keeps it; the appliance checks it); the local file."""
    disk = guestfactory.data_disk(tmp_path)
    moto.client("s3").put_object(
        Bucket=bucket, Key="disks/data.raw", Body=disk.read_bytes(), ChecksumAlgorithm="SHA256"
    )
    return disk


def _container(bucket: str) -> dict[str, Any]:
    return {"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": "disks/data.raw"}}


def test_import_snapshot_records_the_source_and_output_sha256_on_the_admin_api(
    appliance: Appliance, moto: MotoServer, bucket: str, data_disk: Path
) -> None:
    task_id = appliance.ec2.import_snapshot(DiskContainer=_container(bucket))["ImportTaskId"]
    assert finished_snapshot(appliance.ec2, task_id)["Status"] == "completed"
    shown = admin_task(appliance, task_id)
    record = shown["provenance"]
    assert record is not None and record["kind"] == "import" and record["task_id"] == task_id
    assert record == shown["task"]["result"]["provenance"]

    # the source: the sha256 of the object's bytes, computed as they streamed in
    source = record["sources"][0]
    assert record["source"] == source
    assert source["sha256"] == sha256sum(data_disk)
    assert source["size"] == data_disk.stat().st_size
    assert source["location"] == f"s3://{bucket}/disks/data.raw"
    # and the object's own digests, checked: its ETag (an MD5) and its x-amz-checksum-sha256
    head = moto.client("s3").head_object(Bucket=bucket, Key="disks/data.raw", ChecksumMode="ENABLED")
    checked = {c["what"]: c for c in source["checked"]}
    assert checked["etag-md5"]["value"] == hashlib.md5(data_disk.read_bytes()).hexdigest()
    assert checked["etag-md5"]["value"] == head["ETag"].strip('"')
    assert checked["x-amz-checksum-sha256"] == {
        "what": "x-amz-checksum-sha256",
        "value": head["ChecksumSHA256"],
        "verified": True,
    }
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == source["sha256"]

    # the output: a RAW source streams into the image target (no scratch copy), and the image file's
    # sha256-chunked is taken from the decoder's writes (no second read: no whole-file sha256)
    disk = shown["task"]["result"]["disk"]
    assert disk["route"]["streams"] is True and "fetched" not in disk
    stored = Path(disk["streamed"]["stored"]["path"])
    output = record["outputs"][0]
    assert output["digest"]["value"] == imaging_digest(stored) and output["sha256"] is None
    assert output["digest_method"].startswith("sha256-chunked computed while the streaming decoder")
    assert output["size"] == stored.stat().st_size

    # tools, the workflow file's digest, timings per stage
    assert record["tools"]["appliance"] and record["tools"]["qemu-img"].startswith("qemu-img version")
    assert "dissect" in record["tools"]  # the guest was read (data disk validation)
    shipped = Path(__file__).resolve().parents[2] / "appliance" / "workflows" / "import-snapshot.yaml"
    assert record["workflow"]["workflow_sha256"] == sha256sum(shipped)
    assert record["workflow"]["hooks_sha256"] == hashlib.sha256(b"{}").hexdigest()
    stages = {s["name"] for s in record["timings"]["stages"]}
    assert {"route", "stream"} <= stages  # the streamed path: no fetch into scratch, no qemu-img convert
    assert all(s["seconds"] >= 0 for s in record["timings"]["stages"])
    assert record["timings"]["started"] and record["timings"]["finished"]


def test_import_snapshot_to_s3_keeps_its_provenance_as_the_objects_metadata(
    s3_appliance: Appliance, moto: MotoServer, bucket: str, image_bucket: str, data_disk: Path, tmp_path: Path
) -> None:
    task_id = s3_appliance.ec2.import_snapshot(DiskContainer=_container(bucket))["ImportTaskId"]
    assert finished_snapshot(s3_appliance.ec2, task_id)["Status"] == "completed"
    record = admin_task(s3_appliance, task_id)["provenance"]
    s3 = moto.client("s3")
    key = f"images/{task_id}.raw"
    s3.download_file(image_bucket, key, str(tmp_path / "stored.raw"))
    output = record["outputs"][0]
    assert (output["bucket"], output["key"]) == (image_bucket, key)
    assert output["sha256"] == sha256sum(tmp_path / "stored.raw")
    # a RAW disk streams into the bucket: hashed as it was sent, checked at a staging key, then copied
    assert "while streaming" in output["digest_method"]
    meta = s3.head_object(Bucket=image_bucket, Key=key)["Metadata"]
    assert meta["import-task-id"] == task_id
    assert meta["source-sha256"] == sha256sum(data_disk) == record["source"]["sha256"]
    assert meta["sha256"] == output["sha256"]
    assert meta["workflow-sha256"] == record["workflow"]["workflow_sha256"]
    assert meta["hooks-sha256"] == record["workflow"]["hooks_sha256"]
    assert meta["appliance-version"] == record["tools"]["appliance"]


def test_import_volume_records_the_upload_sha256_its_part_md5s_and_the_volume_sha256(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = random_file(tmp_path / "disk.raw", 12 * MiB)
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, disk)
    upload(s3, pending, disk, part_size=5 * MiB)
    task_id = appliance.ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": disk.stat().st_size, "ImportManifestUrl": pending.url},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]
    appliance.ec2.get_waiter("conversion_task_completed").wait(
        ConversionTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )
    volume_id = conversion_task(appliance.ec2, task_id)["ImportVolume"]["Volume"]["Id"]
    record = admin_task(appliance, task_id)["provenance"]
    source = record["source"]
    assert source["sha256"] == sha256sum(disk) and source["size"] == disk.stat().st_size
    # every part's MD5, checked against its ETag as it arrived: the MD5s of the file's 5 MiB pieces
    data = disk.read_bytes()
    expected = [
        {"index": i, "md5": hashlib.md5(data[start : start + 5 * MiB]).hexdigest()}
        for i, start in enumerate(range(0, len(data), 5 * MiB))
    ]
    (parts,) = [c for c in source["checked"] if c["what"] == "manifest-part-md5"]
    assert parts["parts"] == expected and parts["verified"] == 3
    # the volume as handed over: 1 GiB, the disk then zeros; its sha256-chunked taken as the parts were
    # written (no second read), what `imaging digest` computes from the volume
    output = record["output"]
    assert output["volume_id"] == volume_id
    assert output["digest"]["value"] == imaging_digest(appliance.volume_file(volume_id))
    assert output["digest"]["chunks"] == 16 and output["sha256"] is None
    assert output["size"] == 1 << 30
    assert output["digest_method"].startswith("sha256-chunked computed while writing")


def test_import_image_of_an_ova_records_the_members_its_manifest_verified(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    boot = guestfactory.linux_disk(tmp_path)
    ova = tmp_path / "vm.ova"
    (tmp_path / "ova-work").mkdir()
    export_ova(
        [OvaSource(boot)],
        FileDestination(ova),
        name="vm",
        config=config_mod.load(appliance.config),
        workdir=tmp_path / "ova-work",
    )
    moto.client("s3").upload_file(str(ova), bucket, "vms/vm.ova")
    digest = sha256sum(ova)
    task_id = appliance.ec2.import_image(
        Description=f"vm [imaging:sha256={digest}]",
        DiskContainers=[{"Format": "ova", "UserBucket": {"S3Bucket": bucket, "S3Key": "vms/vm.ova"}}],
    )["ImportTaskId"]

    def status() -> dict[str, Any]:
        return appliance.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]

    wait_for(lambda: status()["Status"] in ("completed", "deleted"), what="the OVA import")
    assert status()["Status"] == "completed", status()
    shown = admin_task(appliance, task_id)
    source = shown["provenance"]["source"]
    assert source["sha256"] == source["expected_sha256"] == digest  # the OVA's tar, as uploaded
    with tarfile.open(ova) as tar:
        members = {
            m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if not m.name.endswith(".mf")
        }
    mf = {c["member"]: c["sha256"] for c in source["checked"] if c["what"] == "ova-mf"}
    assert mf == members and set(mf) == {"vm.ovf", "vm-disk1.vmdk"}
    stored = Path(shown["task"]["result"]["disk"]["stored"]["path"])
    assert shown["provenance"]["output"]["sha256"] == sha256sum(stored)


# -- the expected digest -----------------------------------------------------------------------------


def test_import_snapshot_with_the_right_expected_sha256_completes(
    appliance: Appliance, bucket: str, data_disk: Path
) -> None:
    digest = sha256sum(data_disk)
    task_id = appliance.ec2.import_snapshot(
        DiskContainer=_container(bucket), Description=f"data [imaging:sha256={digest.upper()}]"
    )["ImportTaskId"]
    assert finished_snapshot(appliance.ec2, task_id)["Status"] == "completed"
    assert admin_task(appliance, task_id)["provenance"]["source"]["expected_sha256"] == digest


def test_import_snapshot_with_a_wrong_expected_sha256_fails_and_stores_nothing(
    appliance: Appliance, bucket: str, data_disk: Path
) -> None:
    wrong = hashlib.sha256(b"another disk").hexdigest()
    task_id = appliance.ec2.import_snapshot(
        DiskContainer=_container(bucket), Description=f"[imaging:sha256={wrong}]"
    )["ImportTaskId"]
    detail = finished_snapshot(appliance.ec2, task_id)
    assert detail["Status"] != "completed"
    shown = admin_task(appliance, task_id)
    assert shown["task"]["error_code"] == "Source.DigestMismatch"
    message = shown["task"]["error_message"]
    assert wrong in message and sha256sum(data_disk) in message
    assert f"s3://{bucket}/disks/data.raw" in message
    images = appliance.state / "images"
    assert not images.exists() or list(images.iterdir()) == []  # nothing was stored
    assert [s["name"] for s in shown["steps"] if s["state"] == "completed" and s["name"] == "store"] == []


def test_import_volume_with_a_wrong_expected_sha256_member_fails_and_removes_the_volume(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = random_file(tmp_path / "disk.raw", 6 * MiB)
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, disk)
    upload(s3, pending, disk)
    wrong = "0" * 64

    # the extra member boto3 would refuse to send: added to the serialized query body
    def add_member(params: dict[str, Any], **_: Any) -> None:
        params["body"]["ExpectedSha256"] = wrong

    appliance.ec2.meta.events.register("before-call.ec2.ImportVolume", add_member)
    try:
        task_id = appliance.ec2.import_volume(
            AvailabilityZone="us-east-1a",
            Image={"Format": "RAW", "Bytes": disk.stat().st_size, "ImportManifestUrl": pending.url},
            Volume={"Size": 1},
        )["ConversionTask"]["ConversionTaskId"]
    finally:
        appliance.ec2.meta.events.unregister("before-call.ec2.ImportVolume", add_member)
    with pytest.raises(botocore.exceptions.WaiterError):
        appliance.ec2.get_waiter("conversion_task_completed").wait(
            ConversionTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 60}
        )
    shown = admin_task(appliance, task_id)
    assert shown["task"]["error_code"] == "Source.DigestMismatch"
    assert wrong in shown["task"]["error_message"] and sha256sum(disk) in shown["task"]["error_message"]
    assert list((appliance.state / "volumes").glob("vol-*")) == []  # the volume was removed


@pytest.mark.parametrize(
    "description",
    ["[imaging:sha256=abc123]", f"[imaging:sha256={'g' * 64}]", f"[imaging:sha256={'a' * 65}]"],
)
def test_a_malformed_expected_sha256_is_refused_when_the_request_arrives(
    appliance: Appliance, bucket: str, description: str
) -> None:
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        appliance.ec2.import_snapshot(DiskContainer=_container(bucket), Description=description)
    error = exc.value.response["Error"]
    assert error["Code"] == "InvalidParameterValue"
    assert "sha256" in error["Message"] and "64 hexadecimal digits" in error["Message"]
    assert appliance.ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"] == []
