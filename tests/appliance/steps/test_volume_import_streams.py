"""ImportVolume of stream-optimized VMDK and fixed VHD uploads: streamed part by part through the confined
sequential decoder onto the volume, no scratch; random-access subformats still through scratch.

Real parts: the moto S3 server (behind :class:`~tests.stallproxy.StallingProxy`, which counts the bytes it
serves and can hold a part mid-body), real qemu-img (sources and ``qemu-img compare``), file volumes, the
in-process engine and, for the kill -9, the real worker and its task child.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskImage
from appliance.store import Task, TaskState
from tests import imagefactory as imgs
from tests import processes
from tests.appliance.steps.test_image_stream import GUESTS, guest_source
from tests.euca_upload import presign_manifest_url, upload
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy
from tests.taskrun import run

MiB = 1 << 20
GiB = 1 << 30


def cfg_data(tmp_path: Path, moto: MotoServer, proxy: StallingProxy, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "sources": {
            "allowed_endpoints": [proxy.endpoint, moto.endpoint],
            "manifest_poll_interval": 0.2,
            "manifest_poll_max_interval": 0.5,
            "retries": 3,
            "checkpoint_every": MiB,
            "s3": {
                "endpoint_url": moto.endpoint,
                "region": REGION,
                "access_key": "testing",
                "secret_key": "testing",
            },
        },
        # far smaller than any upload here: an import that puts the upload in scratch fails
        "scratch": {"quota": "1MiB", "min_free": 0},
        "tasks": {"max_active": 3},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def disk_with_data(directory: Path, mib: int = 48, data_mib: int = 24, seed: int = 0) -> Path:
    """A RAW disk with an MBR, ``data_mib`` MiB of random bytes from 1 MiB on, zeros after them."""
    path = imgs.raw_mbr(directory, "disk.raw", size=mib * MiB)
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        f.seek(MiB)
        for _ in range(data_mib):
            f.write(rng.randbytes(MiB))
    return path


def convert_raw(raw: Path, dst: Path, fmt: str, options: str | None = None) -> Path:
    imgs.qemu_img("convert", "-f", "raw", "-O", fmt, *(["-o", options] if options else []), raw, dst)
    return dst


def presigning_client(proxy: StallingProxy) -> Any:
    """An S3 client whose presigned part URLs go through the proxy (which counts and can hold them)."""
    import boto3  # heavy optional dependency, as in the other tests

    return boto3.client(
        "s3",
        endpoint_url=proxy.endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def submit(
    service: ImportService,
    proxy: StallingProxy,
    bucket: str,
    image: Path,
    fmt: str,
    virtual: int,
    part: int,
    volume_gib: int | None = None,
) -> Task:
    s3 = presigning_client(proxy)
    pending = presign_manifest_url(s3, bucket, None, image)
    upload(s3, pending, image, file_format=fmt, part_size=part)
    gib = volume_gib or -(-virtual // GiB)
    return service.import_volume(
        DiskImage(fmt, virtual, pending.url, gib), availability_zone=None, description=None
    )


def volume_path(task: Task) -> Path:
    vol = task.result.get("volume") or task.result["imported"]["volume"]
    return Path(vol["path"])


def same_disk(a: Path, fmt_a: str, b: Path) -> None:
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", "raw", str(a), str(b)], capture_output=True, text=True
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def imaging_digest(path: Path) -> dict[str, Any]:
    """``imaging digest PATH --json``: the chunked digest as a user recomputes it, in a process of its own."""
    env = {k: v for k, v in os.environ.items() if k != "IMAGING_CONFIG"}
    res = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "digest", str(path), "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def recorded_volume_digest(task: Task) -> dict[str, Any]:
    """The volume's sha256-chunked the volume step recorded while writing, as the provenance shows it."""
    output = task.result["provenance"]["output"]
    assert output["digest"] == task.result["written"]["output_digest"]
    assert output["digest_method"].startswith("sha256-chunked computed while writing")
    return dict(output["digest"])


def served_parts(proxy: StallingProxy) -> int:
    return sum(n for path, n in proxy.served_by_path.items() if ".part." in path)


