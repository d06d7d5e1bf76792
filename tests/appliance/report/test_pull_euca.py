"""Pull mode against an independent Eucalyptus cloud (tests/euca_controller.py: its own SigV2 check, its own
metadata service and openssl-signed download manifests, nothing shared with the appliance): a real worker
process takes the tasks, verifies the manifests, downloads the parts and reports."""

from __future__ import annotations

import datetime
import functools
import json
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from appliance.report.euca_auth import InstanceCredentials, sign_request
from tests import imagefactory as imgs
from tests import processes
from tests.appliance.targets.test_device import loop_device
from tests.appliance.targets.test_ec2 import FakeHypervisor
from tests.euca_controller import EucaCloud, PartServer, download_manifest, make_cloud_key, sigv2
from tests.euca_upload import random_file
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY

wait_until = functools.partial(processes.wait_until, timeout=90.0)

MiB = 1 << 20
PART = 2 * MiB


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return make_cloud_key(tmp_path)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return random_file(tmp_path / "disk.raw", 5 * MiB)


def start_worker(
    tmp_path: Path,
    cloud: EucaCloud,
    parts: PartServer,
    cert: Path,
    *,
    targets: dict | None = None,
    extra=(),
    signature_version: str = "2",
    config: dict | None = None,
) -> subprocess.Popen[bytes]:
    cfg = tmp_path / "imaging.yaml"
    cfg.write_text(
        json.dumps(
            {
                "state_dir": str(tmp_path / "state"),
                "worker": {"concurrency": 1, "poll_interval": 0.2},
                "tasks": {"lease_seconds": 5},
                "sources": {"allowed_endpoints": [cloud.url, parts.url, *extra], "retries": 1},
                **({"targets": targets} if targets else {}),
                "controller": {
                    "mode": "pull",
                    "url": cloud.url,
                    "metadata_url": cloud.url,
                    "cloud_cert_file": str(cert),
                    "signature_version": signature_version,
                    "report_interval": 0.5,
                    "timeout": 5,
                    "max_backoff": 1,
                },
                **(config or {}),
            }
        )
    )
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - the process holds it
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "--config", str(cfg), "worker"], stdout=log, stderr=log
    )


@pytest.fixture
def run(tmp_path: Path, keys: tuple[Path, Path], source: Path) -> Iterator:
    """``run(cloud_options, delay)`` → (cloud, parts) with a worker pulling from them."""
    stack: list = []

    def start(delay=None, signature_version="2", serve=None, **cloud_options) -> tuple[EucaCloud, PartServer]:
        cloud = EucaCloud(keys[0], **cloud_options).__enter__()
        parts = PartServer(serve or source, PART, delay=delay).__enter__()
        stack.extend([parts, cloud])
        stack.append(start_worker(tmp_path, cloud, parts, keys[1], signature_version=signature_version))
        return cloud, parts

    yield start
    for item in reversed(stack):
        if isinstance(item, subprocess.Popen):
            processes.stop_process(item, grace=30)
        else:
            item.__exit__(None, None, None)


def volume_bytes(tmp_path: Path, size: int) -> bytes:
    [volume] = list((tmp_path / "state" / "volumes").glob("vol-*"))
    with open(volume, "rb") as f:
        return f.read(size)


@pytest.mark.slow
@pytest.mark.parametrize("signature_version", ["2", "4"])
def test_a_signed_download_manifest_imports_the_source_bytes(
    run, keys, source: Path, tmp_path: Path, signature_version: str
) -> None:
    cloud, parts = run(signature_version=signature_version)
    doc, _ = download_manifest(keys[0], "RAW", source.stat().st_size, parts.urls())
    cloud.add_volume_task("import-vol-aaaa0001", "vol-0a0a0a0a", "RAW", doc)
    wait_until(lambda: cloud.final("import-vol-aaaa0001", "vol-0a0a0a0a") is not None, what="DONE")
    done = cloud.final("import-vol-aaaa0001", "vol-0a0a0a0a")
    assert done is not None and done["Status"] == "DONE", done
    assert done["InstanceId"] == cloud.instance_id
    assert int(done["BytesConverted"]) == source.stat().st_size
    assert volume_bytes(tmp_path, source.stat().st_size) == source.read_bytes()
    assert cloud.refusals == []
    logged = (tmp_path / "worker.log").read_text()
    assert "DONE" in logged or "completed" in logged  # the log is the worker's
    for cred in cloud.creds.values():  # no secret key or token in the worker's log
        assert cred["secret"] not in logged and cred["token"] not in logged


