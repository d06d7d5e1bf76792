"""ImportImage/ImportSnapshot of a sequential format stream from S3 through the confined decoder into the
file image target: no scratch (the scratch accounting's high-water mark stays 0), the stored disk equal
to ``qemu-img convert`` of the source, and a hostile stream leaves no image file behind.

Real parts: the moto S3 server, qemu-img (making the images, converting and comparing them), the confined
decoder child, the in-process engine running the shipped workflows.
"""

from __future__ import annotations

import gzip
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.scratch import ScratchSpace
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer
from appliance.service.importviews import outcome
from appliance.steps import image_stream
from appliance.store import TaskState
from appliance.workflow.engine import Engine
from tests import imagefactory as imgs
from tests import streamfactory as sf
from tests.servers import REGION, MotoServer

MiB = 1 << 20


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    name = "strm-" + request.node.name.replace("_", "-").replace("[", "-").replace("]", "")[:40].lower()
    moto.client("s3").create_bucket(Bucket=name.strip("-"))
    return name.strip("-")


@pytest.fixture
def cfg(tmp_path: Path, moto: MotoServer) -> config_mod.Config:
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "sources": {
            "allowed_endpoints": [moto.endpoint],
            "retries": 2,
            "s3": {
                "endpoint_url": moto.endpoint,
                "region": REGION,
                "access_key": "testing",
                "secret_key": "testing",
            },
        },
    }
    return config_mod.from_dict(data, base_dir=tmp_path)


def raw_disk(directory: Path) -> Path:
    """12 MiB: random data, a zero run, more data (so holes and data both show in the output)."""
    rng = random.Random(12)
    path = directory / "disk.raw"
    with open(path, "wb") as f:
        f.write(rng.randbytes(3 * MiB))
        f.write(bytes(6 * MiB))
        f.write(rng.randbytes(3 * MiB))
    return path


def source_of(kind: str, directory: Path) -> tuple[Path, str]:
    """The image to upload for ``kind`` and the format the import claims."""
    raw = raw_disk(directory)
    if kind == "raw":
        return raw, "RAW"
    if kind == "gz":
        out = directory / "disk.raw.gz"
        out.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=1))
        return out, "RAW"  # a claim without a suffix accepts a compressed disk
    if kind == "vmdk-stream":
        out = directory / "disk.vmdk"
        imgs.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, out)
        return out, "VMDK"
    out = directory / "disk.vhd"
    imgs.qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", raw, out)
    return out, "VHD"


def qemu_format(kind: str) -> str:
    return {"raw": "raw", "gz": "raw", "vmdk-stream": "vmdk", "vhd-fixed": "vpc"}[kind]


def run_import(cfg: config_mod.Config, container: DiskContainer, snapshot: bool) -> Any:
    return run_import_with_events(cfg, container, snapshot)[0]


def run_import_with_events(
    cfg: config_mod.Config, container: DiskContainer, snapshot: bool
) -> tuple[Any, list[Any]]:
    service = ImportService(cfg)
    engine = Engine(cfg, poll_interval=0.1)
    try:
        task = service.import_snapshot(container) if snapshot else service.import_image([container])
        done = engine.run(task.id)
        return done, engine.store.events(task_id=task.id, limit=100_000)
    finally:
        engine.store.close()
        service.store.close()


