"""The streamOptimized VMDK writer (appliance.image.vmdkwriter): what it writes reads back identical through
the real qemu-img (info, check, compare) and through dissect's VMDK reader (an independent implementation
that follows the grain directory and tables, where the project's own decoder follows the markers); the
layout is VMware's (GD_AT_END header, footer, end-of-stream marker) and the descriptor says what VMware
needs; zero grains and holes are not stored; a cancel stops it."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from dissect.hypervisor.disk.vmdk import VMDK

from appliance.errors import Cancelled
from appliance.image.decoders import decode_file, open_decoder
from appliance.image.decoding import DecodeLimits
from appliance.image.vmdkformat import GD_AT_END, Header, create_type
from appliance.image.vmdkwriter import GRAIN, write_stream_vmdk
from tests import imagefactory as factory

MiB = factory.MiB
LIMITS = DecodeLimits(max_virtual_size=1 << 40, max_decompressed_size=1 << 40, threads=2)


def source_disk(path: Path, size: int, seed: int = 7) -> Path:
    """A sparse disk: random and text-like regions (some not grain-aligned, some in the second and
    fourth grain-table spans of 32 MiB, none in the third), and data in its last, partial grain."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for at, n in ((0, 70_000), (5 * MiB + 3, 4096), (33 * MiB - 100, 3 * GRAIN), (100 * MiB + 512, 9000)):
            if at + n <= size:
                f.seek(at)
                f.write(rnd.randbytes(n) if rnd.random() < 0.5 else (b"log line %d ok\n" % at * n)[:n])
        f.seek(size - 700)
        f.write(b"the end of the disk".ljust(700, b"!"))
    return path