@pytest.mark.slow
def test_a_vmdk_upload_is_converted_though_the_manifest_says_raw_as_the_cloud_writes_it(
    run, keys, source: Path, tmp_path: Path
) -> None:
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            source,
            vmdk,
        ],
        check=True,
    )
    cloud, parts = run(serve=vmdk)
    # the cloud writes file-format RAW into every import's download manifest; the task says VMDK
    doc, _ = download_manifest(keys[0], "RAW", vmdk.stat().st_size, parts.urls())
    cloud.add_volume_task("import-vol-aaaa0002", "vol-0a0a0a02", "VMDK", doc)
    wait_until(lambda: cloud.final("import-vol-aaaa0002", "vol-0a0a0a02") is not None, what="DONE")
    done = cloud.final("import-vol-aaaa0002", "vol-0a0a0a02")
    assert done is not None and done["Status"] == "DONE", done
    assert volume_bytes(tmp_path, source.stat().st_size) == source.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["unsigned", "tampered"])
def test_an_unsigned_or_tampered_manifest_fails_with_certificate_failure_before_any_part_is_fetched(
    run, keys, source: Path, tmp_path: Path, how: str
) -> None:
    cloud, parts = run()
    doc, _ = download_manifest(
        None if how == "unsigned" else keys[0], "RAW", source.stat().st_size, parts.urls()
    )
    if how == "tampered":  # one part's URL swapped for another server's
        doc = doc.replace(b"/part/1?", b"/part/0?")
    cloud.add_volume_task("import-vol-bbbb0001", "vol-0b0b0b0b", "RAW", doc)
    wait_until(lambda: cloud.final("import-vol-bbbb0001", "vol-0b0b0b0b") is not None, what="FAILED")
    failed = cloud.final("import-vol-bbbb0001", "vol-0b0b0b0b")
    assert failed is not None
    assert (failed["Status"], failed["ErrorCode"]) == ("FAILED", "CertificateFailure")
    assert failed["Message"].startswith("CertificateFailure: ")
    assert parts.requests == []


def slow_parts(index: int) -> None:
    time.sleep(1.5)  # each part takes a while: several statuses go out per part


@pytest.mark.slow
def test_credentials_about_to_expire_are_read_again_mid_task(run, keys, source: Path) -> None:
    # declared to expire 302 s after minting: within boto's 5-minute margin 2 s later, so read again
    cloud, parts = run(delay=slow_parts, declared_lifetime=302)
    doc, _ = download_manifest(keys[0], "RAW", source.stat().st_size, parts.urls())
    cloud.add_volume_task("import-vol-cccc0001", "vol-0c0c0c0c", "RAW", doc)
    wait_until(lambda: cloud.final("import-vol-cccc0001", "vol-0c0c0c0c") is not None, what="DONE")
    done = cloud.final("import-vol-cccc0001", "vol-0c0c0c0c")
    assert done is not None and done["Status"] == "DONE", done
    keys_of_task = {s["AWSAccessKeyId"] for s in cloud.statuses if s["ImportTaskId"] == "import-vol-cccc0001"}
    assert len(keys_of_task) >= 2 and cloud.refusals == []  # read again before the cloud refused any


@pytest.mark.slow
def test_credentials_the_cloud_ends_early_are_read_again_when_refused(run, keys, source: Path) -> None:
    holder: dict[str, EucaCloud] = {}
    revoked = threading.Event()

    def revoke_at_part_one(index: int) -> None:
        slow_parts(index)
        if index == 1 and not revoked.is_set():
            revoked.set()
            holder["cloud"].expire_all()  # their Expiration is an hour away: only the refusal tells

    cloud, parts = run(delay=revoke_at_part_one, declared_lifetime=3600)
    holder["cloud"] = cloud
    doc, _ = download_manifest(keys[0], "RAW", source.stat().st_size, parts.urls())
    cloud.add_volume_task("import-vol-cccc0002", "vol-0c0c0c02", "RAW", doc)
    wait_until(lambda: cloud.final("import-vol-cccc0002", "vol-0c0c0c02") is not None, what="DONE")
    done = cloud.final("import-vol-cccc0002", "vol-0c0c0c02")
    assert done is not None and done["Status"] == "DONE", done
    assert revoked.is_set() and "ExpiredToken" in cloud.refusals
    keys_of_task = [s["AWSAccessKeyId"] for s in cloud.statuses if s["ImportTaskId"] == "import-vol-cccc0002"]
    assert keys_of_task[-1] != keys_of_task[0]


