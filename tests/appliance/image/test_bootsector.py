"""A bare FAT/NTFS volume's boot record is not a partition table (appliance.image.bootsector).

Real mkfs.ntfs and mkfs.fat volumes are inspected and converted into and out of every container as
raw, while invalid partition tables are still rejected, as input and as conversion output."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from oslo_utils.imageutils import format_inspector as fi

from appliance import config as config_mod
from appliance.config import Config
from appliance.errors import ConversionFailed, ImageRejected
from appliance.guest import validate_image
from appliance.image import bootsector
from appliance.image.convert import convert_image
from appliance.image.inspect import inspect_image
from appliance.image.stream import RawStreamCheck
from tests import imagefactory as factory

QEMU_IMG = factory.QEMU_IMG

#: volumes oslo's inspector takes for a broken MBR: name → (builder, oslo's complaint, filesystem)
VOLUMES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "ntfs": (lambda d: factory.ntfs_volume(d, "ntfs.raw"), "GPT MBR has no partitions defined", "ntfs"),
    "ntfs-windows-boot-code": (
        lambda d: factory.ntfs_volume(d, "ntfs-windows.raw", windows_boot_code=True),
        "MBR PTE 0 has invalid boot flag",
        "ntfs",
    ),
    "vfat-floppy": (
        lambda d: factory.vfat_volume(d, "floppy.raw", 1440),
        "GPT MBR has no partitions defined",
        "vfat",
    ),
    "vfat-one-fat-long-boot-message": (
        lambda d: factory.vfat_volume(d, "message.raw", fats=1, boot_message=True),
        "MBR PTE 0 has invalid boot flag",
        "vfat",
    ),
}
#: mkfs.fat --mbr=y: one active entry from LBA 0 over the whole volume, which oslo accepts as an MBR
SELF_DESCRIBING = "vfat-entry-describing-itself"
#: containers: name → (qemu-img output format, options, claimed format)
CONTAINERS = {
    "raw": ("raw", None, "raw"),
    "qcow2": ("qcow2", None, "qcow2"),
    "vmdk-sparse": ("vmdk", "subformat=monolithicSparse", "vmdk"),
    "vmdk-stream": ("vmdk", "subformat=streamOptimized", "vmdk"),
    "vhd-dynamic": ("vpc", "subformat=dynamic,force_size=on", "vhd"),
    "vhd-fixed": ("vpc", "subformat=fixed,force_size=on", "vhd"),
    "vhdx": ("vhdx", None, "vhdx"),
}
#: what convert_image writes for each container: name → (to_format, subformat); vmdk-sparse input is
#: written as vmdk (stream-optimized, the only vmdk output)
OUTPUTS = {
    "raw": ("raw", None),
    "qcow2": ("qcow2", None),
    "vmdk-sparse": ("vmdk", None),
    "vmdk-stream": ("vmdk", None),
    "vhd-dynamic": ("vhd", "dynamic"),
    "vhd-fixed": ("vhd", "fixed"),
    "vhdx": ("vhdx", None),
}
#: raw disks whose sector 0 is an invalid partition table: name → (builder, oslo's complaint)
INVALID_TABLES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "invalid-boot-flag": (lambda d: factory.raw_mbr(d, "bad-flag.raw", boot_flag=0x12), "invalid boot flag"),
    "ntfs-name-without-ntfs": (factory.mbr_claiming_ntfs, "invalid boot flag"),
    "fat-volume-with-bad-protective-entry": (factory.fat_volume_with_partition_table, "invalid start LBA"),
    # an empty label is accepted only while its entries are all zero: a boot flag of 0x12 is still invalid
    "empty-label-with-bad-boot-flag": (
        lambda d: factory.patch(factory.empty_label(d, "parted", "bad-empty.raw"), 0x1BE, b"\x12"),
        "invalid boot flag",
    ),
}
#: tools that write an empty MBR partition table on a fresh data disk
LABELLERS = ("parted", "sfdisk")
#: containers an empty-labelled disk is imported in (see :data:`CONTAINERS`)
LABEL_CONTAINERS = ("raw", "qcow2", "vmdk-sparse", "vmdk-stream", "vhd-dynamic", "vhd-fixed")


@pytest.fixture(scope="session")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each volume built once (raw): :data:`VOLUMES` and :data:`SELF_DESCRIBING`."""
    d = tmp_path_factory.mktemp("volumes")
    built = {name: build(d) for name, (build, _, _) in VOLUMES.items()}
    built[SELF_DESCRIBING] = factory.vfat_volume(d, "fake-mbr.raw", fats=1, fake_mbr=True)
    return built