def write(src: Path, dst: Path, **kw: object) -> object:
    fd = os.open(src, os.O_RDONLY)
    try:
        with open(dst, "wb") as out:
            return write_stream_vmdk(fd, os.fstat(fd).st_size, out, threads=2, **kw)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def qemu(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([factory.QEMU_IMG, *map(str, args)], capture_output=True)


# the last grain is partial, and the disk spans four grain tables (a multiple of 8 KiB: dissect's VMDK
# reader reads in 8 KiB blocks and fails past the end of a disk that is not)
SIZE = 100 * MiB + 64 * 1024 + 8 * 1024


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    d = tmp_path_factory.mktemp("vmdkwriter")
    src = source_disk(d / "disk.raw", SIZE)
    dst = d / "disk.vmdk"
    return src, dst, write(src, dst, extent_name="disk.vmdk")


def test_qemu_img_reads_the_stream_as_the_source_disk(written) -> None:
    src, dst, result = written
    info = json.loads(qemu("info", "-f", "vmdk", "--output=json", dst).stdout)
    assert info["format"] == "vmdk" and info["virtual-size"] == SIZE
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["format-specific"]["data"]["extents"][0]["compressed"] is True
    check = qemu("check", "-f", "vmdk", dst)
    assert check.returncode == 0, check.stdout + check.stderr
    cmp = qemu("compare", "-f", "raw", "-F", "vmdk", src, dst)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert result.size == dst.stat().st_size


def test_dissect_reads_the_stream_through_its_grain_directory(written) -> None:
    # dissect.hypervisor finds the footer 1024 bytes before the end (the header says GD_AT_END) and
    # resolves every grain through the directory and tables: a wrong table entry reads wrong bytes
    src, dst, _ = written
    with open(dst, "rb") as f:
        disk = VMDK(f)
        assert disk.size == SIZE
        data = disk.read(SIZE)
    assert data == src.read_bytes()


def test_the_projects_marker_decoder_reads_it_too(written, tmp_path: Path) -> None:
    src, dst, _ = written
    with open(dst, "rb") as f:
        decode_file(open_decoder("vmdk-stream", f, LIMITS), tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == src.read_bytes()


def test_the_layout_is_vmwares_stream_layout(written) -> None:
    _, dst, _ = written
    data = dst.read_bytes()
    head = Header.parse(data[:512], 0)
    assert head.gd_offset == GD_AT_END and head.grain_size == 128 and head.version == 3
    assert head.flags == 0x30001 and head.compress == 1
    # footer marker, footer (a header copy with the real directory offset), end-of-stream marker
    assert struct.unpack_from("<QII", data, len(data) - 1536) == (1, 0, 3)
    footer = Header.parse(data[-1024:-512], len(data) - 1024)
    assert footer.gd_offset not in (0, GD_AT_END) and head.agrees_with(footer) == []
    assert data[-512:] == bytes(512)
    assert struct.unpack_from("<QII", data, (footer.gd_offset - 1) * 512) == (1, 0, 2)  # the GD marker
    gd = struct.unpack_from("<4I", data, footer.gd_offset * 512)
    assert gd[0] and gd[1] and gd[3] and gd[2] == 0  # no table for the empty third span
    for entry in (gd[0], gd[1], gd[3]):
        assert struct.unpack_from("<QII", data, (entry - 1) * 512) == (4, 0, 1)  # a GT marker before each


def test_the_descriptor_says_what_vmware_needs(written) -> None:
    _, dst, _ = written
    text = dst.read_bytes()[512 : 21 * 512].split(b"\0", 1)[0].decode()
    assert create_type(text.encode()) == "streamOptimized"
    fields = dict(
        (k.strip(), v.strip().strip('"')) for k, _, v in (ln.partition("=") for ln in text.splitlines()) if _
    )
    assert fields["ddb.virtualHWVersion"] == "4"
    assert fields["ddb.adapterType"] == "lsilogic"
    assert int(fields["ddb.geometry.cylinders"]) == SIZE // 512 // (255 * 63)
    assert fields["ddb.geometry.heads"] == "255" and fields["ddb.geometry.sectors"] == "63"
    assert fields["parentCID"] == "ffffffff"
    assert f'RW {-(-SIZE // 512)} SPARSE "disk.vmdk"' in text


def test_zero_grains_and_holes_are_not_stored(tmp_path: Path) -> None:
    src = tmp_path / "zeros.raw"
    with open(src, "wb") as f:
        f.write(bytes(3 * MiB))  # written zeros: read, found zero, skipped
        f.truncate(64 * MiB)  # a hole: never read
    result = write(src, tmp_path / "zeros.vmdk")
    assert result.grains == 0  # type: ignore[attr-defined]
    assert (tmp_path / "zeros.vmdk").stat().st_size < 80 * 1024
    assert qemu("compare", "-f", "raw", "-F", "vmdk", src, tmp_path / "zeros.vmdk").returncode == 0


def test_adapter_type_ide_gets_ide_geometry(tmp_path: Path) -> None:
    src = source_disk(tmp_path / "d.raw", 8 * MiB)
    write(src, tmp_path / "ide.vmdk", adapter_type="ide")
    info = json.loads(qemu("info", "-f", "vmdk", "--output=json", tmp_path / "ide.vmdk").stdout)
    assert info["virtual-size"] == 8 * MiB
    assert b'ddb.adapterType = "ide"' in (tmp_path / "ide.vmdk").read_bytes()[:12288]
    assert b'ddb.geometry.heads = "16"' in (tmp_path / "ide.vmdk").read_bytes()[:12288]


def test_cancel_stops_the_writer(tmp_path: Path) -> None:
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(32 * MiB))
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        write(src, tmp_path / "c.vmdk", cancel=cancel, on_progress=lambda done: cancel.set())


def test_output_goes_to_a_forward_only_sink(tmp_path: Path) -> None:
    # a sink with only write(): the writer never seeks back (an S3 upload, a pipe)
    class Forward:
        def __init__(self) -> None:
            self.buf = io.BytesIO()

        def write(self, data: bytes) -> int:
            return self.buf.write(data)

    src = source_disk(tmp_path / "d.raw", 4 * MiB)
    sink = Forward()
    fd = os.open(src, os.O_RDONLY)
    try:
        write_stream_vmdk(fd, 4 * MiB, sink, threads=2)
    finally:
        os.close(fd)
    (tmp_path / "f.vmdk").write_bytes(sink.buf.getvalue())
    assert qemu("compare", "-f", "raw", "-F", "vmdk", src, tmp_path / "f.vmdk").returncode == 0


def test_a_size_that_is_not_a_whole_grain_or_block_reads_back(tmp_path: Path) -> None:
    src = source_disk(tmp_path / "odd.raw", 3 * MiB + 7 * 512)
    write(src, tmp_path / "odd.vmdk")
    info = json.loads(qemu("info", "-f", "vmdk", "--output=json", tmp_path / "odd.vmdk").stdout)
    assert info["virtual-size"] == 3 * MiB + 7 * 512
    assert qemu("compare", "-f", "raw", "-F", "vmdk", src, tmp_path / "odd.vmdk").returncode == 0