@pytest.mark.slow
def test_requests_signed_with_the_wrong_secret_are_refused_and_no_task_is_taken(
    run, keys, source: Path
) -> None:
    cloud, parts = run()
    cloud.service_secret = lambda key: "not-the-secret-the-metadata-handed-out"
    doc, _ = download_manifest(keys[0], "RAW", source.stat().st_size, parts.urls())
    cloud.add_volume_task("import-vol-dddd0001", "vol-0d0d0d0d", "RAW", doc)
    wait_until(lambda: cloud.refusals.count("SignatureDoesNotMatch") >= 4, what="refusals")
    assert cloud.queue and cloud.statuses == [] and parts.requests == []


@pytest.mark.slow
def test_import_instance_volumes_are_separate_worker_tasks_with_their_own_bytes(
    run, keys, source: Path
) -> None:
    cloud, parts = run()
    size = source.stat().st_size
    first, _ = download_manifest(keys[0], "RAW", size, parts.urls())
    second, _ = download_manifest(keys[0], "RAW", PART, parts.urls()[:1])
    cloud.add_volume_task("import-i-eeee0001", "vol-0e0e0e01", "RAW", first)
    cloud.add_volume_task("import-i-eeee0001", "vol-0e0e0e02", "RAW", second)
    for volume in ("vol-0e0e0e01", "vol-0e0e0e02"):
        wait_until(lambda v=volume: cloud.final("import-i-eeee0001", v) is not None, what=f"DONE of {volume}")
    a, b = cloud.final("import-i-eeee0001", "vol-0e0e0e01"), cloud.final("import-i-eeee0001", "vol-0e0e0e02")
    assert a is not None and b is not None
    assert (a["Status"], int(a["BytesConverted"])) == ("DONE", size)
    assert (b["Status"], int(b["BytesConverted"])) == ("DONE", PART)


@pytest.mark.slow
def test_a_convert_image_task_is_refused_with_the_eucalyptus_code(run) -> None:
    cloud, _ = run()
    cloud.add_convert_image_task("import-emi-ffff0001")
    wait_until(lambda: any(s["ImportTaskId"] == "import-emi-ffff0001" for s in cloud.statuses), what="FAILED")
    [failed] = [s for s in cloud.statuses if s["ImportTaskId"] == "import-emi-ffff0001"]
    assert (failed["Status"], failed["ErrorCode"]) == ("FAILED", "GeneralFailure")
    assert "convert_image" in failed["Message"]


# -- signing and credentials, no worker ------------------------------------------------------------


def test_the_workers_sigv2_signature_is_what_the_independent_check_computes(keys) -> None:
    with EucaCloud(keys[0]) as cloud:
        creds = InstanceCredentials(cloud.url).get()
        url = cloud.url + "/services/Imaging"
        params = {"Action": "GetInstanceImportTask", "Version": "2014-02-14", "InstanceId": "i-1 +*~"}
        body, _ = sign_request(url, params, creds)
        form = dict(urllib.parse.parse_qsl(body.decode()))
        assert form["SecurityToken"] == creds.token and form["AWSAccessKeyId"] == creds.access_key
        host = url.split("/")[2]
        assert (
            sigv2(cloud.creds[creds.access_key]["secret"], host, "/services/Imaging", form)
            == form["Signature"]
        )
        assert cloud.imaging(host, "/services/Imaging", body)[0] == 200
        tampered = body.replace(b"InstanceId=i-1", b"InstanceId=i-2")
        assert cloud.imaging(host, "/services/Imaging", tampered)[0] == 403
        assert cloud.refusals == ["SignatureDoesNotMatch"]


def test_the_workers_sigv4_signature_is_what_the_independent_check_computes(keys) -> None:
    with EucaCloud(keys[0]) as cloud:
        creds = InstanceCredentials(cloud.url).get()
        url = cloud.url + "/services/Imaging"
        params = {"Action": "GetInstanceImportTask", "Version": "2014-02-14", "InstanceId": "i-1"}
        body, headers = sign_request(url, params, creds, signature_version="4", region="cloud")
        assert headers["X-Amz-Security-Token"] == creds.token and "SecurityToken" not in body.decode()
        host = url.split("/")[2]
        assert cloud.imaging(host, "/services/Imaging", body, Caseless(headers, host=host))[0] == 200
        tampered = body.replace(b"InstanceId=i-1", b"InstanceId=i-2")
        assert cloud.imaging(host, "/services/Imaging", tampered, Caseless(headers, host=host))[0] == 403
        other = Caseless(headers, host=host, **{"X-Amz-Security-Token": "another-token"})
        assert cloud.imaging(host, "/services/Imaging", body, other)[0] == 403
        assert cloud.refusals == ["SignatureDoesNotMatch", "AuthFailure"]


