"""The streaming VHD writer (appliance.image.vhdwriter): what it writes reads back identical through the real
qemu-img (info, compare) and through dissect's VHD reader (an independent implementation that follows the
block allocation table); the project's own inspection takes it as a safe VHD of the disk's size; holes are
not stored; the footer and header checksums are right; a cancel stops it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from dissect.hypervisor.disk.vhd import VHD

from appliance import config as config_mod
from appliance.errors import Cancelled, UsageError
from appliance.image.inspect import verify_output
from appliance.image.vhdwriter import BLOCK, footer, geometry, set_geometry, write_dynamic_vhd
from tests import imagefactory as factory
from tests.appliance.image.test_vmdkwriter import source_disk

MiB = factory.MiB


def write(src: Path, dst: Path, **kw: object) -> object:
    fd = os.open(src, os.O_RDONLY)
    try:
        with open(dst, "wb") as out:
            return write_dynamic_vhd(fd, os.fstat(fd).st_size, out, **kw)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def qemu(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([factory.QEMU_IMG, *map(str, args)], capture_output=True)


# not a multiple of the 2 MiB block (the last block is partial), data in four of the blocks
@pytest.mark.parametrize("size", [130 * MiB + 3 * 512, 64 * MiB])
def test_a_dynamic_vhd_reads_back_identical_through_qemu_img_and_dissect(tmp_path: Path, size: int) -> None:
    src = source_disk(tmp_path / "disk.raw", size)
    out = tmp_path / "disk.vhd"
    result = write(src, out)
    assert result.size == out.stat().st_size and result.virtual_size == size  # type: ignore[attr-defined]
    # holes are not stored: only the blocks holding data (the source's data map)
    assert out.stat().st_size < size // 4

    info = json.loads(qemu("info", "--output=json", "-f", "vpc", out).stdout)
    assert info["format"] == "vpc" and info["virtual-size"] == size
    compared = qemu("compare", "-f", "raw", "-F", "vpc", src, out)
    assert compared.returncode == 0, compared.stdout + compared.stderr

    with open(out, "rb") as f:
        disk = VHD(f)
        assert disk.size == size
        with open(src, "rb") as s:
            for at in (0, 5 * MiB, 33 * MiB - 100, size - 700, 2 * BLOCK + 17):
                disk.seek(at)
                s.seek(at)
                assert disk.read(4096) == s.read(4096)

    cfg = config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)
    inspected = verify_output(out, "vhd", config=cfg)
    assert inspected.virtual_size == size


def test_footer_checksum_and_geometry_follow_the_specification() -> None:
    data = footer(4 << 30, 3, unique_id=bytes(16), timestamp=946684800 + 5)
    assert len(data) == 512 and data[:8] == b"conectix" and data[28:32] == b"qem2"
    stored = int.from_bytes(data[64:68], "big")
    assert stored == ~sum(data[:64] + bytes(4) + data[68:]) & 0xFFFFFFFF
    assert int.from_bytes(data[48:56], "big") == 4 << 30
    # the specification's worked limits: 127 GiB and beyond use 255 sectors per track
    assert geometry(4 << 30) == (8322, 16, 63)
    assert geometry(200 << 30)[1:] == (16, 255)


def test_a_disk_of_partial_sectors_is_refused_and_a_cancel_stops_the_writer(tmp_path: Path) -> None:
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(UsageError):
        write(odd, tmp_path / "odd.vhd")
    src = source_disk(tmp_path / "disk.raw", 64 * MiB)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        write(src, tmp_path / "cancelled.vhd", cancel=cancel)


def _edge_disk(path: Path, case: str) -> Path:
    size = {"all-zero": 8 * MiB, "hole-at-end": 9 * MiB, "partial-last-block": 5 * MiB + 512}[case]
    with open(path, "wb") as f:
        f.truncate(size)
        if case == "hole-at-end":  # data in the first block only, then 7 MiB of hole up to the end
            f.write(os.urandom(BLOCK + 4096))
        elif case == "partial-last-block":  # the last block is 1 MiB + one sector, all data
            f.seek(4 * MiB)
            f.write(os.urandom(MiB + 512))
    return path


@pytest.mark.parametrize("case", ["all-zero", "hole-at-end", "partial-last-block"])
def test_an_edge_case_source_reads_back_identical_and_checks_clean(tmp_path: Path, case: str) -> None:
    src = _edge_disk(tmp_path / "disk.raw", case)
    out = tmp_path / "disk.vhd"
    result = write(src, out)
    stored = {"all-zero": 0, "hole-at-end": 2, "partial-last-block": 1}[case]
    assert result.blocks == stored  # type: ignore[attr-defined]
    compared = qemu("compare", "-f", "raw", "-F", "vpc", src, out)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    checked = qemu("check", "-f", "vpc", out)
    # qemu-img's vpc driver has no consistency check: "not supported" (63) is what a clean file answers
    assert checked.returncode in (0, 63), checked.stdout + checked.stderr
    info = json.loads(qemu("info", "--output=json", "-f", "vpc", out).stdout)
    assert info["virtual-size"] == src.stat().st_size


class _RecordingSink:
    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.pieces.append(data)
        return len(data)


def test_each_block_read_goes_to_the_sink_as_read_not_as_a_joined_copy(tmp_path: Path) -> None:
    src = source_disk(tmp_path / "disk.raw", 130 * MiB + 3 * 512)
    reads: list[bytes] = []
    sink = _RecordingSink()
    fd = os.open(src, os.O_RDONLY)
    try:
        write_dynamic_vhd(fd, src.stat().st_size, sink, on_read=lambda _at, data: reads.append(data))
    finally:
        os.close(fd)
    written = {id(piece) for piece in sink.pieces}
    # every full block is handed on as the very object that was read (a 2 MiB copy per block was the
    # writer's largest cost); what the sink got is still exactly the VHD of the disk
    assert reads and all(id(data) in written for data in reads)
    (tmp_path / "disk.vhd").write_bytes(b"".join(sink.pieces))
    compared = qemu("compare", "-f", "raw", "-F", "vpc", src, tmp_path / "disk.vhd")
    assert compared.returncode == 0, compared.stdout + compared.stderr


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_imgs_vhd_gets_the_specifications_geometry_and_a_forged_footer_in_the_guest_stays(
    tmp_path: Path, subformat: str
) -> None:
    """set_geometry rewrites the footer (and a dynamic disk's copy at byte 0) of a VHD qemu-img wrote with
    force_size (65535/16/255 for any size); a fixed disk's first sector is the guest's, here a forged
    footer of the same size, and is left as it is."""
    size = 6 * MiB
    guest = bytearray(os.urandom(size))
    guest[:512] = footer(size, 3)  # what the copy of a dynamic disk's footer looks like
    src = tmp_path / "guest.raw"
    src.write_bytes(guest)
    out = tmp_path / "q.vhd"
    made = qemu("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={subformat},force_size=on", src, out)
    assert made.returncode == 0, made.stderr
    before = out.read_bytes()
    set_geometry(out, size)
    after = out.read_bytes()
    expected = struct.pack(">HBB", *geometry(size))
    assert after[-512 + 56 : -512 + 60] == expected != before[-512 + 56 : -512 + 60]
    if subformat == "dynamic":
        assert after[56:60] == expected and after[:512] == after[-512:]
        assert after[512:-512] == before[512:-512]
        assert qemu("compare", "-q", "-f", "raw", "-F", "vpc", src, out).returncode == 0
    else:  # (qemu-img itself takes such a first sector for a dynamic disk's footer copy: compared here)
        assert after[:size] == bytes(guest)
    tail = after[-512:]
    unsummed = tail[:64] + bytes(4) + tail[68:]  # the checksum: the one's complement of the other bytes' sum
    assert tail[64:68] == struct.pack(">I", ~sum(unsummed) & 0xFFFFFFFF)


def test_set_geometry_refuses_a_file_that_does_not_end_in_a_footer_of_the_size(tmp_path: Path) -> None:
    out = tmp_path / "x.vhd"
    data = bytes(MiB) + footer(MiB, 2)
    out.write_bytes(data)
    with pytest.raises(UsageError):
        set_geometry(out, 2 * MiB)
    assert out.read_bytes() == data