@pytest.mark.parametrize(
    ("fmt", "qemu_fmt", "options", "decoder"),
    [
        ("VMDK", "vmdk", "subformat=streamOptimized", "vmdk-stream"),
        ("VHD", "vpc", "subformat=fixed,force_size=on", "vhd-fixed"),
    ],
)
def test_a_sequential_upload_streams_onto_the_volume_with_no_scratch(
    moto: MotoServer,
    proxy: StallingProxy,
    bucket: str,
    tmp_path: Path,
    fmt: str,
    qemu_fmt: str,
    options: str,
    decoder: str,
) -> None:
    raw = disk_with_data(tmp_path)
    image = convert_raw(raw, tmp_path / f"disk.{qemu_fmt}", qemu_fmt, options)
    cfg = config_mod.from_dict(cfg_data(tmp_path, moto, proxy), base_dir=tmp_path)
    service = ImportService(cfg)
    try:
        task = submit(service, proxy, bucket, image, fmt, imgs.virtual_size(image), 4 * MiB)
        done = run(cfg, task)
    finally:
        service.store.close()
    # the scratch quota (1 MiB) is far below the upload: assembling it in scratch fails
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    written = done.result["written"]
    assert (written["streamed"], written["decoder"]) == (True, decoder)
    path = volume_path(done)
    same_disk(image, qemu_fmt, path)
    assert path.stat().st_size == GiB  # the volume's size; past the image it reads as zeros
    assert done.bytes_converted == raw.stat().st_size == written["virtual_size"]
    # every part once, plus the preflight's first 2 MiB and last 1536 bytes
    assert served_parts(proxy) <= image.stat().st_size + 2 * MiB + 1536
    assert not (cfg.scratch.root / task.id).exists()
    # the volume's digest, taken from the decoder's writes: what `imaging digest` reads from the volume
    recorded, computed = recorded_volume_digest(done), imaging_digest(path)
    assert (recorded["value"], recorded["chunks"]) == (computed["value"], computed["chunks"])


@pytest.mark.parametrize("guest", GUESTS)
@pytest.mark.parametrize("kind", ["vmdk-stream", "vhd-fixed"])
def test_a_container_whose_guest_disk_is_a_tar_or_a_live_iso_streams_onto_the_volume(
    moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path, kind: str, guest: str
) -> None:
    """The volume holds a guest's disk decoded out of a VMDK or VHD, not an archive or an ISO given as a
    disk."""
    image, fmt, packed = guest_source(kind, tmp_path, guest)
    cfg = config_mod.from_dict(cfg_data(tmp_path, moto, proxy), base_dir=tmp_path)
    service = ImportService(cfg)
    try:
        done = run(cfg, submit(service, proxy, bucket, image, fmt, packed.stat().st_size, 4 * MiB))
    finally:
        service.store.close()
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.result["written"]["streamed"] is True
    same_disk(packed, "raw", volume_path(done))


