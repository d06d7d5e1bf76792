"""The export entry point (appliance.targets.diskexport.export_disk) as other readers see its output: a VHD
(dynamic and fixed) and a stream-optimized VMDK written to a file and to S3 (the moto server process) read
back whole as the source's bytes through dissect.hypervisor's readers and libyal's libvhdi and libvmdk
(tests/diskreaders.py), a VHD's footer and dynamic header hold what the specification says, and a RAW
export is the source's bytes; for a disk of one sector, one of an odd size, one with data only at its
start and in its last block, and a 300 MiB filesystem."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.config import Config
from appliance.targets.diskexport import ExportResult, export_disk
from appliance.targets.exportdest import FileDestination, S3Destination
from tests import diskreaders as readers
from tests.appliance.targets.test_device import loop_device
from tests.appliance.targets.test_diskexport import s3

MiB = readers.MiB
#: (format, subformat, the readers' name of what they find)
FORMATS = [("vhd", "dynamic", "dynamic"), ("vhd", "fixed", "fixed"), ("vmdk", None, "streamOptimized")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("sources")
    return {case: readers.case_disk(directory, case) for case in readers.CASES}


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)


def check(
    out: Path, src: Path, fmt: str, subformat: str | None, kind: str, written: tuple[float, float]
) -> None:
    """``out`` reads back as ``src`` through every reader; a VHD's metadata follows the specification."""
    source = readers.source(src)
    if fmt == "vhd":
        assert readers.vhd_problems(out, source.size, str(subformat), written) == []
    seen = {name: (r.size, r.sha256, r.disk_type) for name, r in readers.read_by_each(out, fmt).items()}
    assert seen == {name: (source.size, source.sha256, kind) for name in readers.READERS}


@pytest.mark.parametrize("case", readers.CASES)
@pytest.mark.parametrize("fmt,subformat,kind", FORMATS, ids=["vhd-dynamic", "vhd-fixed", "vmdk"])
def test_an_export_to_a_file_reads_back_as_the_source_through_each_independent_reader(
    fmt: str,
    subformat: str | None,
    kind: str,
    case: str,
    sources: dict[str, Path],
    tmp_path: Path,
    cfg: Config,
) -> None:
    out = tmp_path / f"export-i-0123456789abcdef0.{fmt}"
    work = tmp_path / "work"
    work.mkdir()
    started = time.time()
    result = export_disk(
        sources[case], fmt, FileDestination(out), config=cfg, workdir=work, subformat=subformat
    )
    assert result.size == out.stat().st_size
    check(out, sources[case], fmt, subformat, kind, (started, time.time()))


@pytest.mark.parametrize("case", readers.CASES)
@pytest.mark.parametrize("fmt,subformat,kind", FORMATS, ids=["vhd-dynamic", "vhd-fixed", "vmdk"])
def test_an_export_to_s3_reads_back_as_the_source_through_each_independent_reader(
    fmt: str,
    subformat: str | None,
    kind: str,
    case: str,
    sources: dict[str, Path],
    tmp_path: Path,
    cfg: Config,
    moto,
    bucket: str,
) -> None:
    key = f"exports/export-i-{uuid.uuid4().hex[:17]}.{fmt}"
    dest = S3Destination(s3(moto), bucket, key, part_size=5 * MiB, threads=2)
    work = tmp_path / "work"
    work.mkdir()
    started = time.time()
    result = export_disk(sources[case], fmt, dest, config=cfg, workdir=work, subformat=subformat)
    # downloaded under the object's own name (a VMDK's embedded descriptor names its extent after it)
    out = tmp_path / key.rsplit("/", 1)[-1]
    moto.client("s3").download_file(bucket, key, str(out))
    assert result.size == out.stat().st_size
    check(out, sources[case], fmt, subformat, kind, (started, time.time()))


@pytest.mark.parametrize("case", readers.CASES)
def test_a_raw_export_to_a_file_and_to_s3_is_the_sources_bytes(
    case: str, sources: dict[str, Path], tmp_path: Path, cfg: Config, moto, bucket: str
) -> None:
    source = readers.source(sources[case])
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "disk.raw"
    results: list[ExportResult] = [
        export_disk(sources[case], "raw", FileDestination(out), config=cfg, workdir=work, full_sha256=True)
    ]
    dest = S3Destination(s3(moto), bucket, "disk.raw", part_size=5 * MiB, threads=2)
    results.append(export_disk(sources[case], "raw", dest, config=cfg, workdir=work, full_sha256=True))
    back = tmp_path / "back.raw"
    moto.client("s3").download_file(bucket, "disk.raw", str(back))
    assert [readers.source(out), readers.source(back)] == [source, source]
    assert [r.sha256 for r in results] == [source.sha256] * 2


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_a_vhd_of_a_block_device_written_by_qemu_img_reads_back_through_each_independent_reader(
    subformat: str, sources: dict[str, Path], tmp_path: Path, cfg: Config
) -> None:
    src = sources["odd-size"]
    source = readers.source(src)
    out = tmp_path / f"device.{subformat}.vhd"
    work = tmp_path / "work"
    work.mkdir()
    with loop_device(tmp_path / "backing.img", source.size) as dev:
        with open(dev, "r+b") as d:
            d.write(src.read_bytes())
        export_disk(dev, "vhd", FileDestination(out), config=cfg, workdir=work, subformat=subformat)
    seen = {name: (r.size, r.sha256, r.disk_type) for name, r in readers.read_by_each(out, "vhd").items()}
    assert seen == {name: (source.size, source.sha256, subformat) for name in readers.READERS}
    # qemu-img's force_size writes the largest geometry (65535/16/255: 127 GiB to a reader that sizes a
    # disk by its geometry); the export gives its footers the specification's, checksums and all
    assert readers.vhd_problems(out, source.size, subformat) == []
