"""appliance.pagecache against the real kernel: residency is measured with util-linux ``fincore``; a file
written with drop-behind leaves the cache and loses nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from appliance import pagecache
from appliance.targets.rawio import RawWriter
from tests.pagecachetools import MiB, cached, evict, random_file, read_all


def test_a_file_just_read_counts_as_cached_and_an_evicted_one_does_not(tmp_path: Path) -> None:
    path = random_file(tmp_path / "f", 8)
    evict(path)
    assert not pagecache.mostly_cached(path)
    assert cached(path) == 0  # asking read nothing
    assert not pagecache.mostly_cached(path)  # so asking again gives the same answer
    read_all(path)
    assert pagecache.mostly_cached(path)


def test_an_empty_or_missing_file_counts_as_not_cached(tmp_path: Path) -> None:
    (tmp_path / "empty").touch()
    assert not pagecache.mostly_cached(tmp_path / "empty")
    assert not pagecache.mostly_cached(tmp_path / "missing")


WRITER = """
import os, sys, time
with open(sys.argv[1], "wb") as f:
    for i in range(int(sys.argv[2])):
        f.write(bytes([i % 251 + 1]) * (1 << 20))
        if i % 8 == 7:
            time.sleep(0.02)  # a writer slower than the interval, as qemu-img is here
"""


def _write_in_child(path: Path, mib: int) -> None:
    subprocess.run([sys.executable, "-c", WRITER, str(path), str(mib)], check=True)


def _expected_digest(mib: int) -> str:
    h = hashlib.sha256()
    for i in range(mib):
        h.update(bytes([i % 251 + 1]) * MiB)
    return h.hexdigest()


def test_a_file_written_by_another_process_leaves_the_cache_behind_the_writer_and_loses_nothing(
    tmp_path: Path,
) -> None:
    # without drop-behind the writer's 64 MiB stay cached (until memory is short or the cache is
    # dropped: no control file here, as another test's drop of the whole cache would evict it too)
    mib = 64
    dropped = tmp_path / "dropped"
    with pagecache.DropBehind(dropped) as behind:  # opened once the writer has created it
        _write_in_child(dropped, mib)
        fd = os.open(dropped, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        deadline = time.monotonic() + 20
        while cached(dropped) > mib * MiB // 4 and time.monotonic() < deadline:
            time.sleep(pagecache.INTERVAL)
    assert behind.calls > 0
    assert cached(dropped) <= mib * MiB // 4
    assert hashlib.sha256(dropped.read_bytes()).hexdigest() == _expected_digest(mib)


def test_drop_behind_of_a_file_never_created_stops_cleanly(tmp_path: Path) -> None:
    with pagecache.DropBehind(tmp_path / "never") as behind:
        time.sleep(3 * pagecache.INTERVAL)
    assert behind.calls == 0


def test_a_file_written_in_this_process_leaves_the_cache_behind_the_writer_and_loses_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "written"
    behind = pagecache.WriteBehind(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), every=4 * MiB)
    try:
        for i in range(64):
            os.pwrite(behind.fd, bytes([i % 251 + 1]) * MiB, i * MiB)
            behind.wrote(MiB)
        os.fsync(behind.fd)
        behind.done()
    finally:
        os.close(behind.fd)
    assert cached(path) <= MiB  # buffered without it: all 64 MiB
    assert hashlib.sha256(path.read_bytes()).hexdigest() == _expected_digest(64)


def test_a_volume_written_as_parts_arrive_leaves_the_cache_once_flushed(tmp_path: Path) -> None:
    path = tmp_path / "volume.raw"
    path.write_bytes(b"")
    os.truncate(path, 96 * MiB)
    data = os.urandom(MiB)
    with RawWriter(path, zeroed=True, error=lambda exc: None) as out:
        for i in range(0, 96, 2):  # every other MiB: data; the rest stays a hole
            out.write(i * MiB, data)
        out.flush()
    assert cached(path) <= MiB  # without the write-behind: the 48 MiB written
    with open(path, "rb") as f:
        assert f.read(MiB) == data and f.read(MiB) == bytes(MiB)
