"""Export writers (appliance.targets.diskexport, .exportraw, .exportvhd, .exportdest, .s3stream): a RAW
disk written as streamOptimized VMDK, VHD (dynamic and fixed) or RAW, to a file and to S3 through a moto
server process; the output reads back identical with the real qemu-img; S3 objects carry their sha256 and
a verified ETag; a cancel or failure mid-upload leaves no object and no incomplete multipart upload."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.config import Config
from appliance.errors import Cancelled
from appliance.targets.diskexport import export_disk
from appliance.targets.exportdest import FileDestination, S3Destination
from appliance.targets.exportvhd import streams_vhd
from tests import imagefactory as factory
from tests.appliance.targets.test_device import loop_device
from tests.servers import REGION

MiB = factory.MiB


def qemu(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([factory.QEMU_IMG, *map(str, args)], capture_output=True)


def source_disk(path: Path, size: int = 24 * MiB, seed: int = 3) -> Path:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for at in (0, 3 * MiB + 17, 11 * MiB, size - 5000):
            f.seek(at)
            f.write(rnd.randbytes(3000) + b"text " * 2000)
    with open(path, "r+b") as f:
        f.truncate(size)
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return source_disk(tmp_path / "disk.raw")


def s3(moto) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def bucket(moto) -> str:
    name = f"export-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


def leftovers(moto, bucket: str) -> tuple[int, list[Any]]:
    c = moto.client("s3")
    return c.list_objects_v2(Bucket=bucket).get("KeyCount", 0), c.list_multipart_uploads(Bucket=bucket).get(
        "Uploads", []
    )


# ----------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    "fmt,subformat,qemu_fmt,create_type",
    [
        ("vmdk", None, "vmdk", "streamOptimized"),
        ("vhd", None, "vpc", None),
        ("vhd", "fixed", "vpc", None),
        ("raw", None, "raw", None),
    ],
)
def test_each_format_reads_back_as_the_source(
    fmt: str,
    subformat: str | None,
    qemu_fmt: str,
    create_type: str | None,
    tmp_path: Path,
    cfg: Config,
    workdir: Path,
    disk: Path,
) -> None:
    out = tmp_path / f"out.{fmt}"
    result = export_disk(disk, fmt, FileDestination(out), config=cfg, workdir=workdir, subformat=subformat)
    info = json.loads(qemu("info", "-f", qemu_fmt, "--output=json", out).stdout)
    assert info["virtual-size"] == disk.stat().st_size
    if create_type:
        assert info["format-specific"]["data"]["create-type"] == create_type
    if fmt == "vhd":
        assert result.subformat == (subformat or "dynamic")
        # a dynamic VHD is much smaller than the disk, a fixed one the disk plus its footer
        assert (out.stat().st_size == disk.stat().st_size + 512) == (subformat == "fixed")
    cmp = qemu("compare", "-f", "raw", "-F", qemu_fmt, disk, out)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest() and result.size == out.stat().st_size
    assert os.listdir(tmp_path / "work") == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial left


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_a_vhd_of_a_regular_file_streams_and_of_a_block_device_goes_through_qemu_img(
    subformat: str, tmp_path: Path, cfg: Config, workdir: Path, disk: Path
) -> None:
    # a regular file: the project's VHD writer, identical to the source
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert streams_vhd(fd, disk.stat().st_size)
    finally:
        os.close(fd)
    out = tmp_path / "file.vhd"
    export_disk(disk, "vhd", FileDestination(out), config=cfg, workdir=workdir, subformat=subformat)
    assert qemu("compare", "-f", "raw", "-F", "vpc", disk, out).returncode == 0
    # a block device has no data map: qemu-img writes it (into the partial file), identical too
    with loop_device(tmp_path / "backing.img", disk.stat().st_size) as dev:
        with open(dev, "r+b") as d:
            d.write(disk.read_bytes())
        fd = os.open(dev, os.O_RDONLY)
        try:
            assert not streams_vhd(fd, disk.stat().st_size)
        finally:
            os.close(fd)
        from_device = tmp_path / "device.vhd"
        export_disk(
            dev, "vhd", FileDestination(from_device), config=cfg, workdir=workdir, subformat=subformat
        )
    assert qemu("compare", "-f", "raw", "-F", "vpc", disk, from_device).returncode == 0
    assert os.listdir(workdir) == []


def test_a_cancelled_file_export_leaves_nothing(tmp_path: Path, cfg: Config, workdir: Path) -> None:
    src = tmp_path / "random.raw"
    src.write_bytes(os.urandom(40 * MiB))
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        export_disk(
            src,
            "vmdk",
            FileDestination(tmp_path / "out.vmdk"),
            config=cfg,
            workdir=workdir,
            threads=1,
            cancel=cancel,
            on_progress=lambda p: cancel.set(),
        )
    assert not (tmp_path / "out.vmdk").exists()
    assert not any(p.name.startswith(".out.vmdk") for p in tmp_path.iterdir())  # no partial either


# -------------------------------------------------------------------------------------------------- S3


def test_a_vmdk_streams_to_s3_with_its_sha256_and_a_verified_etag(
    tmp_path: Path, cfg: Config, workdir: Path, moto, bucket: str
) -> None:
    src = tmp_path / "random.raw"
    src.write_bytes(os.urandom(14 * MiB))  # incompressible: the stream spans three 5 MiB parts
    dest = S3Destination(
        s3(moto), bucket, "exports/export-i-0123456789abcdef0.vmdk", part_size=5 * MiB, threads=2
    )
    result = export_disk(src, "vmdk", dest, config=cfg, workdir=workdir)
    obj = moto.client("s3").get_object(Bucket=bucket, Key=dest.key)
    body = obj["Body"].read()
    assert hashlib.sha256(body).hexdigest() == result.sha256 == obj["Metadata"]["sha256"]
    assert result.location["parts"] == 3 and len(body) == result.size
    (tmp_path / "back.vmdk").write_bytes(body)
    assert qemu("compare", "-f", "raw", "-F", "vmdk", src, tmp_path / "back.vmdk").returncode == 0
    assert leftovers(moto, bucket) == (1, [])
    assert os.listdir(workdir) == []  # streamed: no scratch copy


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_raw_and_vhd_go_to_s3(
    fmt: str, tmp_path: Path, cfg: Config, workdir: Path, disk: Path, moto, bucket: str
) -> None:
    dest = S3Destination(s3(moto), bucket, f"e.{fmt}", part_size=5 * MiB, threads=2)
    result = export_disk(disk, fmt, dest, config=cfg, workdir=workdir)
    body = moto.client("s3").get_object(Bucket=bucket, Key=f"e.{fmt}")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == result.sha256
    (tmp_path / "back").write_bytes(body)
    assert (
        qemu(
            "compare", "-f", "raw", "-F", "vpc" if fmt == "vhd" else "raw", disk, tmp_path / "back"
        ).returncode
        == 0
    )
    assert os.listdir(workdir) == []


def test_cancel_mid_upload_leaves_no_object_and_no_upload(
    tmp_path: Path, cfg: Config, workdir: Path, moto, bucket: str
) -> None:
    src = tmp_path / "random.raw"
    src.write_bytes(os.urandom(24 * MiB))
    cancel = threading.Event()
    client = s3(moto)
    parts: list[int] = []
    real_upload = client.upload_part

    def upload_part(**kw: Any) -> Any:  # a real upload; the cancel comes once the first part is stored
        answer = real_upload(**kw)
        parts.append(kw["PartNumber"])
        cancel.set()
        return answer

    client.upload_part = upload_part
    dest = S3Destination(client, bucket, "c.vmdk", part_size=5 * MiB, threads=1, cancel=cancel)
    with pytest.raises(Cancelled):
        export_disk(src, "vmdk", dest, config=cfg, workdir=workdir, threads=1)
    assert parts  # it was mid-upload
    assert leftovers(moto, bucket) == (0, [])


# --------------------------------------------------------------------------------------------- digests


def chunked_reference(data: bytes, chunk: int) -> str:
    """sha256-chunked, computed here from its definition with hashlib."""
    digests = [hashlib.sha256(data[i : i + chunk]).digest() for i in range(0, len(data), chunk)]
    return hashlib.sha256(b"".join(digests)).hexdigest()


@pytest.mark.parametrize("fmt,subformat", [("vmdk", None), ("vhd", None), ("vhd", "fixed"), ("raw", None)])
def test_the_recorded_digest_is_the_chunked_sha256_of_the_written_file_and_a_flipped_byte_breaks_it(
    fmt: str, subformat: str | None, tmp_path: Path, cfg: Config, workdir: Path, disk: Path
) -> None:
    out = tmp_path / f"out.{fmt}"
    result = export_disk(
        disk,
        fmt,
        FileDestination(out, chunk_size=MiB),
        config=cfg,
        workdir=workdir,
        subformat=subformat,
        full_sha256=False,
    )
    body = out.read_bytes()
    digest = result.digest
    assert digest["algorithm"] == "sha256-chunked" and digest["chunk_size"] == MiB
    assert digest["value"] == chunked_reference(body, MiB) and digest["chunks"] == -(-len(body) // MiB)
    assert result.sha256 is None  # not asked for, and the disk is not a VMDK
    flipped = bytearray(body)
    flipped[len(body) // 2] ^= 0x01
    assert chunked_reference(bytes(flipped), MiB) != digest["value"]


def test_a_raw_export_of_a_huge_sparse_disk_hashes_only_the_chunk_with_data(
    tmp_path: Path, cfg: Config, workdir: Path
) -> None:
    # a 1 TiB disk with 2 MiB of data: hashing its zeros (the old digest) would take many minutes
    src = tmp_path / "huge.raw"
    data = os.urandom(2 * MiB)
    with open(src, "wb") as f:
        f.truncate(1 << 40)
        f.seek(130 * MiB)
        f.write(data)
    out = tmp_path / "huge.out"
    result = export_disk(src, "raw", FileDestination(out), config=cfg, workdir=workdir)
    digest = result.digest
    assert digest["chunk_size"] == 64 * MiB and digest["chunks"] == 16384
    assert digest["zero_chunks"] == 16383 and digest["hashed_bytes"] == 64 * MiB
    with open(out, "rb") as f:
        f.seek(128 * MiB)
        chunk2 = f.read(64 * MiB)
    assert chunk2[2 * MiB : 4 * MiB] == data and out.stat().st_blocks * 512 < 16 * MiB  # holes stayed
    digests = [hashlib.sha256(bytes(64 * MiB)).digest()] * 16384
    digests[2] = hashlib.sha256(chunk2).digest()
    assert digest["value"] == hashlib.sha256(b"".join(digests)).hexdigest() and result.sha256 is None


@pytest.mark.parametrize("full", [False, True])
def test_an_s3_export_digest_is_s3s_own_composite_checksum(
    full: bool, tmp_path: Path, cfg: Config, workdir: Path, disk: Path, moto, bucket: str
) -> None:
    dest = S3Destination(s3(moto), bucket, "d.raw", part_size=5 * MiB, threads=2)
    result = export_disk(disk, "raw", dest, config=cfg, workdir=workdir, full_sha256=full)
    client = moto.client("s3")
    body = client.get_object(Bucket=bucket, Key="d.raw")["Body"].read()
    head = client.head_object(Bucket=bucket, Key="d.raw", ChecksumMode="ENABLED")
    digest = result.digest
    # five parts of 5 MiB (the last 4 MiB); the 2nd and 4th hold no data: not hashed
    assert digest["value"] == chunked_reference(body, 5 * MiB) and digest["chunks"] == 5
    assert digest["s3_verified"] is True and digest["zero_chunks"] == 2
    # S3's composite checksum (moto leaves out the "-N" of HeadObject): the same value
    value = base64.b64encode(bytes.fromhex(digest["value"])).decode()
    assert digest["s3_checksum_sha256"] == f"{value}-5"
    meta = head["Metadata"]
    assert meta["digest-algorithm"] == "sha256-chunked" and meta["digest-chunk-size"] == str(5 * MiB)
    if full:  # copied onto itself with the whole sha256, and S3's checksum of the copy is that sha256
        whole = hashlib.sha256(body).hexdigest()
        assert result.sha256 == meta["sha256"] == whole
        assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(whole)).decode()
    else:  # S3 verified the composite checksum: no copy, the metadata set when the upload started
        assert result.sha256 is None and "sha256" not in meta
        assert head["ChecksumSHA256"].partition("-")[0] == value
    assert leftovers(moto, bucket) == (1, [])
