"""ImportImage/ImportSnapshot of a sequential format stream from S3 through the confined decoder into the
S3 image target (a multipart upload to a staging key, checked there, then copied to its key): no scratch
(the scratch accounting's high-water mark stays 0), the stored object equal to ``qemu-img convert`` of the
source, and a hostile stream, a guest that fails validation or a cancel leave no object and no incomplete
multipart upload in the image bucket.

Real parts: the moto S3 server process (source and image buckets), qemu-img (making the images, converting
and comparing them), the confined decoder child, the confined guest probe child (served over its pipes),
the in-process engine running the shipped workflows; the stall proxy holds an upload's part for the cancel.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.scratch import ScratchSpace
from appliance.service.imports import ImportService
from appliance.service.importtasks import IMPORT_SNAPSHOT, DiskContainer
from appliance.service.importviews import outcome
from appliance.steps.provenance import READ_BEFORE_UPLOAD, WHILE_UPLOADING
from appliance.store import Task, TaskState
from appliance.workflow.engine import Engine
from tests import guestfactory
from tests import imagefactory as imgs
from tests import streamfactory as sf
from tests.appliance.steps.test_image_stream import GUESTS, guest_source, qemu_format, raw_disk, source_of
from tests.processes import wait_until
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:16]}"  # the moto server lives for the session: a bucket per test


@pytest.fixture
def buckets(moto: MotoServer) -> tuple[str, str]:
    """(the bucket disks are imported from, the image target's bucket)."""
    names = (_name("src-"), _name("img-"))
    for b in names:
        moto.client("s3").create_bucket(Bucket=b)
    return names


def config_for(
    tmp_path: Path, moto: MotoServer, image_bucket: str, s3_endpoint: str | None = None
) -> config_mod.Config:
    endpoint = s3_endpoint or moto.endpoint
    s3 = {"endpoint_url": moto.endpoint, "region": REGION, "access_key": "testing", "secret_key": "testing"}
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "sources": {"allowed_endpoints": [moto.endpoint], "retries": 2, "s3": s3},
        "targets": {
            "image": {
                "type": "s3",
                "bucket": image_bucket,
                "prefix": "images/",
                **s3,
                "endpoint_url": endpoint,
                "addressing_style": "path",
                "part_size": "5MiB",
                "threads": 2,
            }
        },
    }
    return config_mod.from_dict(data, base_dir=tmp_path)


@pytest.fixture
def cfg(tmp_path: Path, moto: MotoServer, buckets: tuple[str, str]) -> config_mod.Config:
    return config_for(tmp_path, moto, buckets[1])


def run_import(cfg: config_mod.Config, container: DiskContainer, snapshot: bool) -> Task:
    service = ImportService(cfg)
    engine = Engine(cfg, poll_interval=0.1)
    try:
        task = service.import_snapshot(container) if snapshot else service.import_image([container])
        return engine.run(task.id)
    finally:
        engine.store.close()
        service.store.close()