@pytest.fixture(scope="session")
def containers(
    volumes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """Each volume converted once into each container by qemu-img: (volume, container) → image."""
    d = tmp_path_factory.mktemp("volume-containers")
    out = {}
    for volume in VOLUMES:
        raw = volumes[volume]
        for name, (qemu_format, options, _) in CONTAINERS.items():
            if name == "raw":
                out[volume, name] = raw
                continue
            path = d / f"{volume}.{name}"
            factory.qemu_img(
                "convert", "-f", "raw", "-O", qemu_format, *(["-o", options] if options else []), raw, path
            )
            out[volume, name] = path
    return out


@pytest.fixture(scope="session")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """An empty-labelled disk of each tool in each of :data:`LABEL_CONTAINERS`: (tool, container) → image."""
    d = tmp_path_factory.mktemp("empty-labels")
    out = {}
    for tool in LABELLERS:
        raw = factory.empty_label(d, tool)
        for name in LABEL_CONTAINERS:
            qemu_format, options, _ = CONTAINERS[name]
            path = raw if name == "raw" else d / f"{tool}.{name}"
            if name != "raw":
                factory.qemu_img(
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    qemu_format,
                    *(["-o", options] if options else []),
                    raw,
                    path,
                )
            out[tool, name] = path
    return out


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)


def oslo_complaint(path: Path) -> str | None:
    """What oslo's inspectors alone say about ``path``: the safety failure of its single match, or None."""
    with open(path, "rb") as f:
        wrapper = fi.InspectWrapper(f)
        while wrapper.read(64 * 1024) and wrapper.formats is None:
            pass
        wrapper.close()
    (inspector,) = wrapper.formats
    try:
        inspector.safety_check()
    except fi.SafetyCheckFailed as exc:
        return "; ".join(str(e) for e in exc.failures.values())
    return None


def identical(a: Path, fmt_a: str, b: Path, fmt_b: str) -> bool:
    res = subprocess.run(
        [QEMU_IMG, "compare", "-f", fmt_a, "-F", fmt_b, a, b], capture_output=True, text=True
    )
    assert res.returncode in (0, 1), res.stderr
    return res.returncode == 0


def qemu_name(claimed: str) -> str:
    return "vpc" if claimed == "vhd" else claimed


# ------------------------------------------------------------------------------------ what sector 0 is


@pytest.mark.parametrize("volume", list(VOLUMES))
def test_volume_boot_record_is_not_a_partition_table(volume: str, volumes: dict[str, Path]) -> None:
    _, complaint, filesystem = VOLUMES[volume]
    path = volumes[volume]
    # control: oslo alone rejects the volume, so the acceptance below is the distinction's doing
    assert complaint in (oslo_complaint(path) or "")
    boot = bootsector.classify(path.read_bytes()[:512])
    assert boot == bootsector.BootSector(table=None, filesystem=filesystem) and boot.volume == filesystem


def test_fat_entry_describing_the_volume_itself_is_not_a_partition_table(volumes: dict[str, Path]) -> None:
    path = volumes[SELF_DESCRIBING]
    (entry, *unused) = bootsector.partition_entries(path.read_bytes()[:512])
    assert (entry.boot, entry.start_lba) == (0x80, 0) and not any(e.used for e in unused)
    assert bootsector.classify(path.read_bytes()[:512]).volume == "vfat"


@pytest.mark.parametrize("case", list(INVALID_TABLES))
def test_invalid_partition_table_is_a_partition_table(case: str, tmp_path: Path) -> None:
    build, _ = INVALID_TABLES[case]
    assert bootsector.classify(build(tmp_path).read_bytes()[:512]).table in ("mbr", "gpt")


