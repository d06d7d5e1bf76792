"""Import tasks end to end inside the toolkit: ImportService → workflow → S3 (moto server) → volume/image.

The HTTP API is tested on top of this in tests/api; here the service and the engine run in-process.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.errors import InvalidTaskId, ResourceLimitExceeded, TaskNotFound, UsageError
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer, DiskImage
from appliance.service.importviews import outcome
from appliance.sources.urlfilter import UrlNotAllowed
from appliance.store import Task, TaskState
from appliance.workflow.engine import Engine
from tests import imagefactory as imgs
from tests import stores
from tests.euca_upload import presign_manifest_url, random_file, upload
from tests.mounts import tmpfs
from tests.processes import wait_until
from tests.servers import MotoServer
from tests.taskrun import run

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    name = "imp-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    moto.client("s3").create_bucket(Bucket=name)
    return name


def cfg_data(tmp_path: Path, moto: MotoServer) -> dict[str, Any]:
    return {
        "state_dir": str(tmp_path / "state"),
        "sources": {
            "allowed_endpoints": [moto.endpoint],
            "manifest_poll_interval": 0.2,
            "manifest_poll_max_interval": 0.5,
            "retries": 2,
            "s3": {
                "endpoint_url": moto.endpoint,
                "region": "us-east-1",
                "access_key": "testing",
                "secret_key": "testing",
            },
        },
        "tasks": {"max_active": 3},
    }


@pytest.fixture
def cfg(tmp_path: Path, moto: MotoServer) -> config_mod.Config:
    return stores.config(cfg_data(tmp_path, moto), base_dir=tmp_path)


@pytest.fixture
def service(cfg: config_mod.Config) -> Iterator[ImportService]:
    svc = ImportService(cfg)
    yield svc
    svc.store.close()


def run_in_thread(cfg: config_mod.Config, task: Task) -> tuple[threading.Thread, list[Task]]:
    out: list[Task] = []
    t = threading.Thread(target=lambda: out.append(run(cfg, task)), daemon=True)
    t.start()
    return t, out


def volume_path(task: Task) -> Path:
    vol = task.result.get("volume") or task.result["imported"]["volume"]
    return Path(vol["path"])


def test_raw_upload_created_before_the_task_streams_onto_the_volume(
    service: ImportService, cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = random_file(tmp_path / "disk.raw", 25 * MiB)
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, "uploads", disk)
    task = service.import_volume(
        DiskImage("RAW", disk.stat().st_size, pending.url, 1), availability_zone="us-east-1a", description="d"
    )
    assert task.id.startswith("import-vol-") and task.state is TaskState.PENDING
    thread, out = run_in_thread(cfg, task)
    # euca2ools creates the task first and uploads afterwards: the task waits for the manifest.
    wait_until(
        lambda: service.store.get_task(task.id).phase == "pending-upload",
        what="the task to wait for its upload",
    )
    waiting = service.store.get_task(task.id)
    assert waiting.state is TaskState.RUNNING and waiting.phase == "pending-upload"
    upload(s3, pending, disk)
    thread.join(timeout=120)
    done = out[0]
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    path = volume_path(done)
    assert path.stat().st_size == GiB  # the volume's size, not the image's
    with open(path, "rb") as f:
        assert f.read(disk.stat().st_size) == disk.read_bytes()
    assert done.bytes_converted == disk.stat().st_size
    assert done.result["written"]["streamed"] is True


def test_raw_upload_of_a_bare_ntfs_volume_streams_onto_the_volume(
    service: ImportService, cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    # a partition image: its boot sector ends in 55 AA like an MBR, with boot code where the entries would be
    disk = imgs.ntfs_volume(tmp_path, "ntfs.raw", windows_boot_code=True)
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, disk)
    upload(s3, pending, disk)
    task = service.import_volume(
        DiskImage("RAW", disk.stat().st_size, pending.url, 1), availability_zone=None, description=None
    )
    done = run(cfg, task)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.result["written"]["streamed"] is True
    with open(volume_path(done), "rb") as f:
        assert f.read(disk.stat().st_size) == disk.read_bytes()


def test_raw_upload_with_an_invalid_partition_table_fails_and_removes_the_volume(
    service: ImportService, cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    hostile = imgs.mbr_claiming_ntfs(tmp_path)  # "NTFS" after a jump, no NTFS, a bad boot flag
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, hostile)
    upload(s3, pending, hostile)
    task = service.import_volume(
        DiskImage("RAW", hostile.stat().st_size, pending.url, 1), availability_zone=None, description=None
    )
    done = run(cfg, task)
    assert done.state is TaskState.FAILED
    assert done.error_code == "UnsafeImage.PartitionTable"
    assert list(cfg.targets["volume"]["directory"].glob("vol-*")) == []


def test_sparse_vmdk_upload_is_converted_onto_the_volume_through_scratch(
    service: ImportService, cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    # monolithicSparse is random access (a stream-optimized VMDK streams: tests/appliance/steps)
    src = imgs.qcow2_with_data(tmp_path)
    vmdk = imgs.convert(src, tmp_path / "disk.vmdk", "vmdk", "subformat=monolithicSparse")
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, vmdk)
    upload(s3, pending, vmdk, file_format="VMDK", part_size=5 * MiB)
    virtual = imgs.virtual_size(vmdk)
    task = service.import_volume(
        DiskImage("VMDK", virtual, pending.url, 1), availability_zone=None, description=None
    )
    done = run(cfg, task)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    path = volume_path(done)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), str(path)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout
    assert done.bytes_converted == virtual
    assert done.result["written"]["streamed"] is False
    assert not (cfg.scratch.root / task.id).exists()  # scratch removed on success


def test_raw_claim_for_a_qcow2_upload_fails_and_removes_the_volume(
    service: ImportService, cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    hostile = imgs.qcow2_backing(tmp_path)  # a qcow2 pointing at /etc/passwd, claimed RAW
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, hostile)
    upload(s3, pending, hostile)
    task = service.import_volume(
        DiskImage("RAW", hostile.stat().st_size, pending.url, 1), availability_zone=None, description=None
    )
    done = run(cfg, task)
    assert done.state is TaskState.FAILED
    assert done.error_code == "FormatMismatch"
    assert "claimed RAW, detected qcow2" in done.error_message
    ledger = [(e.action, e.resource) for e in service.store.ledger(task.id)]
    created = [r for a, r in ledger if a == "created" and r.startswith("volume ")]
    assert created and ("removed", created[0]) in ledger
    assert list(cfg.targets["volume"]["directory"].glob("vol-*")) == []


COPY_PLUGIN = """
import shutil
from pathlib import Path

