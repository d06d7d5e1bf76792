"""Pull mode (Eucalyptus imaging-worker protocol): a real worker process takes work from the reference
controller's Imaging service (its metadata service's credentials, SigV2, download manifests it signs
from the uploaded import manifest), imports from S3 (moto server) and reports
PutInstanceImportTaskStatus."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.report.imaging_service import DM_PATH, ImagingService
from appliance.report.pull import (
    PullReporter,
    PullTasks,
    euca_code,
    parse_cancelled,
    parse_task,
    strip_marker,
)
from appliance.report.receiver import Controller, ReceiverServer
from appliance.sources.euca_manifest import build_download_manifest
from appliance.store import Store, TaskState
from tests import imagefactory as imgs
from tests import processes, stores
from tests.euca_controller import PartServer, make_cloud_key
from tests.euca_upload import presign_manifest_url, random_file, upload
from tests.servers import MotoServer, free_port

# the pull worker polls slowly: waits here are bounded at 90 s
wait_until = functools.partial(processes.wait_until, timeout=90.0)

MiB = 1 << 20
SECRET = "pull-test-secret-0123456789abcdef"
WORKER_ID = "i-0123abcd"


# -- the wire format, no servers ----------------------------------------------------------------


def test_parses_a_volume_task_with_or_without_the_euca_prefix() -> None:
    xml = (
        b'<GetInstanceImportTaskResponse xmlns:euca="http://www.eucalyptus.com/ns/imaging/2014-02-14/">'
        b"<euca:importTaskId>import-vol-abcd1234</euca:importTaskId>"
        b"<euca:importTaskType>import_volume</euca:importTaskType>"
        b"<euca:volumeTask><euca:volumeId>vol-12345678</euca:volumeId><euca:imageManifestSet><euca:item>"
        b"<euca:manifestUrl>http://imaging@os:8773/b/DM-import-vol-abcd1234?Signature=x&amp;Expires=1"
        b"</euca:manifestUrl><euca:format>vmdk</euca:format></euca:item></euca:imageManifestSet>"
        b"</euca:volumeTask></GetInstanceImportTaskResponse>"
    )
    task = parse_task(xml)
    assert task is not None
    assert (task.task_id, task.task_type, task.volume_id, task.format) == (
        "import-vol-abcd1234",
        "import_volume",
        "vol-12345678",
        "VMDK",
    )
    assert (
        strip_marker(task.manifest_url or "")
        == "http://os:8773/b/DM-import-vol-abcd1234?Signature=x&Expires=1"
    )
    assert task.bytes is None and task.volume_size is None


def test_no_work_is_an_empty_reply_or_an_empty_task_id() -> None:
    assert parse_task(b'<GetInstanceImportTaskResponse xmlns="x"/>') is None
    assert (
        parse_task(b"<GetInstanceImportTaskResponse><importTaskId/></GetInstanceImportTaskResponse>") is None
    )


def test_cancelled_reply_shapes() -> None:
    assert parse_cancelled(b"<R><cancelled>true</cancelled></R>") is True
    assert parse_cancelled(b'<R xmlns="n"><cancelled>false</cancelled></R>') is False


def test_error_codes_map_to_the_eucalyptus_failure_codes() -> None:
    assert euca_code("CertificateFailure") == "CertificateFailure"
    assert euca_code("FailureToAttachVolume") == "FailureToAttachVolume"
    assert euca_code("ManifestUnsupported.Bundle") == "InvalidInputData"
    assert euca_code("FormatMismatch") == "InvalidInputData"
    assert euca_code("UnsafeImage.BackingFile") == "InvalidInputData"
    assert euca_code("SourceUnavailable") == "FailureToDownloadData"
    assert euca_code("InsufficientScratch") == "InsufficientDiskSize"
    assert euca_code("SomethingNew") == "GeneralFailure"


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture
def cloud_key(tmp_path: Path) -> tuple[Path, Path]:
    return make_cloud_key(tmp_path)


@pytest.fixture
def controller(tmp_path: Path, cloud_key: tuple[Path, Path]) -> Iterator[ReceiverServer]:
    imaging = ImagingService(cloud_key[0].read_bytes(), instance_id=WORKER_ID)
    server = ReceiverServer(
        f"127.0.0.1:{free_port()}", Controller(SECRET, tmp_path / "controller.jsonl", imaging=imaging)
    )
    yield server.start()
    server.stop()


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    name = "pull-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    moto.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[PartServer, threading.Event]]:
    """A part server that holds every download until the test ends."""
    release = threading.Event()
    disk = random_file(tmp_path / "held.raw", MiB)
    with PartServer(disk, MiB, delay=lambda _index: release.wait(60)) as parts:
        yield parts, release
        release.set()


@pytest.fixture
def cfg_file(
    tmp_path: Path,
    moto: MotoServer,
    controller: ReceiverServer,
    cloud_key: tuple[Path, Path],
    held: tuple[PartServer, threading.Event],
) -> Path:
    f = tmp_path / "imaging.yaml"
    f.write_text(
        json.dumps(
            stores.with_store(
                {
                    "state_dir": str(tmp_path / "state"),
                    "worker": {"concurrency": 1, "poll_interval": 0.2},
                    "tasks": {"lease_seconds": 5},
                    "sources": {
                        "allowed_endpoints": [moto.endpoint, controller.url, held[0].url],
                        "manifest_poll_interval": 0.2,
                        "manifest_poll_max_interval": 0.5,
                        "retries": 2,
                    },
                    "controller": {
                        "mode": "pull",
                        "url": controller.url,
                        "metadata_url": controller.url,
                        "cloud_cert_file": str(cloud_key[1]),
                        "report_interval": 0.5,
                        "timeout": 5,
                        "max_backoff": 1,
                    },
                }
            )
        )
    )
    return f


@pytest.fixture
def worker(cfg_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "--config", str(cfg_file), "worker"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield proc
    processes.stop_process(proc, grace=30)


def statuses(tmp_path: Path, task_id: str) -> list[dict]:
    log = tmp_path / "controller.jsonl"
    if not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [
        r["pull_status"]
        for r in records
        if "pull_status" in r and r["pull_status"]["ImportTaskId"] == task_id
    ]


def final(tmp_path: Path, task_id: str) -> dict | None:
    return next((s for s in statuses(tmp_path, task_id) if s["Status"] in ("DONE", "FAILED")), None)


def uploaded(moto: MotoServer, bucket: str, disk: Path) -> str:
    """The presigned URL of ``disk``'s import manifest, uploaded as euca2ools does."""
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, disk)
    upload(s3, pending, disk)
    return pending.url


