"""RAW and VHD exports read a cold source with O_DIRECT (appliance.image.readbuf.open_direct, qemu-img's
``-T none`` rule): the source's pages never enter the page cache while it is read (``fincore`` sampled at
every read), a cached source is still read through the cache, unaligned sizes and a filesystem that
refuses O_DIRECT export the same bytes, and a sparse source keeps its holes."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.image.readbuf import ReadPool, direct_reads
from appliance.progress import ProgressTracker
from appliance.targets import exportraw
from appliance.targets.diskexport import export_disk
from appliance.targets.exportdest import FileDestination, S3Destination
from appliance.targets.exportraw import raw_producer
from appliance.targets.exportvhd import vhd_producer
from tests import imagefactory as factory
from tests.appliance.targets.test_diskexport import bucket, s3
from tests.pagecachetools import MiB, cached, evict, read_all

GiB = 1 << 30
__all__ = ["bucket"]  # a fixture, used by name
#: what may be cached of the source while it is read (the buffered reads kept the chunk being read and the
#: 16 MiB announced ahead of it)
SLACK = 1 * MiB


class CacheWatch:
    """A source check that, at every read the writer makes, records how much of the source is cached."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.peak = self.reads = 0

    def read(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.reads += 1
        self.peak = max(self.peak, cached(self.source))

    def verify(self, size: int) -> None:
        pass

    def output_stands_for_source(self, chunk_size: int) -> bool:
        return False

    def verify_output(self, digest: Mapping[str, Any], size: int) -> bool:
        return False


def sparse_disk(path: Path, size: int, pieces: list[tuple[int, int]], seed: int = 5) -> Path:
    """A sparse RAW disk of ``size`` bytes with random data at each ``(offset, length)``, written back and
    dropped from the cache (cold)."""
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for at, n in pieces:
            os.pwrite(fd, rnd.randbytes(n), at)
        os.fsync(fd)
    finally:
        os.close(fd)
    evict(path)
    return path


def reads_direct(path: Path) -> bool:
    """Whether an export would read ``path`` with O_DIRECT now."""
    with direct_reads(path) as fd:
        return fd is not None


def export(source: Path, fmt: str, out: Path, tmp: Path, check: CacheWatch | None = None) -> None:
    cfg = config_mod.from_dict({"state_dir": str(tmp / "state")}, base_dir=tmp)
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    export_disk(source, fmt, FileDestination(out), config=cfg, workdir=work, source_check=check)


def buffered(source: Path, out: Path, fmt: str = "raw") -> None:
    """The RAW or dynamic VHD export as the writers did it before O_DIRECT: every read through the page
    cache."""
    fd = os.open(source, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        tracker = ProgressTracker("x", size, None)
        produce = (
            raw_producer(fd, size, tracker, None)
            if fmt == "raw"
            else vhd_producer(fd, size, "dynamic", tracker, None)
        )
        FileDestination(out).stream(produce)
    finally:
        os.close(fd)


def data_map(path: Path) -> list[tuple[int, int]]:
    """The file's data ranges by ``SEEK_DATA``/``SEEK_HOLE``."""
    found: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            found.append((start, pos))
    finally:
        os.close(fd)
    return found


def same_vhd(a: Path, b: Path) -> bool:
    """Whether two VHDs hold the same bytes but for their footers' unique id, timestamp and checksum."""

    def blanked(path: Path) -> bytes:
        data = bytearray(path.read_bytes())
        for base in (0, len(data) - 512):  # the footer's copy at the start and the footer itself
            data[base + 24 : base + 28] = bytes(4)
            data[base + 64 : base + 84] = bytes(20)
        return bytes(data)

    return blanked(a) == blanked(b)


def qemu_compare(source: Path, out: Path, qemu_fmt: str) -> None:
    subprocess.run(
        [factory.QEMU_IMG, "compare", "-q", "-f", "raw", "-F", qemu_fmt, str(source), str(out)], check=True
    )


@pytest.mark.parametrize("fmt, qemu_fmt", [("raw", "raw"), ("vhd", "vpc")])
def test_an_export_from_a_cold_source_reads_it_without_filling_the_page_cache(
    tmp_path: Path, fmt: str, qemu_fmt: str
) -> None:
    pieces = [(8 * MiB, 20 * MiB), (40 * MiB, 32 * MiB)]
    source = sparse_disk(tmp_path / "disk.raw", 80 * MiB, pieces)
    if not reads_direct(source):
        pytest.skip("this filesystem refuses O_DIRECT")
    watch = CacheWatch(source)
    out = tmp_path / f"out.{fmt}"
    export(source, fmt, out, tmp_path, watch)
    assert watch.reads >= 13
    assert watch.peak <= SLACK  # the buffered reads had the chunk read and 16 MiB announced ahead cached
    qemu_compare(source, out, qemu_fmt)
    if fmt == "raw":  # a sparse source keeps its holes
        assert data_map(out) == data_map(source) == [(8 * MiB, 28 * MiB), (40 * MiB, 72 * MiB)]
        reference = tmp_path / "buffered.raw"
        buffered(source, reference)
        assert out.read_bytes() == reference.read_bytes()


def test_a_cached_source_is_read_through_the_page_cache(tmp_path: Path) -> None:
    source = sparse_disk(tmp_path / "disk.raw", 32 * MiB, [(0, 32 * MiB)])
    if not reads_direct(source):
        pytest.skip("this filesystem refuses O_DIRECT")
    read_all(source)  # now in the cache: read from there (qemu-img -T none's rule)
    assert not reads_direct(source)
    watch = CacheWatch(source)
    out = tmp_path / "out.raw"
    export(source, "raw", out, tmp_path, watch)
    assert watch.peak > SLACK
    assert out.read_bytes() == source.read_bytes()


@pytest.mark.parametrize(
    "size",
    [4 * GiB + 1536, 6 * MiB + 1000],
    ids=["4GiB+1536", "not-a-multiple-of-4096"],
)
def test_an_unaligned_source_exports_identically(tmp_path: Path, size: int) -> None:
    # data in the middle of a block, up to the unaligned end, and across the hole boundaries
    tail = size - (size - 3 * MiB) // 4096 * 4096 + 5000
    pieces = [(1000, 3000), (2 * MiB - 700, 9000), (size - tail, tail)]
    source = sparse_disk(tmp_path / "disk.raw", size, pieces)
    if not reads_direct(source):
        pytest.skip("this filesystem refuses O_DIRECT")
    reference = tmp_path / "buffered.raw"
    buffered(source, reference)
    evict(source)
    watch = CacheWatch(source)
    out = tmp_path / "out.raw"
    export(source, "raw", out, tmp_path, watch)
    assert watch.peak <= SLACK  # read with O_DIRECT
    subprocess.run(["cmp", str(out), str(reference)], check=True)
    assert data_map(out) == data_map(reference)
    if size % 512 == 0:  # a VHD of it (dynamic: the last block partial) as the buffered reads wrote it
        evict(source)
        vhd = tmp_path / "out.vhd"
        export(source, "vhd", vhd, tmp_path, CacheWatch(source))
        qemu_compare(source, vhd, "vpc")
        buffered(source, reference.with_suffix(".vhd"), "vhd")
        assert same_vhd(vhd, reference.with_suffix(".vhd"))


def test_a_source_on_tmpfs_is_read_through_the_cache_and_exports_identically(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    here = sparse_disk(tmp_path / "disk.raw", 12 * MiB + 512, [(MiB, 5 * MiB), (9 * MiB, 3 * MiB + 512)])
    source = shm / f"exportdirect-{os.getpid()}.raw"
    try:
        subprocess.run(["cp", "--sparse=always", str(here), str(source)], check=True)  # holes kept
        assert not reads_direct(source)  # tmpfs: refused, or always resident (the cache is the file)
        for fmt in ("raw", "vhd"):
            from_tmpfs, from_disk = tmp_path / f"tmpfs.{fmt}", tmp_path / f"disk.{fmt}"
            export(source, fmt, from_tmpfs, tmp_path)
            export(here, fmt, from_disk, tmp_path)
            assert (
                from_tmpfs.read_bytes() == from_disk.read_bytes()
                if fmt == "raw"
                else same_vhd(from_tmpfs, from_disk)
            )
    finally:
        source.unlink(missing_ok=True)


def test_a_refused_direct_read_falls_back_to_the_page_cache_once(tmp_path: Path) -> None:
    """A loop device of 4096-byte sectors refuses an O_DIRECT read aligned to 512 only (EINVAL): the read
    is repeated buffered, the next ones stay buffered, no byte is lost."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop device")
    backing = tmp_path / "backing"
    backing.write_bytes(random.Random(3).randbytes(4 * MiB))
    attach = subprocess.run(
        ["losetup", "--find", "--show", "--sector-size", "4096", str(backing)], capture_output=True, text=True
    )
    if attach.returncode != 0:
        pytest.skip(f"no loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        fd = os.open(device, os.O_RDONLY)
        dfd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        try:
            pool = ReadPool(MiB, 4, direct=dfd, align=512)
            first = bytes(pool.read(fd, MiB, 512))  # 512-aligned, not 4096-aligned: refused
            second = bytes(pool.read(fd, MiB, 2 * MiB))
        finally:
            os.close(dfd)
            os.close(fd)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
    data = backing.read_bytes()
    assert first == data[512 : 512 + MiB] and second == data[2 * MiB : 3 * MiB]
    assert pool.direct is None and pool.direct_reads == 0


@pytest.mark.parametrize("fmt, qemu_fmt", [("raw", "raw"), ("vhd", "vpc")])
def test_a_cold_source_exported_to_s3_reads_back_identical(
    tmp_path: Path, fmt: str, qemu_fmt: str, moto, bucket: str
) -> None:
    """To S3 the RAW producer hands the upload every chunk (holes as zeros), the direct reads' views
    included: the upload keeps them while its parts are sent, and must send the bytes read."""
    source = sparse_disk(tmp_path / "disk.raw", 24 * MiB + 4096, [(MiB + 512, 6 * MiB), (17 * MiB, 7 * MiB)])
    if not reads_direct(source):
        pytest.skip("this filesystem refuses O_DIRECT")
    watch = CacheWatch(source)
    cfg = config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    dest = S3Destination(s3(moto), bucket, f"e.{fmt}", part_size=5 * MiB, threads=2)
    result = export_disk(source, fmt, dest, config=cfg, workdir=work, source_check=watch)
    assert watch.reads and watch.peak <= SLACK
    body = moto.client("s3").get_object(Bucket=bucket, Key=f"e.{fmt}")["Body"].read()
    assert len(body) == result.size
    back = tmp_path / "back"
    back.write_bytes(body)
    qemu_compare(source, back, qemu_fmt)


class UploadSink:
    """A sink without ``write_zeros`` (what an upload is), which records every chunk it gets and, at its
    first chunk of data, waits for the source's next data chunk to have been read: it has been only when
    the reads run ahead of the writes in a thread of their own."""

    def __init__(self, reads: list[int], next_data: int) -> None:
        self.reads, self.next_data = reads, next_data
        self.got = bytearray()
        self.ahead: bool | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.ahead is None and any(data):
            self.ahead = wait_until(lambda: self.next_data in self.reads)
        self.got += data
        return len(data)


def wait_until(condition: Any, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_an_upload_of_a_cold_source_reads_its_data_ahead_of_the_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """To a sink that takes only bytes (S3) the direct reads run in the read-ahead thread, the next data
    chunk read while the upload still holds the one before; the chunks with no data are zeros, not
    read."""
    pieces = [(MiB, 5 * MiB), (16 * MiB, 6 * MiB)]
    source = sparse_disk(tmp_path / "disk.raw", 26 * MiB + 512, pieces)
    if not reads_direct(source):
        pytest.skip("this filesystem refuses O_DIRECT")
    reads: list[int] = []
    threads: set[str] = set()

    class Recording(ReadPool):
        def read(self, fd: int, n: int, pos: int) -> Any:
            threads.add(threading.current_thread().name)
            got = super().read(fd, n, pos)
            reads.append(pos)
            return got

    monkeypatch.setattr(exportraw, "ReadPool", Recording)
    # data in the chunks at 0 and 4 MiB, then at 16 and 20 MiB: the second chunk is the next one read
    sink = UploadSink(reads, exportraw.CHUNK)
    size = source.stat().st_size
    with direct_reads(source) as direct:
        assert direct is not None
        fd = os.open(source, os.O_RDONLY)
        try:
            exportraw.raw_producer(fd, size, ProgressTracker("x", size, None), None, direct=direct)(sink)
        finally:
            os.close(fd)
    assert sink.ahead is True
    assert threads == {"read-ahead"}
    assert reads == [0, 4 * MiB, 16 * MiB, 20 * MiB]
    assert bytes(sink.got) == source.read_bytes()
