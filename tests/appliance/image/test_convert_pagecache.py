"""The page-cache policy of a conversion (convertcmd.use_direct_input, appliance.pagecache): a cold source is
read around the cache with ``-T none``, a cached one through it, a VMDK always through it, and the output
leaves the cache; every output equal to its source."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from appliance.config import Config
from appliance.image.convert import convert_image
from appliance.image.convertcmd import use_direct_input
from tests.pagecachetools import MiB, cached, evict, read_all

QEMU_IMG = "/usr/bin/qemu-img"


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 holding 48 MiB of random data in a 128 MiB disk."""
    d = tmp_path_factory.mktemp("src")
    raw = d / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(128 * MiB)
        f.seek(16 * MiB)
        for _ in range(48):
            f.write(os.urandom(MiB))
    path = d / "disk.qcow2"
    subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    return path


def identical(a: Path, fmt_a: str, b: Path, fmt_b: str) -> bool:
    res = subprocess.run([QEMU_IMG, "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)], capture_output=True)
    return res.returncode == 0


def test_a_cold_source_is_read_around_the_cache_and_the_output_leaves_it(
    qcow2: Path, tmp_path: Path, cfg: Config
) -> None:
    evict(qcow2)
    work = tmp_path / "work"
    work.mkdir()
    dst = tmp_path / "out.raw"
    result = convert_image(qcow2, dst, "raw", "qcow2", config=cfg, workdir=work)
    assert result.command[result.command.index("-T") + 1] == "none"
    # read with O_DIRECT: the source's 48 MiB of data did not enter the cache (buffered: all of it)
    assert cached(qcow2) < 4 * MiB
    # written, flushed and dropped: what is left is what the output check read
    assert cached(dst) < 8 * MiB
    assert identical(qcow2, "qcow2", dst, "raw")


def test_a_cached_source_is_read_through_the_cache(qcow2: Path, tmp_path: Path, cfg: Config) -> None:
    read_all(qcow2)
    work = tmp_path / "work"
    work.mkdir()
    dst = tmp_path / "out.raw"
    result = convert_image(qcow2, dst, "raw", "qcow2", config=cfg, workdir=work)
    assert "-T" not in result.command
    assert identical(qcow2, "qcow2", dst, "raw")


def test_a_cold_stream_optimized_vmdk_is_still_read_through_the_cache(qcow2: Path, tmp_path: Path) -> None:
    # qemu-img reads a VMDK grain by grain: small O_DIRECT reads measured slower than the cache
    vmdk = tmp_path / "disk.vmdk"
    options = ["-O", "vmdk", "-o", "subformat=streamOptimized"]
    subprocess.run([QEMU_IMG, "convert", "-f", "qcow2", *options, str(qcow2), str(vmdk)], check=True)
    evict(vmdk)
    assert not use_direct_input("vmdk", vmdk)
    evict(qcow2)
    assert use_direct_input("qcow2", qcow2)


#: input name → (qemu-img options building it from the qcow2 disk, claimed format, qemu format)
COLD_INPUTS = {
    "raw": (["-O", "raw"], "raw", "raw"),
    "qcow2": (["-O", "qcow2"], "qcow2", "qcow2"),
    "vhd-dynamic": (["-O", "vpc", "-o", "subformat=dynamic,force_size=on"], "vhd", "vpc"),
    "vhd-fixed": (["-O", "vpc", "-o", "subformat=fixed,force_size=on"], "vhd", "vpc"),
    "vhdx": (["-O", "vhdx"], "vhdx", "vhdx"),
}


@pytest.mark.parametrize("name", sorted(COLD_INPUTS))
def test_every_cold_input_read_with_o_direct_converts_identically(
    name: str, qcow2: Path, tmp_path: Path, cfg: Config
) -> None:
    # the fixed VHD's footer makes its file 512 bytes longer than its data: O_DIRECT reads the tail too
    options, claim, qemu_fmt = COLD_INPUTS[name]
    src = tmp_path / f"in.{name}"
    subprocess.run([QEMU_IMG, "convert", "-f", "qcow2", *options, str(qcow2), str(src)], check=True)
    evict(src)
    work = tmp_path / "work"
    work.mkdir()
    dst = tmp_path / "out.raw"
    result = convert_image(src, dst, "raw", claim, config=cfg, workdir=work)
    assert result.command[result.command.index("-T") + 1] == "none"
    assert identical(src, qemu_fmt, dst, "raw")
    assert identical(qcow2, "qcow2", dst, "raw")