@pytest.mark.slow
def test_pulled_raw_import_reports_done_with_bytes_converted_and_volume(
    controller: ReceiverServer,
    worker: subprocess.Popen[bytes],
    moto: MotoServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    disk = random_file(tmp_path / "disk.raw", 12 * MiB)
    # As Eucalyptus: a signed download manifest made from the import manifest, sizes from it.
    controller.controller.queue_pull_task(
        {
            "importTaskId": "import-vol-abcd1234",
            "volumeId": "vol-12345678",
            "importManifestUrl": uploaded(moto, bucket, disk),
            "format": "RAW",
        }
    )
    wait_until(lambda: final(tmp_path, "import-vol-abcd1234") is not None, what="the final status")
    done = final(tmp_path, "import-vol-abcd1234")
    assert done is not None
    assert done["Status"] == "DONE", done
    assert done["InstanceId"] == WORKER_ID
    assert done["BytesConverted"] == disk.stat().st_size
    assert done["VolumeId"] == "vol-12345678"  # the cloud's volume, which its status is matched to
    extant = [s for s in statuses(tmp_path, "import-vol-abcd1234") if s["Status"] == "EXTANT"]
    assert all(s["VolumeId"] == "vol-12345678" for s in extant)
    assert controller.controller.imaging is not None
    assert controller.controller.imaging.volumes("import-vol-abcd1234")["vol-12345678"]["status"] == "DONE"
    # the file volume target cannot reach the cloud's volume: it wrote a volume of its own
    volume = next((tmp_path / "state" / "volumes").glob("vol-*"))
    with open(volume, "rb") as f:
        assert f.read(disk.stat().st_size) == disk.read_bytes()


@pytest.mark.slow
def test_pulled_hostile_image_reports_failed_with_an_error_code(
    controller: ReceiverServer,
    worker: subprocess.Popen[bytes],
    moto: MotoServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    hostile = imgs.qcow2_backing(tmp_path)  # a qcow2 pointing at /etc/passwd, claimed RAW
    controller.controller.queue_pull_task(
        {
            "importTaskId": "import-vol-bad00001",
            "volumeId": "vol-87654321",
            "importManifestUrl": uploaded(moto, bucket, hostile),
            "format": "RAW",
        }
    )
    wait_until(lambda: final(tmp_path, "import-vol-bad00001") is not None, what="the final status")
    failed = final(tmp_path, "import-vol-bad00001")
    assert failed is not None and failed["Status"] == "FAILED"
    assert failed["ErrorCode"] == "InvalidInputData"
    assert failed["Message"].startswith("FormatMismatch: ") and "qcow2" in failed["Message"]


@pytest.mark.slow
def test_cancelled_reply_cancels_the_pulled_task_and_ends_its_reports(
    held: tuple[PartServer, threading.Event],
    controller: ReceiverServer,
    worker: subprocess.Popen[bytes],
    cfg_file: Path,
    moto: MotoServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    parts = held[0]  # holds the download until the test ends: the task is still running when cancelled
    imaging = controller.controller.imaging
    assert imaging is not None
    imaging.manifests["DM-held"] = build_download_manifest("RAW", MiB, parts.urls(), imaging.sign)
    controller.controller.queue_pull_task(
        {
            "importTaskId": "import-vol-cccc0001",
            "volumeId": "vol-11112222",
            "manifestUrl": controller.url.replace("//", "//imaging@") + DM_PATH + "DM-held",
            "format": "RAW",
        }
    )
    wait_until(lambda: len(statuses(tmp_path, "import-vol-cccc0001")) >= 1, what="an EXTANT status")
    # the one-byte length probe, then the download the part server holds
    wait_until(lambda: len(parts.requests) >= 2, what="the held download")
    controller.controller.cancel_pull_task("import-vol-cccc0001")
    store = Store(config_mod.load(cfg_file).store)
    held = PullTasks(store.settings)
    try:
        pulled = store.list_tasks(kind="import-volume")
        assert len(pulled) == 1
        wait_until(lambda: store.get_task(pulled[0].id).state is TaskState.CANCELLED, what="the cancel")
        task = store.get_task(pulled[0].id)
        row = held.get("import-vol-cccc0001")
    finally:
        held.close()
        store.close()
    assert task.cancel_reason == "cancelled by the controller"
    assert row is not None and row["task_id"] == task.id and row["state"] == "cancelled"
    reported = statuses(tmp_path, "import-vol-cccc0001")
    assert {s["Status"] for s in reported} == {"EXTANT"}  # nothing after the cancel, as Eucalyptus


@pytest.fixture
def reporter(cfg_file: Path) -> Iterator[PullReporter]:
    cfg = config_mod.load(cfg_file)
    store = Store(cfg.store)
    pull = PullReporter(cfg, store)  # driven by hand with poll()/report(), not started
    yield pull
    pull.stop()
    store.close()


def test_a_task_handed_out_again_is_not_created_twice(
    controller: ReceiverServer, reporter: PullReporter, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    task = {
        "importTaskId": "import-vol-dddd0001",
        "volumeId": "vol-1",
        "importManifestUrl": uploaded(moto, bucket, random_file(tmp_path / "d.raw", MiB)),
        "format": "RAW",
    }
    controller.controller.queue_pull_task(task)
    controller.controller.queue_pull_task(task)  # Eucalyptus re-queues when it thinks the worker restarted
    first = reporter.poll()
    assert first is not None and first.startswith("import-vol-")
    assert reporter.poll() == first
    assert [t.id for t in reporter.store.list_tasks(kind="import-volume")] == [first]
    assert reporter.poll() is None  # the queue is empty


def test_a_task_that_cannot_be_taken_is_reported_failed_at_once(
    controller: ReceiverServer, reporter: PullReporter, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    controller.controller.queue_pull_task(
        {
            "importTaskId": "import-vol-eeee0001",
            "volumeId": "vol-2",
            "importManifestUrl": uploaded(moto, bucket, random_file(tmp_path / "e.raw", MiB)),
            "format": "QCOW2",
        }
    )
    assert reporter.poll() is None
    [failed] = statuses(tmp_path, "import-vol-eeee0001")
    assert (failed["Status"], failed["ErrorCode"]) == ("FAILED", "InvalidInputData")
    assert "QCOW2" in failed["Message"]
    assert reporter.store.list_tasks(kind="import-volume") == []
