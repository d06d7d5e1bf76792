"""Client side of a real import through a booted appliance: upload the parts to the host's moto S3
(presigned for the guest's view of it), run boto3 ``ImportVolume`` against the forwarded API port,
wait for the task to end, read the written volume back."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3

from tests.euca_upload import presign_manifest_url, upload
from tests.image.conftest import s3_forward
from tests.image.vm import Vm
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer

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


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client of the moto server at ``endpoint``."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def ec2_client(vm: Vm) -> Any:
    """A boto3 EC2 client of the appliance's API (the test credentials of the user data)."""
    return boto3.client(
        "ec2",
        endpoint_url=vm.api_url,
        region_name=REGION,
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=TEST_SECRET_KEY,
    )


def import_volume(vm: Vm, moto: MotoServer, bucket: str, disk: Path, timeout: float = 600) -> dict[str, Any]:
    """Upload ``disk`` (RAW) to ``bucket`` and import it with ``ImportVolume`` (a 1 GiB volume); return
    the conversion task as ``DescribeConversionTasks`` last showed it (completed, cancelled, or
    still running at ``timeout``)."""
    moto.client("s3").create_bucket(Bucket=bucket)
    s3 = SplitS3(s3_client(s3_forward(moto).guest_url), moto.client("s3"))
    pending = presign_manifest_url(s3, bucket, "appliance", disk)
    upload(s3, pending, disk, part_size=5 * MiB)
    ec2 = ec2_client(vm)
    task = ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": disk.stat().st_size, "ImportManifestUrl": pending.url},
        Volume={"Size": 1},
    )["ConversionTask"]
    deadline = time.monotonic() + timeout
    while True:
        t = ec2.describe_conversion_tasks(ConversionTaskIds=[task["ConversionTaskId"]])["ConversionTasks"][0]
        if t["State"] in ("completed", "cancelled") or time.monotonic() > deadline:
            return t
        time.sleep(2)


def volume_path(task: dict[str, Any]) -> str:
    """Where the appliance's ``file`` volume target keeps the task's volume (a sparse RAW file)."""
    return f"/var/lib/imaging/volumes/{task['ImportVolume']['Volume']['Id']}.raw"


def read_back(vm: Vm, guest_path: str, size: int, dst: Path) -> Path:
    """The first ``size`` bytes of ``guest_path`` in the VM, copied to ``dst`` on the host over SSH."""
    with dst.open("wb") as out:
        subprocess.run(
            ["ssh", "-F", str(vm.ssh_config), "appliance", f"head -c {size} {guest_path}"],
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=300,
            check=True,
        )
    return dst


def admin_json(vm: Vm, path: str) -> Any:
    """GET ``path`` on the appliance's admin API with HTTP Basic auth (the test credentials)."""
    token = base64.b64encode(f"{TEST_ACCESS_KEY}:{TEST_SECRET_KEY}".encode()).decode()
    req = urllib.request.Request(vm.api_url + path, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())