def test_partitioned_disk_and_unformatted_sector_are_not_volumes(tmp_path: Path) -> None:
    mbr = bootsector.classify(factory.raw_mbr(tmp_path).read_bytes()[:512])
    assert mbr == bootsector.BootSector(table="mbr", filesystem=None)
    protective = factory.mbr([(0x00, 0xEE, 1, 0xFFFFFFFF)])
    assert bootsector.classify(protective) == bootsector.BootSector(table="gpt", filesystem=None)
    assert bootsector.classify(bytes(512)) == bootsector.BootSector(table=None, filesystem=None)


@pytest.mark.parametrize("tool", LABELLERS)
def test_empty_label_is_an_empty_partition_table(tool: str, labelled: dict[tuple[str, str], Path]) -> None:
    path = labelled[tool, "raw"]
    # control: oslo alone refuses it, so the acceptances below are the empty-table rule's doing
    assert "GPT MBR has no partitions defined" in (oslo_complaint(path) or "")
    sector = path.read_bytes()[:512]
    assert bootsector.empty_table(sector)
    assert bootsector.classify(sector) == bootsector.BootSector(table="mbr", filesystem=None)
    assert not bootsector.empty_table(
        factory.raw_mbr(path.parent, f"{tool}-partitioned.raw").read_bytes()[:512]
    )


# ------------------------------------------------------------------------------------------- inspection


@pytest.mark.parametrize("claim", ["raw", None], ids=["claimed-raw", "unclaimed"])
@pytest.mark.parametrize("volume", list(VOLUMES))
def test_raw_bare_volume_input_is_accepted_as_raw(
    volume: str, claim: str | None, volumes: dict[str, Path], config: Config, tmp_path: Path
) -> None:
    result = inspect_image(volumes[volume], claim, config=config, workdir=tmp_path)
    assert result.safe, result.findings
    assert (result.format, result.qemu_format) == ("raw", "raw")
    assert result.details["volume_boot_record"] == VOLUMES[volume][2]
    assert "partition_table" not in result.details


@pytest.mark.parametrize("case", list(INVALID_TABLES))
def test_invalid_partition_table_input_is_still_rejected(case: str, config: Config, tmp_path: Path) -> None:
    build, complaint = INVALID_TABLES[case]
    result = inspect_image(build(tmp_path), "raw", config=config, workdir=tmp_path)
    assert [f.code for f in result.errors] == ["UnsafeImage.PartitionTable"]
    assert complaint in result.errors[0].message


@pytest.mark.parametrize("container", LABEL_CONTAINERS)
@pytest.mark.parametrize("tool", LABELLERS)
def test_empty_labelled_data_disk_is_accepted_in_every_container(
    tool: str, container: str, labelled: dict[tuple[str, str], Path], config: Config, tmp_path: Path
) -> None:
    claimed = CONTAINERS[container][2]
    result = inspect_image(labelled[tool, container], claimed, config=config, workdir=tmp_path)
    assert result.safe, result.findings
    assert result.format == claimed
    if container == "raw":
        assert result.details["partition_table"] == "mbr"


