"""An export to a file (appliance.targets.diskexport, RAW and VHD) leaves neither its output nor its source
in the page cache: the output's pages are written back and dropped behind the writer, the source's
dropped behind the reads (``fincore`` from util-linux counts what stays cached). The output still reads
back identical with the real qemu-img."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.targets.diskexport import export_disk
from appliance.targets.exportdest import FileDestination
from tests import imagefactory as factory
from tests.pagecachetools import MiB, cached

#: what may stay cached of the 56 MiB read and written (the code before the drop-behind left all of both)
SLACK = 2 * MiB


def uncached_disk(path: Path) -> Path:
    """An 80 MiB RAW disk: a 24 MiB hole, then 56 MiB of data to its end, written back and dropped from
    the cache. No hole after data: the kernel's own read-ahead (up to the device's ``read_ahead_kb``, 8 MiB
    here) would cache zeros of it past the last read, which the export never reads and so never drops."""
    rnd = random.Random(11)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, rnd.randbytes(56 * MiB), 24 * MiB)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path


@pytest.mark.parametrize("fmt, qemu_fmt", [("raw", "raw"), ("vhd", "vpc")])
def test_an_export_to_a_file_leaves_neither_its_output_nor_its_source_cached(
    tmp_path: Path, fmt: str, qemu_fmt: str
) -> None:
    source = uncached_disk(tmp_path / "disk.raw")
    if cached(source) > SLACK:
        pytest.skip("this filesystem keeps dropped pages cached")
    cfg = config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / f"out.{fmt}"
    export_disk(source, fmt, FileDestination(out), config=cfg, workdir=work)
    assert out.stat().st_blocks * 512 >= 56 * MiB
    assert cached(out) <= SLACK
    assert cached(source) <= SLACK
    subprocess.run(
        [factory.QEMU_IMG, "compare", "-q", "-f", "raw", "-F", qemu_fmt, str(source), str(out)], check=True
    )