def left_in(moto: MotoServer, bucket: str) -> tuple[list[str], list[str]]:
    """(object keys, keys of incomplete multipart uploads) in ``bucket``, as S3 lists them."""
    s3 = moto.client("s3")
    objects = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    uploads = [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return objects, uploads


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["raw", "gz", "vmdk-stream", "vhd-fixed"])
def test_a_sequential_format_streams_into_the_s3_image_target_with_no_scratch_and_equals_qemu_img_convert(
    kind: str, cfg: config_mod.Config, moto: MotoServer, buckets: tuple[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    image, claim = source_of(kind, src)
    moto.client("s3").upload_file(str(image), buckets[0], image.name)
    done = run_import(cfg, DiskContainer(format=claim, bucket=buckets[0], key=image.name), snapshot=True)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)

    # the scratch accounting's high-water mark over the whole task: nothing was ever reserved
    assert ScratchSpace.from_config(cfg).peak() == 0
    disk = done.result["disk"]
    assert "fetched" not in disk and disk["streamed"]["stream"]["decoder"] is not None
    assert disk["streamed"]["stream"]["parts"] == 3  # 12 MiB in 5 MiB parts

    location = outcome(done)["location"]
    assert (location["bucket"], location["key"]) == (buckets[1], f"images/{done.id}.raw")
    stored = tmp_path / "stored.raw"
    moto.client("s3").download_file(buckets[1], location["key"], str(stored))
    if kind == "gz":  # qemu-img has no gzip reader: the reference is the decompressed disk
        reference = src / "disk.raw"
    else:
        reference = tmp_path / "reference.raw"
        imgs.qemu_img("convert", "-f", qemu_format(kind), "-O", "raw", image, reference)
    imgs.qemu_img("compare", "-f", "raw", "-F", "raw", reference, stored)
    assert stored.stat().st_size == reference.stat().st_size

    # digests: the output's as it was sent (zeros included), the source's as it streamed
    head = moto.client("s3").head_object(Bucket=buckets[1], Key=location["key"])
    assert location["sha256"] == head["Metadata"]["sha256"] == sha256_of(stored)
    assert location["digest_method"] == WHILE_UPLOADING
    assert head["Metadata"]["source-sha256"] == sha256_of(image) == disk["streamed"]["source"]["sha256"]
    assert head["Metadata"]["import-task-id"] == done.id
    # only the published object: the staging object is gone, no upload is left open
    assert left_in(moto, buckets[1]) == ([location["key"]], [])


@pytest.mark.parametrize("guest", GUESTS)
@pytest.mark.parametrize("kind", ["vmdk-stream", "vhd-fixed"])
def test_a_container_whose_guest_disk_is_a_tar_or_a_live_iso_streams_into_s3_as_its_conversion_would(
    kind: str, guest: str, cfg: config_mod.Config, moto: MotoServer, buckets: tuple[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    image, claim, packed = guest_source(kind, src, guest)
    moto.client("s3").upload_file(str(image), buckets[0], image.name)
    done = run_import(cfg, DiskContainer(format=claim, bucket=buckets[0], key=image.name), snapshot=True)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    stored = tmp_path / "stored.raw"
    moto.client("s3").download_file(buckets[1], outcome(done)["location"]["key"], str(stored))
    imgs.qemu_img("compare", "-f", "raw", "-F", "raw", packed, stored)


def test_the_guest_of_a_streamed_disk_is_read_back_from_the_stored_object_in_few_ranged_gets(
    cfg: config_mod.Config, moto: MotoServer, buckets: tuple[str, str], tmp_path: Path
) -> None:
    disk_file = guestfactory.data_disk(tmp_path)  # MBR, one ext4 partition with files
    moto.client("s3").upload_file(str(disk_file), buckets[0], "data.raw")
    done = run_import(cfg, DiskContainer(format="RAW", bucket=buckets[0], key="data.raw"), snapshot=True)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    streamed = done.result["disk"]["streamed"]
    # the confined probe read the partition table and the filesystem over its pipes
    guest = streamed["guest"]
    assert guest["partition_table"] == "mbr" and guest["layout"] != "partition"
    assert [p.get("filesystem") for p in guest["partitions"]] == ["ext4"], guest["partitions"]
    # one GET per 1 MiB block touched, at most: the block cache absorbs the parser's small reads
    assert 0 < streamed["stream"]["readback_gets"] <= -(-disk_file.stat().st_size // MiB)
    assert ScratchSpace.from_config(cfg).peak() == 0


def test_a_hostile_stream_vmdk_into_s3_fails_corrupt_and_leaves_no_object_and_no_incomplete_upload(
    cfg: config_mod.Config, moto: MotoServer, buckets: tuple[str, str], tmp_path: Path
) -> None:
    image = sf.grain_beyond_capacity(tmp_path / "hostile.vmdk")
    moto.client("s3").upload_file(str(image), buckets[0], "hostile.vmdk")
    done = run_import(cfg, DiskContainer(format="VMDK", bucket=buckets[0], key="hostile.vmdk"), snapshot=True)
    assert (done.state, done.error_code) == (TaskState.FAILED, "CorruptImage"), done.error_message
    assert left_in(moto, buckets[1]) == ([], [])
    assert ScratchSpace.from_config(cfg).peak() == 0


def test_a_stream_vmdk_whose_grains_are_out_of_order_fails_grain_order_and_leaves_nothing(
    cfg: config_mod.Config, moto: MotoServer, buckets: tuple[str, str], tmp_path: Path
) -> None:
    # a valid stream (qemu-img reads it) whose second grain lies before the first: an in-order upload
    # cannot take it back; more than a part of disk lies between them, so a part was already sent
    grain = 128  # sectors: 64 KiB
    high = (12 * MiB // 512) - grain
    stream = sf.Stream(
        capacity=12 * MiB // 512,
        grains=[sf.Grain(lba=high, data=b"\x07" * 65536), sf.Grain(lba=0, data=b"\x05" * 65536)],
    )
    image = tmp_path / "backwards.vmdk"
    image.write_bytes(sf.build(stream))
    imgs.qemu_img("convert", "-f", "vmdk", "-O", "raw", image, tmp_path / "readable.raw")
    moto.client("s3").upload_file(str(image), buckets[0], "backwards.vmdk")
    done = run_import(
        cfg, DiskContainer(format="VMDK", bucket=buckets[0], key="backwards.vmdk"), snapshot=True
    )
    assert (done.state, done.error_code) == (TaskState.FAILED, "UnsupportedFormat.GrainOrder"), (
        done.error_message
    )
    assert "ascending order" in (done.error_message or "")
    assert left_in(moto, buckets[1]) == ([], [])


def test_a_guest_that_fails_validation_leaves_no_object_and_no_incomplete_upload(
    cfg: config_mod.Config, moto: MotoServer, buckets: tuple[str, str], tmp_path: Path
) -> None:
    # ImportImage of a disk of random bytes: no partition table, nothing to boot
    moto.client("s3").upload_file(str(raw_disk(tmp_path)), buckets[0], "noise.raw")
    done = run_import(cfg, DiskContainer(format="RAW", bucket=buckets[0], key="noise.raw"), snapshot=False)
    assert done.state is TaskState.FAILED and (done.error_code or "").startswith("Guest."), (
        done.error_code,
        done.error_message,
    )
    assert left_in(moto, buckets[1]) == ([], [])
    assert ScratchSpace.from_config(cfg).peak() == 0


def test_a_random_access_format_still_takes_the_scratch_path_to_s3(
    cfg: config_mod.Config, moto: MotoServer, buckets: tuple[str, str], tmp_path: Path
) -> None:
    raw = raw_disk(tmp_path)
    # (qcow2 is not a format EC2 imports take; VHDX is random access alike)
    image = tmp_path / "disk.vhdx"
    imgs.qemu_img("convert", "-f", "raw", "-O", "vhdx", raw, image)
    moto.client("s3").upload_file(str(image), buckets[0], "disk.vhdx")
    done = run_import(cfg, DiskContainer(format="VHDX", bucket=buckets[0], key="disk.vhdx"), snapshot=True)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert "streamed" not in done.result["disk"] and "fetched" in done.result["disk"]
    assert ScratchSpace.from_config(cfg).peak() >= image.stat().st_size
    location = outcome(done)["location"]
    stored = tmp_path / "stored.raw"
    moto.client("s3").download_file(buckets[1], location["key"], str(stored))
    imgs.qemu_img("compare", "-f", "raw", "-F", "raw", raw, stored)
    assert location.get("digest_method", READ_BEFORE_UPLOAD) == READ_BEFORE_UPLOAD
    assert left_in(moto, buckets[1]) == ([location["key"]], [])


def test_cancel_mid_stream_into_s3_aborts_the_upload_and_leaves_no_object(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str]
) -> None:
    # the image target's S3 calls go through a proxy that holds the upload's second part: the stream is
    # provably mid-upload (a multipart upload open at the staging key, a part stored) when cancelled
    with StallingProxy(moto.endpoint) as proxy:
        cfg = config_for(tmp_path, moto, buckets[1], s3_endpoint=proxy.endpoint)
        moto.client("s3").upload_file(str(raw_disk(tmp_path)), buckets[0], "disk.raw")
        service = ImportService(cfg)
        try:
            task = service.import_snapshot(DiskContainer(format="RAW", bucket=buckets[0], key="disk.raw"))
            proxy.arm_request("PUT", "partNumber=2")
            out: list[Task] = []

            def run() -> None:
                engine = Engine(cfg, poll_interval=0.1)
                try:
                    out.append(engine.run(task.id))
                finally:
                    engine.store.close()

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            wait_until(lambda: proxy.stalled_on("partNumber=2") >= 1, what="the second part to be held")
            objects, uploads = left_in(moto, buckets[1])
            assert objects == [] and uploads == [f"images/{task.id}.raw.partial"]
            service.cancel(task.id, [IMPORT_SNAPSHOT])
            proxy.release()
            thread.join(timeout=120)
            assert out and out[0].state is TaskState.CANCELLED, out
            assert left_in(moto, buckets[1]) == ([], [])
        finally:
            service.store.close()