@pytest.mark.parametrize("tool", LABELLERS)
def test_empty_labelled_disk_streamed_as_a_raw_upload_passes_the_stream_check(
    tool: str, labelled: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    # the check RAW volume uploads and bundles get as they stream past (no file to inspect)
    def verdict(path: Path) -> list[str]:
        check = RawStreamCheck()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                check.eat(chunk)
        return [f.code for f in check.verdict()]

    assert verdict(labelled[tool, "raw"]) == []
    build, _ = INVALID_TABLES["empty-label-with-bad-boot-flag"]
    assert verdict(build(tmp_path)) == ["UnsafeImage.PartitionTable"]


# ------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("container", LABEL_CONTAINERS)
@pytest.mark.parametrize("tool", LABELLERS)
def test_empty_labelled_data_disk_converts_out_of_and_into_every_container(
    tool: str, container: str, labelled: dict[tuple[str, str], Path], config: Config, tmp_path: Path
) -> None:
    raw = labelled[tool, "raw"]
    claimed = CONTAINERS[container][2]
    # out of the container: the raw output, checked as such, is the empty table again
    out = convert_image(
        labelled[tool, container], tmp_path / "out.raw", "raw", claimed, config=config, workdir=tmp_path
    )
    assert out.output.safe and out.output.details["partition_table"] == "mbr"
    assert identical(out.dst, "raw", raw, "raw")
    to_format, subformat = OUTPUTS[container]
    back = convert_image(
        raw,
        tmp_path / f"back.{container}",
        to_format,
        "raw",
        config=config,
        workdir=tmp_path,
        subformat=subformat,
    )
    assert back.output.safe and back.output.format == to_format
    assert identical(back.dst, qemu_name(to_format), raw, "raw")


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("volume", list(VOLUMES))
def test_bare_volume_converts_from_and_into_every_container(
    volume: str,
    container: str,
    volumes: dict[str, Path],
    containers: dict[tuple[str, str], Path],
    config: Config,
    tmp_path: Path,
) -> None:
    raw = volumes[volume]
    claimed = CONTAINERS[container][2]
    # out of the container: the raw output starts with the volume boot record again
    out = convert_image(
        containers[volume, container], tmp_path / "out.raw", "raw", claimed, config=config, workdir=tmp_path
    )
    assert out.output.details["volume_boot_record"] == VOLUMES[volume][2]
    assert identical(out.dst, "raw", raw, "raw")
    # into the container: the output (for a fixed VHD, raw data and a footer) is checked as that format
    to_format, subformat = OUTPUTS[container]
    back = convert_image(
        raw,
        tmp_path / f"back.{container}",
        to_format,
        "raw",
        config=config,
        workdir=tmp_path,
        subformat=subformat,
    )
    assert back.output.safe and back.output.format == to_format
    assert identical(back.dst, qemu_name(to_format), raw, "raw")


@pytest.mark.parametrize("volume", list(VOLUMES))
def test_imaging_convert_cli_writes_a_bare_volume_from_qcow2_to_raw(
    volume: str, containers: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "IMAGING_CONFIG"}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")  # the embedded defaults keep their state here
    dst = tmp_path / "volume.raw"
    argv = [
        sys.executable,
        "-m",
        "appliance.cli",
        "convert",
        containers[volume, "qcow2"],
        dst,
        "--to",
        "raw",
    ]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert identical(dst, "raw", containers[volume, "raw"], "raw")


@pytest.mark.parametrize("to_format", [("raw", None), ("vhd", "fixed")], ids=["raw", "vhd-fixed"])
@pytest.mark.parametrize("case", list(INVALID_TABLES))
def test_invalid_partition_table_output_is_still_rejected(
    case: str, to_format: tuple[str, str | None], config: Config, tmp_path: Path
) -> None:
    # qcow2 input is not checked as an MBR (its sector 0 is the qcow2 header): the output check must catch it
    build, complaint = INVALID_TABLES[case]
    qcow2 = tmp_path / "table.qcow2"
    factory.qemu_img("convert", "-f", "raw", "-O", "qcow2", build(tmp_path), qcow2)
    dst = tmp_path / "out.img"
    fmt, subformat = to_format
    with pytest.raises(ConversionFailed) as exc:
        convert_image(qcow2, dst, fmt, "qcow2", config=config, workdir=tmp_path, subformat=subformat)
    assert exc.value.code == "ConversionFailed.UnsafeOutput"
    assert "UnsafeImage.PartitionTable" in exc.value.message and complaint in exc.value.message
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.img")]


def test_rejected_invalid_table_input_is_not_converted(config: Config, tmp_path: Path) -> None:
    dst = tmp_path / "out.qcow2"
    with pytest.raises(ImageRejected) as exc:
        convert_image(
            factory.mbr_claiming_ntfs(tmp_path), dst, "qcow2", "raw", config=config, workdir=tmp_path
        )
    assert exc.value.code == "UnsafeImage.PartitionTable" and not dst.exists()


# -------------------------------------------------------------------------------------- guest validation


@pytest.mark.parametrize("volume", [*VOLUMES, SELF_DESCRIBING])
def test_guest_reader_sees_a_volume_boot_record_as_a_bare_filesystem(
    volume: str, volumes: dict[str, Path]
) -> None:
    report = validate_image(volumes[volume], bootable=False)
    kind = VOLUMES[volume][2] if volume in VOLUMES else "vfat"
    assert (report.layout, report.partition_table) == ("partition", None)
    (part,) = report.partitions
    assert (part["filesystem"], part["label"]) == (kind, "DATA")