from appliance.workflow.step import Step


class CopyAside(Step):
    \"\"\"Hand over a modified copy of the image instead of changing it in place.\"\"\"

    schema = {"type": "object", "required": ["image"], "properties": {"image": {"type": "object"}}}

    def run(self, ctx, image):
        copy = image["path"] + ".copy"
        shutil.copyfile(image["path"], copy)
        ctx.ledger_created(copy)
        return {"image": {**image, "path": copy}}

    def undo(self, ctx, args, result):
        Path(result["image"]["path"]).unlink(missing_ok=True)
        ctx.ledger_removed(result["image"]["path"])


STEPS = {"test.copy_aside": CopyAside}
"""


def test_hook_replacing_the_volume_image_fails_import_volume_instead_of_being_dropped(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    # import-volume hands over the volume itself, so a hook's copy would silently be lost
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "copy_aside.py").write_text(COPY_PLUGIN)
    data = cfg_data(tmp_path, moto)
    data["hooks"] = {"plugins_dir": str(plugins), "points": {"after_convert": [{"hook": "test.copy_aside"}]}}
    cfg = stores.config(data, base_dir=tmp_path)
    disk = random_file(tmp_path / "disk.raw", 4 * MiB)
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, disk)
    upload(s3, pending, disk)
    service = ImportService(cfg)
    try:
        task = service.import_volume(
            DiskImage("RAW", disk.stat().st_size, pending.url, 1), availability_zone=None, description=None
        )
        done = run(cfg, task)
        ledger = [(e.action, e.resource) for e in service.store.ledger(task.id)]
    finally:
        service.store.close()
    assert (done.state, done.error_code) == (TaskState.FAILED, "Hook.ImageReplaced")
    assert "copy_aside" in done.error_message and "in place" in done.error_message
    # the volume is not handed over but removed
    (volume,) = [r for a, r in ledger if a == "created" and r.startswith("volume ")]
    assert ("removed", volume) in ledger
    assert list(cfg.targets["volume"]["directory"].glob("vol-*")) == []


def test_an_upload_that_never_comes_fails_at_expiry(
    service: ImportService, cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = random_file(tmp_path / "d.raw", MiB)
    pending = presign_manifest_url(moto.client("s3"), bucket, None, disk)
    task = service.import_volume(
        DiskImage("RAW", MiB, pending.url, 1), availability_zone=None, description=None
    )
    soon = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat().replace("+00:00", "Z")
    params = json.dumps({**task.params, "expiration_time": soon}, sort_keys=True)
    stores.sql(service.store.settings, "UPDATE tasks SET params = ? WHERE id = ?", (params, task.id))
    done = run(cfg, task)
    assert done.state is TaskState.FAILED
    assert done.error_code == "SourceUnavailable"


def test_cancel_while_waiting_for_the_upload(
    service: ImportService, cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    disk = random_file(tmp_path / "d.raw", MiB)
    pending = presign_manifest_url(moto.client("s3"), bucket, None, disk)
    task = service.import_volume(
        DiskImage("RAW", MiB, pending.url, 1), availability_zone=None, description=None
    )
    thread, out = run_in_thread(cfg, task)
    threading.Event().wait(0.8)
    service.cancel(task.id, ["import-volume"], reason="changed my mind")
    thread.join(timeout=60)
    assert out[0].state is TaskState.CANCELLED
    assert out[0].cancel_reason == "changed my mind"


def test_snapshot_from_a_user_bucket_is_stored_as_raw(
    service: ImportService, cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    src = imgs.qcow2_with_data(tmp_path)
    vhd = imgs.convert(src, tmp_path / "disk.vhd", "vpc", "force_size=on")
    moto.client("s3").upload_file(str(vhd), bucket, "disks/disk.vhd")
    task = service.import_snapshot(
        DiskContainer(format="VHD", bucket=bucket, key="disks/disk.vhd"),
        description="snap",
        client_token="tok-1",
    )
    again = service.import_snapshot(
        DiskContainer(format="VHD", bucket=bucket, key="disks/disk.vhd"),
        description="snap",
        client_token="tok-1",
    )
    assert again.id == task.id  # the client token makes the request idempotent
    done = run(cfg, task)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    stored = Path(outcome(done)["location"]["path"])
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), str(stored)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout
    assert done.result["ids"]["snapshot_id"] == "snap-" + task.id[-17:]


def test_requests_are_refused_before_any_work(
    service: ImportService, cfg: config_mod.Config, tmp_path: Path
) -> None:
    with pytest.raises(UrlNotAllowed):
        service.import_volume(
            DiskImage("RAW", MiB, "http://169.254.169.254/latest/meta-data/", 1),
            availability_zone=None,
            description=None,
        )
    with pytest.raises(UrlNotAllowed):
        service.import_image([DiskContainer(format="RAW", url="http://2130706433/disk.raw")])
    for _ in range(3):
        service.import_image([DiskContainer(format="RAW", bucket="b-one", key="k")])
    with pytest.raises(ResourceLimitExceeded):
        service.import_image([DiskContainer(format="RAW", bucket="b-one", key="k")])
    with pytest.raises(InvalidTaskId):
        service.get("import-vol-XYZ", ["import-volume"])
    with pytest.raises(TaskNotFound):
        service.get("import-vol-abcd1234", ["import-volume"])
    assert len(service.list(["import-image"])) == 3


def test_bad_s3_names_are_refused_at_submit_and_by_the_worker_without_library_text(
    service: ImportService, cfg: config_mod.Config, bucket: str
) -> None:
    # at submit (what the EC2 API calls): S3's naming rules, each member named
    for container, member in (
        (DiskContainer(format="RAW", bucket="Bad_Bucket", key="k"), "UserBucket.S3Bucket"),
        (DiskContainer(format="RAW", bucket="bad bucket", key="k"), "UserBucket.S3Bucket"),
        (DiskContainer(format="RAW", bucket=bucket, key="../other/k"), "UserBucket.S3Key"),
        (DiskContainer(format="RAW", url="s3://bad_bucket/k"), "bucket name"),
        (DiskContainer(format="RAW", url=f"s3://{bucket}/" + "k" * 1025), "object key"),
    ):
        with pytest.raises((UsageError, UrlNotAllowed)) as info:
            service.import_snapshot(container)
        assert info.value.code in ("InvalidParameterValue", "UrlNotAllowed") and member in info.value.message
    with pytest.raises(UsageError, match="ImportManifestUrl"):
        service.import_volume(
            DiskImage("RAW", MiB, f"s3://{bucket}/disk.manifest.xml", 1),
            availability_zone=None,
            description=None,
        )
    assert service.list(["import-snapshot", "import-volume"]) == []

    # a task that reaches the worker anyway (submitted by an older appliance, or by `imaging run`)
    # fails with the same coded message, not botocore's ParamValidationError text
    engine = Engine(cfg)
    try:
        params = {"disk_container": {"format": "RAW", "bucket": "bad bucket", "key": "k"}, "tags": []}
        task_id = engine.submit("import-snapshot", params, task_id="import-snap-0123456789abcdef0")
        done = engine.run(task_id)
    finally:
        engine.store.close()
    assert (done.state, done.error_code) == (TaskState.FAILED, "InvalidParameterValue")
    assert "'bad bucket' is not a valid S3 bucket name" in done.error_message
    assert "Parameter validation failed" not in done.error_message


def vhdx_of(raw: Path) -> Path:
    out = raw.with_suffix(".vhdx")
    imgs.qemu_img("convert", "-f", "raw", "-O", "vhdx", raw, out)
    return out


def test_a_download_larger_than_the_scratch_quota_fails_with_insufficient_scratch(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    data = cfg_data(tmp_path, moto) | {"scratch": {"quota": "4MiB", "min_free": 0}}
    cfg = stores.config(data, base_dir=tmp_path)
    # a random-access format: downloaded into scratch (a RAW disk would stream without scratch)
    disk = vhdx_of(random_file(tmp_path / "disk.raw", 6 * MiB))
    moto.client("s3").upload_file(str(disk), bucket, "big.vhdx")
    service = ImportService(cfg)
    try:
        task = service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key="big.vhdx"))
        done = run(cfg, task)
    finally:
        service.store.close()
    assert (done.state, done.error_code) == (TaskState.FAILED, "InsufficientScratch"), done.error_message
    needs = f"{disk.stat().st_size / MiB:.1f} MiB"
    assert f"downloading s3://{bucket}/big.vhdx needs {needs} of scratch" in done.error_message
    assert "only 4.0 MiB of the 4.0 MiB quota is free" in done.error_message
    assert not (cfg.scratch.root / task.id).exists()


def test_a_scratch_disk_below_its_floor_refuses_a_download_naming_its_size(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    data = cfg_data(tmp_path, moto) | {"scratch": {"quota": "1GiB", "min_free": "1PiB"}}
    cfg = stores.config(data, base_dir=tmp_path)
    disk = vhdx_of(random_file(tmp_path / "disk.raw", 3 * MiB))  # random access: through scratch
    moto.client("s3").upload_file(str(disk), bucket, "disk.vhdx")
    service = ImportService(cfg)
    try:
        done = run(cfg, service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key="disk.vhdx")))
    finally:
        service.store.close()
    assert (done.state, done.error_code) == (TaskState.FAILED, "InsufficientScratch"), done.error_message
    assert f"needs {disk.stat().st_size / MiB:.1f} MiB of scratch but the filesystem" in done.error_message
    assert "needs 0 B" not in done.error_message


FETCH_ONLY = """
name: fetch-only
params:
  source: {type: object, required: true}