def test_a_raw_upload_records_the_volumes_chunked_digest_as_it_writes_it(
    moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    raw = disk_with_data(tmp_path, mib=80, data_mib=70)  # spans two 64 MiB chunks, then zeros
    cfg = config_mod.from_dict(cfg_data(tmp_path, moto, proxy), base_dir=tmp_path)
    service = ImportService(cfg)
    try:
        task = submit(service, proxy, bucket, raw, "RAW", raw.stat().st_size, 4 * MiB)
        done = run(cfg, task)
    finally:
        service.store.close()
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    path = volume_path(done)
    recorded, computed = recorded_volume_digest(done), imaging_digest(path)
    assert (recorded["value"], recorded["chunks"]) == (computed["value"], computed["chunks"]) and recorded[
        "chunks"
    ] == GiB // (64 * MiB)
    # the volume past the image (zeros, never written) was taken as zero chunks, not hashed
    assert recorded["zero_chunks"] >= 14 and recorded["hashed_bytes"] <= 2 * 64 * MiB


def test_a_dynamic_vhd_upload_still_goes_through_scratch_and_its_volume_is_hashed_by_one_read(
    moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    raw = disk_with_data(tmp_path, mib=16, data_mib=4)
    image = convert_raw(raw, tmp_path / "disk.vhd", "vpc", "subformat=dynamic")
    cfg = config_mod.from_dict(cfg_data(tmp_path, moto, proxy, scratch={"quota": "1GiB"}), base_dir=tmp_path)
    service = ImportService(cfg)
    try:
        task = submit(service, proxy, bucket, image, "VHD", imgs.virtual_size(image), 4 * MiB)
        done = run(cfg, task)
    finally:
        service.store.close()
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.result["written"]["streamed"] is False
    same_disk(image, "vpc", volume_path(done))
    # qemu-img wrote the volume: one read of it (chunked, holes skipped) for its digest
    output = done.result["provenance"]["output"]
    assert output["digest"]["value"] == imaging_digest(volume_path(done))["value"]
    assert "qemu-img wrote it" in output["digest_method"]


def test_a_stream_vmdk_larger_than_its_volume_fails_with_insufficient_volume_size(
    moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    raw = imgs.raw_mbr(tmp_path, "big.raw", size=GiB + MiB)  # sparse: one MBR and a hole
    image = convert_raw(raw, tmp_path / "big.vmdk", "vmdk", "subformat=streamOptimized")
    cfg = config_mod.from_dict(cfg_data(tmp_path, moto, proxy), base_dir=tmp_path)
    service = ImportService(cfg)
    try:
        task = submit(service, proxy, bucket, image, "VMDK", GiB, 4 * MiB, volume_gib=1)
        done = run(cfg, task)
    finally:
        service.store.close()
    assert (done.state, done.error_code) == (TaskState.FAILED, "InsufficientVolumeSize"), done.error_message
    assert "at least 2 GiB" in (done.error_message or "")
    assert list(cfg.targets["volume"]["directory"].glob("vol-*")) == []


def _first_grain_marker(vmdk: bytes) -> int:
    over_head = struct.unpack_from("<Q", vmdk, 64)[0]
    return over_head * 512


def test_a_stream_vmdk_with_a_grain_beyond_its_capacity_fails_coded_and_leaves_no_volume(
    moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    raw = disk_with_data(tmp_path, mib=16, data_mib=4)
    image = convert_raw(raw, tmp_path / "disk.vmdk", "vmdk", "subformat=streamOptimized")
    data = bytearray(image.read_bytes())
    capacity = struct.unpack_from("<Q", data, 12)[0]
    at = _first_grain_marker(data)
    data[at : at + 8] = struct.pack("<Q", capacity + 128)  # grain-aligned, past the end of the disk
    image.write_bytes(bytes(data))
    cfg = config_mod.from_dict(cfg_data(tmp_path, moto, proxy), base_dir=tmp_path)
    service = ImportService(cfg)
    try:
        task = submit(service, proxy, bucket, image, "VMDK", 16 * MiB, 4 * MiB)
        done = run(cfg, task)
    finally:
        service.store.close()
    assert (done.state, done.error_code) == (TaskState.FAILED, "CorruptImage"), done.error_message
    assert f"input byte {at}" in (done.error_message or "")
    assert list(cfg.targets["volume"]["directory"].glob("vol-*")) == []


def test_a_vmdk_claim_for_a_qcow2_upload_is_refused_before_the_parts_are_downloaded(
    moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    raw = disk_with_data(tmp_path, mib=32, data_mib=24)
    image = convert_raw(raw, tmp_path / "disk.qcow2", "qcow2")
    cfg = config_mod.from_dict(cfg_data(tmp_path, moto, proxy), base_dir=tmp_path)
    service = ImportService(cfg)
    try:
        task = submit(service, proxy, bucket, image, "VMDK", 32 * MiB, 4 * MiB)
        done = run(cfg, task)
    finally:
        service.store.close()
    assert (done.state, done.error_code) == (TaskState.FAILED, "FormatMismatch"), done.error_message
    # the preflight read the first 2 MiB and the last bytes, not the 24+ MiB upload
    assert served_parts(proxy) <= 2 * MiB + 1536 < image.stat().st_size // 8
    assert list(cfg.targets["volume"]["directory"].glob("vol-*")) == []


def test_a_stream_vmdk_import_killed_mid_stream_resumes_from_its_checkpoint(
    moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    raw = disk_with_data(tmp_path, mib=64, data_mib=40)
    image = convert_raw(raw, tmp_path / "disk.vmdk", "vmdk", "subformat=streamOptimized")
    data = cfg_data(tmp_path, moto, proxy, worker={"concurrency": 1, "poll_interval": 0.2})
    data["tasks"] = {"lease_seconds": 5}
    config_file = tmp_path / "imaging.yaml"
    config_file.write_text(yaml.safe_dump(data))
    cfg = config_mod.load(config_file)
    service = ImportService(cfg)
    workers: list[subprocess.Popen[bytes]] = []

    def start_worker() -> None:
        log = open(tmp_path / f"worker-{len(workers)}.log", "wb")  # noqa: SIM115 - the child keeps it
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "--config", str(config_file), "worker"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()

    try:
        task = submit(service, proxy, bucket, image, "VMDK", 64 * MiB, 4 * MiB)
        parts = -(-image.stat().st_size // (4 * MiB))
        assert parts >= 8
        proxy.arm(f".part.{parts - 2}", after=MiB)  # the upload's end is held

        def checkpointed() -> int:
            # the write-image step's checkpoint, in the task database
            return int((service.store.load_checkpoint(task.id, "3") or {}).get("done", 0))

        start_worker()
        processes.wait_until(
            lambda: proxy.stalled >= 1 and checkpointed() >= 16 * MiB,
            timeout=120,
            interval=0.1,
            what="a checkpoint at a decoder boundary with the download held",
        )
        boundary = (service.store.load_checkpoint(task.id, "3") or {})["boundary"]
        assert boundary["format"] == "vmdk-stream" and boundary["input_offset"] >= 16 * MiB
        owner = service.store.get_task(task.id).owner
        assert owner is not None
        workers[-1].kill()
        workers[-1].wait()
        with contextlib.suppress(ProcessLookupError):  # the task child: nothing gets to clean up
            os.kill(int(owner.rpartition(":")[2]), signal.SIGKILL)
        proxy.release()
        start_worker()
        processes.wait_until(
            lambda: (
                service.store.get_task(task.id).state
                in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)
            ),
            timeout=120,
            interval=0.1,
            what="the resumed task to end",
        )
        done = service.store.get_task(task.id)
    finally:
        for proc in workers:
            processes.stop_process(proc)
        service.store.close()
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.attempts == 2
    same_disk(image, "vmdk", volume_path(done))
    # the first run fetched each part at most once; the resumed one from the part holding the checkpointed
    # boundary on (4 MiB parts); each run also read the preflight's 2 MiB head and 1536-byte tail
    size = image.stat().st_size
    part_start = boundary["input_offset"] // (4 * MiB) * (4 * MiB)
    assert served_parts(proxy) <= size + (size - part_start) + 2 * (2 * MiB + 1536) < 2 * size
    # the resumed decode did not see the disk before its boundary: the volume was read once for its digest
    output = done.result["provenance"]["output"]
    assert done.result["written"]["output_digest"] is None
    assert "the task resumed at upload byte" in output["digest_method"]
    assert output["digest"]["value"] == imaging_digest(volume_path(done))["value"]


def test_a_raw_upload_saves_a_checkpoint_every_checkpoint_every_bytes_not_every_part(
    moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each checkpoint flushes the volume first, and the writing waits for it: 4 MiB parts with a
    # checkpoint every 16 MiB save 3 of 12 boundaries, not 12
    from appliance.store import Store

    saved: list[dict[str, Any]] = []
    real = Store.save_checkpoint

    def recording(self: Store, task_id: str, idx: str, data: dict[str, Any], **kw: Any) -> None:
        if "next" in data:  # the volume step's
            saved.append(dict(data))
        real(self, task_id, idx, data, **kw)

    monkeypatch.setattr(Store, "save_checkpoint", recording)
    raw = disk_with_data(tmp_path, mib=48, data_mib=40)
    cfg = config_mod.from_dict(
        cfg_data(tmp_path, moto, proxy, sources={"checkpoint_every": 16 * MiB}), base_dir=tmp_path
    )
    service = ImportService(cfg)
    try:
        task = submit(service, proxy, bucket, raw, "RAW", raw.stat().st_size, 4 * MiB)
        done = run(cfg, task)
    finally:
        service.store.close()
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    same_disk(raw, "raw", volume_path(done))
    assert [s["done"] for s in saved] == [16 * MiB, 32 * MiB, 48 * MiB]
    assert [s["next"] for s in saved] == [4, 8, 12]
