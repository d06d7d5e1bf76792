"""A real import through the booted appliance: boto3 ImportVolume against the forwarded API port,
the parts on the host's moto S3 (reached by the guest through qemu's guestfwd), to completion."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest

from appliance.report.messages import encode, headers
from tests.euca_upload import presign_manifest_url, random_file, upload
from tests.image.conftest import APPLIANCE_ID, CONTROLLER_SECRET, Controller, s3_forward
from tests.image.vm import Vm
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1800)]
MiB = 2**20


class SplitS3:
    """Presigns for the guest's view of S3 (``http://10.0.2.100:PORT``) and uploads through the host's
    (``http://127.0.0.1:PORT``): the same moto server under two names."""

    def __init__(self, guest: Any, host: Any) -> None:
        self._guest, self._host = guest, host

    def generate_presigned_url(self, *args: Any, **kwargs: Any) -> str:
        return self._guest.generate_presigned_url(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


def _s3(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def test_import_volume_through_the_booted_appliance_writes_the_source_bytes(
    appliance_vm: Vm, moto: MotoServer, controller: Controller, tmp_path: Path
) -> None:
    bucket = "appliance-image-import"
    moto.client("s3").create_bucket(Bucket=bucket)
    s3 = SplitS3(_s3(s3_forward(moto).guest_url), moto.client("s3"))
    disk = random_file(tmp_path / "disk.raw", 24 * MiB, seed=4)
    pending = presign_manifest_url(s3, bucket, "appliance", disk)
    upload(s3, pending, disk, part_size=5 * MiB)

    ec2 = boto3.client(
        "ec2",
        endpoint_url=appliance_vm.api_url,
        region_name=REGION,
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=TEST_SECRET_KEY,
    )
    task = ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": disk.stat().st_size, "ImportManifestUrl": pending.url},
        Volume={"Size": 1},
    )["ConversionTask"]
    task_id = task["ConversionTaskId"]

    deadline = time.monotonic() + 600
    while True:
        t = ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"][0]
        if t["State"] in ("completed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert t["State"] == "completed", t
    done = t["ImportVolume"]
    assert done["BytesConverted"] == disk.stat().st_size

    # The volume target is a sparse RAW file in the guest: the source bytes, then zeros to 1 GiB.
    volume = f"/var/lib/imaging/volumes/{done['Volume']['Id']}.raw"
    size = disk.stat().st_size
    out = appliance_vm.ssh(
        f"stat -c %s {volume} && head -c {size} {volume} | sha256sum"
        f" && tail -c +{size + 1} {volume} | tr -d '\\000' | wc -c",
        timeout=300,
    ).stdout.split()
    assert int(out[0]) == 2**30
    assert out[1] == hashlib.sha256(disk.read_bytes()).hexdigest()
    assert out[-1] == "0", "bytes after the image are not zero"

    # The controller heard every state change of the task, signed, in order, with increasing seq.
    states = _reported_states(controller, task_id)
    assert states == ["pending", "running", "completed"], states
    _assert_forged_and_replayed_reports_are_refused(controller)


def _reported(controller: Controller) -> list[dict[str, Any]]:
    # the receiver logs each verified report as {"message": ..., "received_at": ...}
    return [json.loads(line)["message"] for line in controller.log.read_text().splitlines() if line.strip()]


def _reported_states(controller: Controller, task_id: str, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        messages = [m for m in _reported(controller) if m.get("appliance_id") == APPLIANCE_ID]
        seqs = [m["seq"] for m in messages]
        assert seqs == sorted(set(seqs)), "the controller logged reports out of order or twice"
        states = [
            m["task"]["state"]
            for m in messages
            if m.get("type") == "task" and m.get("event") == "state" and m["task"].get("id") == task_id
        ]
        if (states and states[-1] == "completed") or time.monotonic() > deadline:
            return states
        time.sleep(1)


def _assert_forged_and_replayed_reports_are_refused(controller: Controller) -> None:
    url = f"http://127.0.0.1:{controller.forward.host_port}/v1/reports"
    last = max(m["seq"] for m in _reported(controller) if m.get("appliance_id") == APPLIANCE_ID)
    body = encode(APPLIANCE_ID, last + 1000, {"type": "heartbeat", "health": "ok"})
    forged = headers("not-the-shared-secret-0123456789", APPLIANCE_ID, body, "application/json")
    replayed_body = encode(APPLIANCE_ID, last, {"type": "heartbeat", "health": "ok"})
    replayed = headers(CONTROLLER_SECRET, APPLIANCE_ID, replayed_body, "application/json")
    for data, hdrs, status in ((body, forged, 401), (replayed_body, replayed, 409)):
        req = urllib.request.Request(url, data=data, headers=hdrs, method="POST")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=10)
        assert exc.value.code == status