steps:
  - name: fetch
    action: source.fetch
    with: {source: "{{ source }}"}
    register: fetched
  - name: after
    action: scratch.reserve
    with: {bytes: "2MiB", purpose: what a later step needs}
"""


def test_a_finished_download_is_not_counted_twice_against_the_scratch_disk(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    # 6 MiB downloaded onto a 10 MiB disk: 4 MiB are left, and the next step asks for 2 of them
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "fetch-only.yaml").write_text(FETCH_ONLY)
    with tmpfs(tmp_path / "scratch", "10m") as root:
        data = cfg_data(tmp_path, moto) | {
            "scratch": {"root": str(root), "quota": "1GiB", "min_free": 0},
            "workflows": {"extra_dirs": [str(workflows)]},
        }
        cfg = stores.config(data, base_dir=tmp_path)
        disk = random_file(tmp_path / "disk.raw", 6 * MiB)
        moto.client("s3").upload_file(str(disk), bucket, "disk.raw")
        engine = Engine(cfg, poll_interval=0.1)
        try:
            task = engine.run(engine.submit("fetch-only", {"source": {"bucket": bucket, "key": "disk.raw"}}))
        finally:
            engine.store.close()
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    assert task.result["fetched"]["size"] == 6 * MiB


@pytest.mark.parametrize("fmt", ["RAW", "VMDK"])
def test_a_volume_whose_storage_fills_up_fails_with_insufficient_storage(
    moto: MotoServer, bucket: str, tmp_path: Path, fmt: str
) -> None:
    # 6 MiB of data for a volume on a 4 MiB filesystem: RAW streams onto it, VMDK is converted onto it
    # by qemu-img (scratch is elsewhere and roomy). Either way the full target is InsufficientStorage,
    # not InsufficientScratch (scratch is fine) and not an uncoded StepFailed.
    disk = random_file(tmp_path / "disk.raw", 6 * MiB)
    upload_file = disk
    if fmt == "VMDK":
        upload_file = tmp_path / "disk.vmdk"
        imgs.qemu_img(
            "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", disk, upload_file
        )
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, upload_file)
    upload(s3, pending, upload_file, file_format=fmt, part_size=2 * MiB)
    with tmpfs(tmp_path / "volumes", "4m") as volumes:
        data = cfg_data(tmp_path, moto) | {
            "targets": {"volume": {"type": "file", "directory": str(volumes), "min_free": 0}}
        }
        cfg = config_mod.from_dict(data, base_dir=tmp_path)
        service = ImportService(cfg)
        try:
            task = service.import_volume(
                DiskImage(fmt, disk.stat().st_size, pending.url, 1), availability_zone=None, description=None
            )
            done = run(cfg, task)
        finally:
            service.store.close()
        assert (done.state, done.error_code) == (TaskState.FAILED, "InsufficientStorage"), done.error_message
        assert done.error_message.startswith(
            "step 'write-image' failed: no space left on the storage of volume vol-"
        )
        assert list(volumes.iterdir()) == []  # the volume and any partial output are gone
    assert not (cfg.scratch.root / task.id).exists()


def test_multi_disk_image_requests_are_capped_and_checked_before_any_work(service: ImportService) -> None:
    disk = DiskContainer(format="RAW", bucket="b-one", key="k")
    with pytest.raises(UsageError, match="at most 21 DiskContainers"):
        service.import_image([disk] * 22)
    with pytest.raises(UsageError, match="only DiskContainer"):
        service.import_image([DiskContainer(format="OVA", bucket="b-one", key="vm.ova"), disk])
    with pytest.raises(UsageError, match="would be /dev/sdb"):
        service.import_image(
            [disk, disk, DiskContainer(format="RAW", bucket="b-one", key="k", device_name="/dev/sdb")]
        )
    with pytest.raises(UsageError, match="not a device name"):
        service.import_image(
            [disk, DiskContainer(format="RAW", bucket="b-one", key="k", device_name="/etc/x")]
        )
    assert service.list(["import-image"]) == []
    task = service.import_image([disk] * 21)
    assert len(task.params["disk_containers"]) == 21
