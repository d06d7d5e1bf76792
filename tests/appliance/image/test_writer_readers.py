"""The VHD and stream-VMDK writers (appliance.image.vhdwriter, .vmdkwriter) as other readers see them: every
disk they write, from one sector to a 300 MiB filesystem, reads back whole as the source's bytes through
readers that are neither the project's nor qemu-img (dissect.hypervisor's, libyal's libvhdi and libvmdk:
tests/diskreaders.py), and a VHD's footer and dynamic header hold what the specification says they hold.
The checks themselves are shown to catch a wrong field and a wrong byte."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from appliance.image.vhdwriter import geometry, write_dynamic_vhd
from appliance.image.vmdkwriter import write_stream_vmdk
from tests import diskreaders as readers


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("sources")
    return {case: readers.case_disk(directory, case) for case in readers.CASES}


def write(writer: str, src: Path, dst: Path) -> None:
    fd = os.open(src, os.O_RDONLY)
    try:
        with open(dst, "wb") as out:
            if writer == "vhd":
                write_dynamic_vhd(fd, os.fstat(fd).st_size, out)
            else:  # the extent named as the file is (libvmdk finds the extent by that name)
                write_stream_vmdk(fd, os.fstat(fd).st_size, out, extent_name=dst.name, threads=2)
    finally:
        os.close(fd)


def read_by_each(path: Path, fmt: str) -> dict[str, tuple[int, str, str]]:
    """What each reader gives back: the disk's size, the sha256 of its bytes and its type."""
    return {name: (r.size, r.sha256, r.disk_type) for name, r in readers.read_by_each(path, fmt).items()}


@pytest.mark.parametrize("case", readers.CASES)
def test_each_independent_reader_reads_a_dynamic_vhd_back_as_the_source(
    case: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    src = readers.source(sources[case])
    out = tmp_path / "disk.vhd"
    started = time.time()
    write("vhd", sources[case], out)
    assert readers.vhd_problems(out, src.size, "dynamic", (started, time.time())) == []
    assert read_by_each(out, "vhd") == {name: (src.size, src.sha256, "dynamic") for name in readers.READERS}


@pytest.mark.parametrize("case", readers.CASES)
def test_each_independent_reader_reads_a_stream_vmdk_back_as_the_source(
    case: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    src = readers.source(sources[case])
    out = tmp_path / f"{case}.vmdk"
    write("vmdk", sources[case], out)
    expected = (src.size, src.sha256, "streamOptimized")
    assert read_by_each(out, "vmdk") == {name: expected for name in readers.READERS}


def digest_or_refusal(read: readers.Reader, path: Path, fmt: str) -> str:
    try:
        return read(path, fmt).sha256
    except Exception as exc:  # a reader may refuse a damaged grain outright (zlib's own checksum)
        return f"refused: {exc!r}"


def test_a_byte_changed_in_a_stored_block_or_grain_changes_what_each_reader_gives_back(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    # the readers follow the tables to the data: a byte flipped in the last block's data (VHD) or in a
    # grain's deflated bytes (VMDK) is what they read, not the source again
    src = sources["data-in-last-block"]
    good = readers.source(src).sha256
    vhd, vmdk = tmp_path / "disk.vhd", tmp_path / "disk.vmdk"
    write("vhd", src, vhd)
    write("vmdk", src, vmdk)
    data = bytearray(vhd.read_bytes())
    data[-600] ^= 0xFF  # in the last sector of the last stored block, before the footer
    vhd.write_bytes(bytes(data))
    # the first grain's marker is at sector 128 (the header's overHead), its deflated bytes after it
    data = bytearray(vmdk.read_bytes())
    lba, length = struct.unpack_from("<QI", data, 128 * 512)
    assert lba == 0 and length > 64
    data[128 * 512 + 12 + length // 2] ^= 0x10
    vmdk.write_bytes(bytes(data))
    for name, read in readers.READERS.items():
        assert digest_or_refusal(read, vhd, "vhd") != good, name
        assert digest_or_refusal(read, vmdk, "vmdk") != good, name


def test_the_specification_check_names_each_wrong_field(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "disk.vhd"
    write("vhd", sources["odd-size"], out)
    size = sources["odd-size"].stat().st_size
    good = out.read_bytes()

    def wrong(
        at: int, data: bytes, *, footers: bool = True, written: tuple[float, float] | None = None
    ) -> set[str]:
        """The fields found wrong once ``data`` replaces the bytes at ``at`` of the footer (both copies)
        or, ``footers`` false, at ``at`` of the file."""
        bad = bytearray(good)
        for base in (0, len(bad) - 512) if footers else (0,):
            bad[base + at : base + at + len(data)] = data
        out.write_bytes(bytes(bad))
        return {problem.split(":")[0] for problem in readers.vhd_problems(out, size, "dynamic", written)}

    assert wrong(0, b"") == set()
    # the geometry of a writer that forgot the specification's 4 heads at least: its checksum is stale too
    assert wrong(56, struct.pack(">HBB", 602, 1, 17)) == {"disk geometry", "footer checksum"}
    assert wrong(48, struct.pack(">Q", size + 512)) == {"current size", "footer checksum"}
    assert wrong(16, bytes(8), footers=False) == {"footer copy at offset 0"}
    # the table read from the wrong place: its entries are wrong as well
    assert {"table offset", "dynamic header checksum"} <= wrong(
        512 + 16, struct.pack(">Q", 1024), footers=False
    )
    # the time stamp checked against when the file was written: not in the first second of 1970
    assert wrong(0, b"", written=(0.0, 1.0)) == {"time stamp"}


@pytest.mark.parametrize(
    "sectors",
    [
        1,  # no whole cylinder: 0/4/17
        139263,  # 17 sectors per track, 8 heads
        139264,  # 8 x 1024 cylinders-times-heads of 17: 31 sectors per track
        507903,
        507904,  # 16 x 1024 of 31: 63 sectors per track
        65535 * 16 * 63 - 1,
        65535 * 16 * 63,  # 255 sectors per track
        (2040 << 30) // 512,  # the largest VHD: the geometry's cap, 65535/16/255
    ],
)
def test_the_writers_geometry_is_the_specifications_chs_on_each_side_of_its_steps(sectors: int) -> None:
    assert geometry(sectors * 512) == readers.chs(sectors * 512)