@pytest.mark.parametrize("kind", ["raw", "gz", "vmdk-stream", "vhd-fixed"])
def test_a_sequential_format_streams_into_the_image_target_with_no_scratch_and_equals_qemu_img_convert(
    kind: str,
    cfg: config_mod.Config,
    moto: MotoServer,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the confined decoder children started: none for RAW and a fixed VHD of known size (decoded in
    # the task process), one for what has structure to parse
    started: list[str] = []
    child = image_stream.StreamDecode

    def counted(decoder: str, *args: Any, **kwargs: Any) -> Any:
        started.append(decoder)
        return child(decoder, *args, **kwargs)

    monkeypatch.setattr(image_stream, "StreamDecode", counted)
    src = tmp_path / "src"
    src.mkdir()
    image, claim = source_of(kind, src)
    moto.client("s3").upload_file(str(image), bucket, image.name)
    done = run_import(cfg, DiskContainer(format=claim, bucket=bucket, key=image.name), snapshot=True)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)

    # the scratch accounting's high-water mark over the whole task: nothing was ever reserved
    assert ScratchSpace.from_config(cfg).peak() == 0
    disk = done.result["disk"]
    assert "fetched" not in disk and disk["streamed"]["stream"]["decoder"] is not None

    stored = Path(outcome(done)["location"]["path"])
    if kind == "gz":  # qemu-img has no gzip reader: the reference is the decompressed disk
        reference = src / "disk.raw"
    else:
        reference = tmp_path / "reference.raw"
        imgs.qemu_img("convert", "-f", qemu_format(kind), "-O", "raw", image, reference)
    imgs.qemu_img("compare", "-f", "raw", "-F", "raw", reference, stored)
    assert stored.stat().st_size == reference.stat().st_size
    # sparse: the zero run is a hole, not written
    assert stored.stat().st_blocks * 512 <= stored.stat().st_size - 4 * MiB
    assert len(started) == (0 if kind in ("raw", "vhd-fixed") else 1), started


def test_a_stream_vmdk_with_a_grain_beyond_its_capacity_fails_corrupt_and_leaves_no_image(
    cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    image = sf.grain_beyond_capacity(tmp_path / "hostile.vmdk")
    moto.client("s3").upload_file(str(image), bucket, "hostile.vmdk")
    done = run_import(cfg, DiskContainer(format="VMDK", bucket=bucket, key="hostile.vmdk"), snapshot=True)
    assert (done.state, done.error_code) == (TaskState.FAILED, "CorruptImage"), done.error_message
    images = Path(cfg.targets["image"]["directory"])
    assert not images.exists() or list(images.iterdir()) == []
    assert ScratchSpace.from_config(cfg).peak() == 0


def test_a_random_access_format_goes_through_scratch_and_its_conversion_reports_bytes_rate_and_eta(
    cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    raw = raw_disk(tmp_path)
    image = tmp_path / "disk.vhdx"
    imgs.qemu_img("convert", "-f", "raw", "-O", "vhdx", raw, image)
    moto.client("s3").upload_file(str(image), bucket, "disk.vhdx")
    container = DiskContainer(format="VHDX", bucket=bucket, key="disk.vhdx")
    done, events = run_import_with_events(cfg, container, snapshot=True)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert "streamed" not in done.result["disk"]
    assert ScratchSpace.from_config(cfg).peak() >= image.stat().st_size
    imgs.qemu_img("compare", "-f", "raw", "-F", "raw", raw, outcome(done)["location"]["path"])
    # the qemu-img stage reports like the streamed stages: bytes read and written, rate, ETA; 100 %
    # only in its last report, once the output is flushed
    converting = [e.data for e in events if e.kind == "step.progress" and e.data.get("phase") == "converting"]
    assert converting and all({"read", "written", "rate", "eta"} <= p.keys() for p in converting)
    assert converting[-1]["percent"] == 100.0 and converting[-1]["written"] == raw.stat().st_size
    assert converting[-1]["read"] == image.stat().st_size
    assert max(p["percent"] or 0 for p in converting[:-1]) <= 99.0


#: guest disks that are not what a RAW input may be, but what a VMDK's or VHD's guest may hold
GUESTS = ("tar", "live-iso")


def guest_source(kind: str, directory: Path, guest: str = "tar") -> tuple[Path, str, Path]:
    """A ``kind`` (``vmdk-stream``, ``vhd-fixed``) of a 16 MiB disk whose content (``guest``) is a data disk
    written by ``tar -cf /dev/sdX`` (a tar at its first sector) or a bootable hybrid ISO written to the disk
    as to a USB stick (``dd if=live.iso of=/dev/sdX``); the image, its claim and the disk inside."""
    if guest == "tar":
        raw = raw_disk(directory)
        packed = directory / "data.tar"
        subprocess.run(["tar", "-cf", str(packed), "-C", str(directory), raw.name], check=True)
    else:
        packed = imgs.iso_hybrid(directory, "live.iso")
    with open(packed, "r+b") as f:
        f.truncate(16 * MiB)
    image = directory / ("disk.vmdk" if kind == "vmdk-stream" else "disk.vhd")
    options = "subformat=streamOptimized" if kind == "vmdk-stream" else "subformat=fixed"
    imgs.qemu_img("convert", "-f", "raw", "-O", qemu_format(kind), "-o", options, packed, image)
    return image, "VMDK" if kind == "vmdk-stream" else "VHD", packed


@pytest.mark.parametrize("guest", GUESTS)
@pytest.mark.parametrize("kind", ["vmdk-stream", "vhd-fixed"])
def test_a_container_whose_guest_disk_is_a_tar_or_a_live_iso_streams_as_its_conversion_would(
    kind: str, guest: str, cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """Inside a VMDK or VHD a tar at the first sector or an ISO is a guest's disk, not an archive or an ISO
    given as a RAW disk: the stream's written disk is a conversion's output (the scratch path's conversion
    does not refuse it either), and a fixed VHD is its footer's, not its first sector's."""
    src = tmp_path / "src"
    src.mkdir()
    image, claim, packed = guest_source(kind, src, guest)
    moto.client("s3").upload_file(str(image), bucket, image.name)
    done = run_import(cfg, DiskContainer(format=claim, bucket=bucket, key=image.name), snapshot=True)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.result["disk"]["streamed"]["stream"]["decoder"] is not None
    imgs.qemu_img("compare", "-f", "raw", "-F", "raw", packed, outcome(done)["location"]["path"])
