"""The appliance as clients see it: `imaging serve` (gunicorn) and `imaging worker` as real processes,
S3 on a moto server process, boto3 and the AWS CLI as clients, disks compared with qemu-img."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import botocore.exceptions
import pytest

from appliance.sources.manifest import Part, build_manifest, plan_parts
from tests import guestfactory
from tests import imagefactory as imgs
from tests.api.awscli_support import aws_ec2
from tests.api.e2e_support import Appliance, admin_task, conversion_task, running_appliance, wait_for
from tests.euca_upload import presign_manifest_url, random_file, upload
from tests.httpfixtures import TestHTTPServer
from tests.servers import MotoServer

pytestmark = pytest.mark.slow

MiB = 1 << 20


def test_euca2ools_style_import_volume_goes_pending_active_completed(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = random_file(tmp_path / "disk.raw", 23 * MiB)
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, "euca", disk)
    # euca2ools creates the task before it uploads anything
    task = appliance.ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Description="from euca2ools",
        Image={"Format": "RAW", "Bytes": disk.stat().st_size, "ImportManifestUrl": pending.url},
        Volume={"Size": 1},
    )["ConversionTask"]
    task_id = task["ConversionTaskId"]
    assert task_id.startswith("import-vol-") and task["State"] == "active"
    wait_for(
        lambda: conversion_task(appliance.ec2, task_id)["StatusMessage"] == "Pending import-image upload",
        what="the pending-upload state",
    )
    echoed = conversion_task(appliance.ec2, task_id)["ImportVolume"]
    # euca2ools' resume-import reads these four back to build its manifest; of the URL it takes
    # the bucket and key only, and the signature is not echoed
    echoed_url = echoed["Image"].pop("ImportManifestUrl")
    assert echoed["Image"] == {"Format": "RAW", "Size": disk.stat().st_size}
    assert echoed_url.split("?")[0] == pending.url.split("?")[0]
    signature = parse_qs(urlsplit(pending.url).query)["Signature"][0]  # boto3 presigns S3 with SigV2
    assert quote(signature, safe="") not in echoed_url and "Signature=REDACTED" in echoed_url
    assert echoed["Volume"]["Size"] == 1
    upload(s3, pending, disk, image_size=echoed["Image"]["Size"], volume_size=echoed["Volume"]["Size"])
    seen: list[int] = []

    def progressed() -> bool:
        t = conversion_task(appliance.ec2, task_id)
        seen.append(t["ImportVolume"]["BytesConverted"])
        return t["State"] == "completed"

    wait_for(progressed, what="completion")
    assert seen == sorted(seen)  # bytesConverted never goes backwards
    done = conversion_task(appliance.ec2, task_id)["ImportVolume"]
    assert done["BytesConverted"] == disk.stat().st_size
    volume = appliance.volume_file(done["Volume"]["Id"])
    with open(volume, "rb") as f:
        assert f.read(disk.stat().st_size) == disk.read_bytes()
    appliance.ec2.get_waiter("conversion_task_completed").wait(
        ConversionTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 3}
    )


def test_import_instance_of_a_stream_optimized_vmdk_matches_the_source(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    # ImportInstance validates the guest: a real bootable Linux disk, not random data
    src = guestfactory.linux_disk(tmp_path)
    vmdk = guestfactory.convert(src, tmp_path / "disk.vmdk", "vmdk", "subformat=streamOptimized")
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, vmdk)
    upload(s3, pending, vmdk, file_format="VMDK", part_size=5 * MiB)
    virtual = imgs.virtual_size(vmdk)
    task = appliance.ec2.import_instance(
        Platform="Linux",
        Description="vm",
        LaunchSpecification={"Architecture": "x86_64", "InstanceType": "m1.small"},
        DiskImages=[
            {
                "Image": {"Format": "VMDK", "Bytes": virtual, "ImportManifestUrl": pending.url},
                "Volume": {"Size": 1},
            }
        ],
    )["ConversionTask"]
    appliance.ec2.get_waiter("conversion_task_completed").wait(
        ConversionTaskIds=[task["ConversionTaskId"]], WaiterConfig={"Delay": 1, "MaxAttempts": 120}
    )
    volume = conversion_task(appliance.ec2, task["ConversionTaskId"])["ImportInstance"]["Volumes"][0]
    assert volume["Status"] == "completed" and volume["BytesConverted"] == virtual
    path = appliance.volume_file(volume["Volume"]["Id"])
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(path)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout


def test_hostile_image_fails_the_task_with_a_coded_client_error(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    hostile = imgs.qcow2_backing(tmp_path)  # qcow2 with /etc/passwd as backing file, claimed RAW
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, hostile)
    upload(s3, pending, hostile)
    task_id = appliance.ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": hostile.stat().st_size, "ImportManifestUrl": pending.url},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]
    with pytest.raises(botocore.exceptions.WaiterError):  # a failure surfaces as cancelled: fail fast
        appliance.ec2.get_waiter("conversion_task_completed").wait(
            ConversionTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 60}
        )
    t = conversion_task(appliance.ec2, task_id)
    assert t["State"] == "cancelled"
    assert t["StatusMessage"].startswith("ClientError: FormatMismatch: ")
    assert "claimed RAW, detected qcow2" in t["StatusMessage"]
    assert list((appliance.state / "volumes").glob("vol-*")) == []  # the volume was removed


def test_cancel_mid_transfer_ends_cancelled_and_removes_the_volume(
    appliance: Appliance, parts_server: TestHTTPServer, tmp_path: Path
) -> None:
    # The third part stalls until the server stops: the task is provably mid-transfer when cancelled.
    disk = random_file(tmp_path / "disk.raw", 4 * MiB).read_bytes()
    parts = []
    for index, start, end in plan_parts(len(disk), MiB):
        path = f"/parts/disk.part.{index}"
        route = parts_server.add(path, disk[start : end + 1])
        if index == 2:
            route.script.extend(["ok", f"stall:{64 * 1024}"])  # the HEAD answers, the GET hangs
        url = parts_server.url(path)
        parts.append(Part(index=index, start=start, end=end, key=path, head_url=url, get_url=url))
    manifest = build_manifest(
        file_format="RAW",
        size=len(disk),
        volume_size=1,
        parts=parts,
        self_destruct_url=parts_server.url("/manifest.xml"),
    )
    parts_server.add("/manifest.xml", manifest)
    task_id = appliance.ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": len(disk), "ImportManifestUrl": parts_server.url("/manifest.xml")},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]
    wait_for(
        lambda: conversion_task(appliance.ec2, task_id)["ImportVolume"]["BytesConverted"] > 0,
        what="the first parts to be written",
    )
    appliance.ec2.cancel_conversion_task(ConversionTaskId=task_id, ReasonMessage="wrong disk")
    appliance.ec2.get_waiter("conversion_task_cancelled").wait(
        ConversionTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 30}
    )
    t = conversion_task(appliance.ec2, task_id)
    assert t["StatusMessage"] == "wrong disk"
    assert 0 < t["ImportVolume"]["BytesConverted"] <= 2 * MiB  # only the verified parts before the stall
    assert list((appliance.state / "volumes").glob("vol-*")) == []
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        appliance.ec2.cancel_conversion_task(ConversionTaskId=task_id)
    assert exc.value.response["Error"]["Code"] == "IncorrectState"


def test_worker_killed_mid_task_resumes_after_restart(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = random_file(tmp_path / "disk.raw", 12 * MiB)
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, disk)
    task_id = appliance.ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": disk.stat().st_size, "ImportManifestUrl": pending.url},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]
    wait_for(
        lambda: conversion_task(appliance.ec2, task_id)["StatusMessage"] == "Pending import-image upload",
        what="the task to start waiting",
    )
    # kill -9 the worker and the task's own process: nothing gets to clean up
    children = appliance.task_processes()
    appliance.worker.kill()
    appliance.worker.wait()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    upload(s3, pending, disk)
    assert conversion_task(appliance.ec2, task_id)["State"] == "active"
    appliance.worker = appliance.start_worker()
    appliance.ec2.get_waiter("conversion_task_completed").wait(
        ConversionTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )
    volume_id = conversion_task(appliance.ec2, task_id)["ImportVolume"]["Volume"]["Id"]
    with open(appliance.volume_file(volume_id), "rb") as f:
        assert f.read(disk.stat().st_size) == disk.read_bytes()


def test_task_killed_mid_parts_resumes_from_the_last_verified_part(
    moto: MotoServer, parts_server: TestHTTPServer, tmp_path: Path
) -> None:
    # a checkpoint at every part boundary past each MiB: at every part here
    with running_appliance(tmp_path, moto, parts_server, sources={"checkpoint_every": MiB}) as appliance:
        _killed_mid_parts_resumes(appliance, parts_server, tmp_path)


def _killed_mid_parts_resumes(appliance: Appliance, parts_server: TestHTTPServer, tmp_path: Path) -> None:
    # Six 1 MiB parts; the first GET of part 3 stalls, so the task is provably between parts 0-2
    # (verified, written, checkpointed) and the rest when its process is killed.
    disk = random_file(tmp_path / "disk.raw", 6 * MiB).read_bytes()
    stalled = 3
    parts, paths = [], []
    for index, start, end in plan_parts(len(disk), MiB):
        path = f"/parts/disk.part.{index}"
        route = parts_server.add(path, disk[start : end + 1])
        if index == stalled:
            route.script.extend(["ok", f"stall:{64 * 1024}"])  # the HEAD answers, the first GET hangs
        url = parts_server.url(path)
        parts.append(Part(index=index, start=start, end=end, key=path, head_url=url, get_url=url))
        paths.append(path)
    manifest_url = parts_server.url("/manifest.xml")
    manifest = build_manifest(
        file_format="RAW", size=len(disk), volume_size=1, parts=parts, self_destruct_url=manifest_url
    )
    parts_server.add("/manifest.xml", manifest)
    task_id = appliance.ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": len(disk), "ImportManifestUrl": manifest_url},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]

    def gets(path: str) -> int:
        return sum(1 for r in parts_server.hits(path) if r.method == "GET")

    wait_for(lambda: gets(paths[stalled]) == 1, what="the stalled part to be requested")
    # parts are fetched sources.parallel_ranges (4) at a time and written in order: the two after the
    # stalled one are fetched (held in memory, not written) before the kill
    wait_for(lambda: gets(paths[4]) == 1 and gets(paths[5]) == 1, what="the parts after it to be fetched")
    wait_for(
        lambda: conversion_task(appliance.ec2, task_id)["ImportVolume"]["BytesConverted"] == stalled * MiB,
        what="the parts before the stalled one to be verified and written",
    )
    # kill -9 the task's own process (the worker stays and resumes it when its lease runs out)
    children = appliance.task_processes()
    assert len(children) == 1, children
    os.kill(children[0], signal.SIGKILL)
    appliance.ec2.get_waiter("conversion_task_completed").wait(
        ConversionTaskIds=[task_id], WaiterConfig={"Delay": 1, "MaxAttempts": 120}
    )
    # the verified and written parts were not downloaded again; the interrupted one and those fetched
    # ahead of it but not yet written once more
    assert [gets(p) for p in paths] == [1, 1, 1, 2, 2, 2]
    assert admin_task(appliance, task_id)["task"]["attempts"] == 2  # one run, one resume
    done = conversion_task(appliance.ec2, task_id)["ImportVolume"]
    assert done["BytesConverted"] == len(disk)
    with open(appliance.volume_file(done["Volume"]["Id"]), "rb") as f:
        assert f.read(len(disk)) == disk


def test_ssrf_urls_are_refused_at_the_api(appliance: Appliance) -> None:
    for url in ("http://169.254.169.254/latest/meta-data/", "http://2130706433/m.xml", "http://127.1/m.xml"):
        with pytest.raises(botocore.exceptions.ClientError) as exc:
            appliance.ec2.import_volume(
                AvailabilityZone="us-east-1a",
                Image={"Format": "RAW", "Bytes": 1024, "ImportManifestUrl": url},
                Volume={"Size": 1},
            )
        assert exc.value.response["Error"]["Code"] == "InvalidParameterValue", url
    assert appliance.ec2.describe_conversion_tasks()["ConversionTasks"] == []


def test_aws_cli_imports_an_image_from_a_user_bucket(
    appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    # ImportImage validates the guest: a real bootable Linux disk, not random data
    src = guestfactory.linux_disk(tmp_path)
    vhd = guestfactory.convert(src, tmp_path / "disk.vhd", "vpc", "force_size=on")
    moto.client("s3").upload_file(str(vhd), bucket, "disks/disk.vhd")
    out = aws_ec2(
        appliance.endpoint,
        "import-image",
        "--description",
        "cli",
        "--disk-containers",
        f"Format=VHD,UserBucket={{S3Bucket={bucket},S3Key=disks/disk.vhd}}",
    )
    assert out.returncode == 0, out.stderr
    task_id = json.loads(out.stdout)["ImportTaskId"]

    def status() -> dict[str, Any]:
        r = aws_ec2(
            appliance.endpoint, "describe-import-image-tasks", "--import-task-ids", task_id, check=True
        )
        return json.loads(r.stdout)["ImportImageTasks"][0]

    wait_for(lambda: status()["Status"] in ("completed", "deleted"), what="the image import")
    final = status()
    assert final["Status"] == "completed", final
    assert final["ImageId"] == "ami-" + task_id[-17:]
    assert final["SnapshotDetails"][0]["SnapshotId"] == "snap-" + task_id[-17:]