class Caseless(dict):
    """Request headers as a server reads them: names compared without case."""

    def __init__(self, headers: dict[str, str], **more: str) -> None:
        super().__init__({k.lower(): v for k, v in {**headers, **more}.items()})

    def get(self, name: str, default=None):  # type: ignore[override]
        return super().get(name.lower(), default)


def test_credentials_are_read_again_within_five_minutes_of_expiration(keys) -> None:
    with EucaCloud(keys[0], declared_lifetime=3600) as cloud:
        provider = InstanceCredentials(cloud.url)
        first = provider.get()
        assert provider.get() == first
        later = first.expiration - datetime.timedelta(seconds=299)
        second = provider.get(now=later)
        assert second.access_key != first.access_key
        assert provider.refresh().access_key not in (first.access_key, second.access_key)
        assert provider.instance_id() == cloud.instance_id
        assert first.secret_key not in repr(first) and first.token not in repr(first)


# -- the cloud's own volume, attached through its EC2 API (moto) and found by serial ----------------


@pytest.mark.slow
def test_the_named_volume_is_attached_written_and_handed_back_and_never_deleted_on_failure(
    moto, keys, source: Path, tmp_path: Path
) -> None:
    ec2 = moto.client("ec2")
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    inst = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro")["Instances"][
        0
    ]
    zone = inst["Placement"]["AvailabilityZone"]
    # what the cloud's backend does before handing a task out: create the volumes
    good, bad = (ec2.create_volume(Size=1, AvailabilityZone=zone)["VolumeId"] for _ in range(2))
    device_dir = tmp_path / "by-id"
    device_dir.mkdir()
    hostile = imgs.qcow2_backing(tmp_path)  # a qcow2 claimed RAW: refused after it was written
    targets = {
        "volume": {
            "type": "ec2",
            "endpoint_url": moto.endpoint,
            "region": REGION,
            "access_key": TEST_ACCESS_KEY,
            "secret_key": TEST_SECRET_KEY,
            "instance_id": inst["InstanceId"],
            "device_dir": str(device_dir),
            "poll_interval": 0.05,
            "wait_timeout": 20,
            "device_timeout": 20,
        }
    }
    with ExitStack() as stack:
        loops = [stack.enter_context(loop_device(tmp_path / f"disk{i}.img", 8 * MiB)) for i in range(2)]
        stack.enter_context(FakeHypervisor(ec2, inst["InstanceId"], device_dir, loops))
        cloud = stack.enter_context(EucaCloud(keys[0], instance_id=inst["InstanceId"]))
        parts = stack.enter_context(PartServer(source, PART))
        bad_parts = stack.enter_context(PartServer(hostile, PART))
        worker = start_worker(tmp_path, cloud, parts, keys[1], targets=targets, extra=[bad_parts.url])
        stack.callback(processes.stop_process, worker, grace=30)
        doc, _ = download_manifest(keys[0], "RAW", hostile.stat().st_size, bad_parts.urls())
        cloud.add_volume_task("import-vol-0bad0001", bad, "RAW", doc)
        doc, _ = download_manifest(keys[0], "RAW", source.stat().st_size, parts.urls())
        cloud.add_volume_task("import-vol-00ok0001", good, "RAW", doc)
        wait_until(lambda: cloud.final("import-vol-00ok0001", good) is not None, what="DONE")
        failed, done = cloud.final("import-vol-0bad0001", bad), cloud.final("import-vol-00ok0001", good)
        assert failed is not None and (failed["Status"], failed["ErrorCode"]) == (
            "FAILED",
            "InvalidInputData",
        )
        assert done is not None and done["Status"] == "DONE", done
        volumes = {v["VolumeId"]: v for v in ec2.describe_volumes(VolumeIds=[good, bad])["Volumes"]}
        assert {v["State"] for v in volumes.values()} == {"available"}  # both handed back, none deleted
        assert all(not v.get("Attachments") for v in volumes.values())
        written = [
            p.read_bytes()[: source.stat().st_size] for p in (tmp_path / "disk0.img", tmp_path / "disk1.img")
        ]
        assert source.read_bytes() in written
    ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])
