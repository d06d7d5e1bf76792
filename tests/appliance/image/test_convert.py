"""convert_image against the real qemu-img: every input to every output, rejections, hidden formats,
qemu-img failures, progress, cancel, Ctrl-C and block-device output."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from appliance import config as config_mod
from appliance import confine
from appliance.config import Config
from appliance.errors import Cancelled, ConversionFailed, ImageRejected, InsufficientScratch, UsageError
from appliance.image import convert as convert_mod
from appliance.image.convert import convert_image
from appliance.progress import Progress
from tests import confinement, processes
from tests import imagefactory as factory
from tests.mounts import tmpfs

MiB = 1 << 20
SIZE = 64 * MiB
QEMU_IMG = "/usr/bin/qemu-img"
#: (offset, length) of the random data in the test disk; the last one ends at the very last byte,
#: so an output that rounds the virtual size (vhd without force_size) or drops the tail shows up
DATA_AT = [(MiB, 256 * 1024), (7 * MiB + 4096, 64 * 1024), (33 * MiB, MiB), (SIZE - 64 * 1024, 64 * 1024)]

#: input name → (qemu-img convert options to build it from the raw disk, claimed format)
INPUTS = {
    "raw": (None, "raw"),
    "qcow2": (["-O", "qcow2"], "qcow2"),
    "vmdk-sparse": (["-O", "vmdk", "-o", "subformat=monolithicSparse"], "vmdk"),
    "vmdk-stream": (["-O", "vmdk", "-o", "subformat=streamOptimized"], "vmdk"),
    "vhd-dynamic": (["-O", "vpc", "-o", "subformat=dynamic,force_size=on"], "vhd"),
    "vhd-fixed": (["-O", "vpc", "-o", "subformat=fixed,force_size=on"], "vhd"),
    "vhdx": (["-O", "vhdx"], "vhdx"),
    "raw.gz": (None, "raw.gz"),
}
#: output name → (to_format, subformat, qemu format for compare)
OUTPUTS = {
    "raw": ("raw", None, "raw"),
    "qcow2": ("qcow2", None, "qcow2"),
    "vmdk": ("vmdk", None, "vmdk"),
    "vhd": ("vhd", None, "vpc"),
    "vhd-fixed": ("vhd", "fixed", "vpc"),
    "vhdx": ("vhdx", None, "vhdx"),
}


# ------------------------------------------------------------------------------------------------ helpers


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True, check=False)


def identical(a: Path, fmt_a: str, b: Path, fmt_b: str) -> bool:
    res = qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode == 0


def virtual_size(path: Path, fmt: str) -> int:
    res = qemu_img("info", "-f", fmt, "--output=json", path)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["virtual-size"]


def write_disk(path: Path, size: int = SIZE, data_at: list[tuple[int, int]] = DATA_AT, seed: int = 1) -> Path:
    """A sparse raw disk with an MBR (one Linux partition) and random data at ``data_at``."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(factory.mbr([(0x80, 0x83, 2048, size // 512 - 2048)]))
        for offset, length in data_at:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return path


def random_qcow2(directory: Path, mib: int, name: str) -> Path:
    """qcow2 full of incompressible data: converting it to a stream-optimized VMDK is slow (CPU-bound)."""
    raw = directory / f".{name}.raw"
    with open(raw, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    path = directory / name
    assert qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path).returncode == 0
    raw.unlink()
    return path


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_disk(tmp_path_factory.mktemp("disk") / "disk.raw")


@pytest.fixture(scope="module")
def inputs(disk: Path) -> dict[str, tuple[Path, str, str]]:
    """Input name → (path, claimed format, qemu format) for every input format, all equal to ``disk``."""
    made: dict[str, tuple[Path, str, str]] = {}
    for name, (args, claim) in INPUTS.items():
        if name == "raw":
            made[name] = (disk, claim, "raw")
        elif name == "raw.gz":
            made[name] = (factory.compress(disk, "gzip"), claim, "raw")
        else:
            path = disk.parent / f"disk.{name}"
            assert args is not None
            res = qemu_img("convert", "-f", "raw", *args, disk, path)
            assert res.returncode == 0, res.stderr
            made[name] = (path, claim, args[1] if args[1] != "vpc" else "vpc")
    return made


@pytest.fixture(scope="module")
def slow_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 MiB of random data as qcow2: ~6 s to convert to a stream-optimized VMDK on the CI machines."""
    return random_qcow2(tmp_path_factory.mktemp("slow"), 256, "random.qcow2")


# ----------------------------------------------------------------------------------- every input → output


@pytest.mark.parametrize("out_name", list(OUTPUTS))
@pytest.mark.parametrize("in_name", list(INPUTS))
def test_every_input_format_converts_to_every_output_format_identically(
    in_name: str,
    out_name: str,
    inputs: dict[str, tuple[Path, str, str]],
    disk: Path,
    cfg: Config,
    workdir: Path,
    outdir: Path,
) -> None:
    src, claim, _ = inputs[in_name]
    to_format, subformat, qemu_fmt = OUTPUTS[out_name]
    dst = outdir / f"out.{out_name}"

    result = convert_image(src, dst, to_format, claim, config=cfg, workdir=workdir, subformat=subformat)

    assert identical(disk, "raw", dst, qemu_fmt)
    assert virtual_size(dst, qemu_fmt) == SIZE  # exact: vhd must not be rounded to a CHS geometry
    assert result.dst == dst and result.format == to_format and result.virtual_size == SIZE
    assert result.output.format == to_format and result.output.safe and result.output.path == dst
    assert result.command[result.command.index("-f") + 1] == result.source.qemu_format
    # a 64 MiB output fits in the page cache whatever its format: qemu-img's default cache, then a flush
    assert "-t" not in result.command
    assert result.bytes_written == dst.stat().st_blocks * 512 > 0
    if to_format == "vmdk":
        assert result.output.details["vmdk_create_type"] == "streamOptimized"
    if to_format == "vhd":
        assert result.output.details["vhd_subformat"] == (subformat or "dynamic")
    assert entries(outdir) == [dst.name]  # no temporary file left behind
    assert entries(workdir) == []  # decompressed copy and isolation directory removed


@pytest.fixture
def qemu_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[str]]:
    """Put a recording ``qemu-img`` (a real script that then runs the real binary) first on PATH;
    returns a function giving the subcommands it ran so far."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "qemu-img-calls.log"
    script = bindir / "qemu-img"
    script.write_text(f'#!/bin/sh\necho "$1" >> "{log}"\nexec {QEMU_IMG} "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return lambda: log.read_text().split() if log.exists() else []


def test_raw_output_is_checked_by_its_content_without_running_qemu_img_on_it(
    inputs: dict[str, tuple[Path, str, str]],
    cfg: Config,
    workdir: Path,
    outdir: Path,
    qemu_calls: Callable[[], list[str]],
) -> None:
    # qemu-img info -f raw of an output that qemu-img wrote as raw can only echo its size: the check
    # that matters is the content (no format hidden inside), done without qemu-img; the source is
    # still read by info and check
    src, claim, _ = inputs["qcow2"]
    result = convert_image(src, outdir / "out.raw", "raw", claim, config=cfg, workdir=workdir)
    calls = qemu_calls()
    # info first; then check and convert side by side (either may start first)
    assert calls[0] == "info" and sorted(calls[1:]) == ["check", "convert"]
    assert result.output.format == "raw" and result.output.safe and result.output.virtual_size == SIZE


def test_container_output_is_still_read_back_by_qemu_img(
    inputs: dict[str, tuple[Path, str, str]],
    cfg: Config,
    workdir: Path,
    outdir: Path,
    qemu_calls: Callable[[], list[str]],
) -> None:
    # a container's metadata is what qemu-img wrote: info and check read it back before it is published
    src, claim, _ = inputs["raw"]
    convert_image(src, outdir / "out.qcow2", "qcow2", claim, config=cfg, workdir=workdir)
    assert qemu_calls() == ["info", "convert", "info", "check"]


GiB = 1 << 30


@pytest.mark.parametrize(
    ("to_format", "src_format", "block_device", "output_bytes", "direct"),
    [
        # a block device: always O_DIRECT, whatever the size
        ("raw", "qcow2", True, 64 * MiB, True),
        ("raw", "vmdk", True, 4 * GiB, True),
        # a file the page cache absorbs: the page cache and one flush, whatever the formats
        ("raw", "qcow2", False, 4 * GiB, False),
        ("qcow2", "vpc", False, 4 * GiB, False),
        ("vhdx", "raw", False, 4 * GiB, False),
        ("vmdk", "qcow2", False, 4 * GiB, False),
        # a file larger than the page cache should absorb: O_DIRECT where qemu-img writes big blocks
        ("raw", "qcow2", False, 40 * GiB, True),
        ("qcow2", "vhdx", False, 40 * GiB, True),
        ("vhdx", "vpc", False, 40 * GiB, True),
        # ... but not for small compressed writes (vmdk, vhd output) nor 64 KiB grains (vmdk input)
        ("vmdk", "qcow2", False, 40 * GiB, False),
        ("vhd", "qcow2", False, 40 * GiB, False),
        ("raw", "vmdk", False, 40 * GiB, False),
    ],
)
def test_output_cache_mode_follows_the_output_kind_and_size(
    to_format: str, src_format: str, block_device: bool, output_bytes: int, direct: bool
) -> None:
    budget = 10 * GiB  # what the page cache should absorb here (half the memory available)
    assert (
        convert_mod.use_direct_io(
            to_format,
            src_format,
            block_device=block_device,
            output_bytes=output_bytes,
            page_cache_bytes=budget,
        )
        is direct
    )
    argv = convert_mod.build_command(
        Path("/in"), src_format, Path("/out"), to_format, None, block_device=block_device, direct_io=direct
    )
    assert (argv[argv.index("-t") + 1] == "none") if direct else ("-t" not in argv)


def test_the_page_cache_budget_is_half_the_memory_available() -> None:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    budget = convert_mod.page_cache_bytes()
    assert 0.4 * available < budget < 0.6 * available  # MemAvailable moves a little between the reads


def test_output_is_sparse(
    inputs: dict[str, tuple[Path, str, str]], cfg: Config, workdir: Path, outdir: Path
) -> None:
    src, claim, _ = inputs["qcow2"]
    dst = outdir / "out.raw"
    convert_image(src, dst, "raw", claim, config=cfg, workdir=workdir)
    data = sum(length for _, length in DATA_AT)
    assert dst.stat().st_size == SIZE
    assert dst.stat().st_blocks * 512 < data + 4 * MiB


def test_existing_output_file_is_replaced_atomically(
    inputs: dict[str, tuple[Path, str, str]], disk: Path, cfg: Config, workdir: Path, outdir: Path
) -> None:
    dst = outdir / "out.qcow2"
    dst.write_bytes(b"old content")
    src, claim, _ = inputs["vhdx"]
    convert_image(src, dst, "qcow2", claim, config=cfg, workdir=workdir)
    assert identical(disk, "raw", dst, "qcow2")
    assert entries(outdir) == ["out.qcow2"]


# ---------------------------------------------------------------------------------------- rejected input


HOSTILE = {
    "backing-file": (factory.qcow2_backing, "qcow2", "UnsafeImage.BackingFile"),
    "data-file": (factory.qcow2_data_file, "qcow2", "UnsafeImage.DataFile"),
    "corrupt-l1": (factory.qcow2_corrupt_l1, "qcow2", "CorruptImage"),
    "vmdk-delta": (factory.vmdk_delta, "vmdk", "UnsafeImage.BackingFile"),
    "vmdk-flat-descriptor": (factory.vmdk_flat, "vmdk", "UnsafeImage.VmdkDescriptor"),
    "qed-banned": (factory.qed, "qed", "UnsafeImage.BannedFormat"),
    "qcow2-claimed-raw": (factory.raw_hiding_qcow2, "raw", "FormatMismatch"),
    "qcow2-with-vhd-footer-claimed-vhd": (factory.vhd_fixed_with_qcow2, "vhd", "FormatMismatch"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_rejected_input_raises_and_leaves_nothing_at_dst(
    case: str, tmp_path: Path, cfg: Config, workdir: Path, outdir: Path
) -> None:
    build, claim, code = HOSTILE[case]
    images = tmp_path / "images"
    images.mkdir()
    src = build(images)
    dst = outdir / "out.raw"
    with pytest.raises(ImageRejected) as exc:
        convert_image(src, dst, "raw", claim, config=cfg, workdir=workdir)
    assert code in [f.code for f in exc.value.findings], exc.value.findings
    assert entries(outdir) == []  # not even an empty file or a temporary
    assert entries(workdir) == []


def test_rejected_input_keeps_an_existing_output_untouched(
    tmp_path: Path, cfg: Config, workdir: Path
) -> None:
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"previous conversion")
    src = factory.raw_hiding_qcow2(tmp_path)
    with pytest.raises(ImageRejected) as exc:
        convert_image(src, dst, "raw", "raw", config=cfg, workdir=workdir)
    assert exc.value.code == "FormatMismatch"
    assert dst.read_bytes() == b"previous conversion"


def test_rejected_compressed_input_leaves_no_decompressed_copy(
    tmp_path: Path, cfg: Config, workdir: Path, outdir: Path
) -> None:
    src = factory.compress(factory.qcow2_backing(tmp_path), "gzip")
    with pytest.raises(ImageRejected) as exc:
        convert_image(src, outdir / "out.raw", "raw", "qcow2.gz", config=cfg, workdir=workdir)
    assert exc.value.code == "UnsafeImage.BackingFile"
    assert entries(outdir) == [] and entries(workdir) == []


# ---------------------------------------------------------------------------- format hidden in the output


def qcow2_containing(directory: Path, guest: Path, name: str) -> Path:
    """A valid, safe qcow2 whose guest disk content is the bytes of ``guest`` (another image)."""
    path = directory / name
    assert qemu_img("convert", "-f", "raw", "-O", "qcow2", guest, path).returncode == 0
    return path


@pytest.mark.parametrize("inner", ["qcow2", "vhd-fixed"])
def test_raw_output_revealing_a_nested_format_fails_and_is_removed(
    inner: str, tmp_path: Path, cfg: Config, workdir: Path, outdir: Path
) -> None:
    # The source inspects clean (guest content is opaque); its raw output *is* a qcow2 or fixed VHD,
    # which a later reader would probe as such: the output check must catch it.
    images = tmp_path / "images"
    images.mkdir()
    guest = (
        factory.qcow2(images, "inner.qcow2", virtual_size="1M")
        if inner == "qcow2"
        else factory.vhd_fixed(images)
    )
    src = qcow2_containing(images, guest, "outer.qcow2")
    dst = outdir / "out.raw"
    with pytest.raises(ConversionFailed) as exc:
        convert_image(src, dst, "raw", "qcow2", config=cfg, workdir=workdir)
    assert exc.value.code == "ConversionFailed.UnexpectedFormat"
    assert entries(outdir) == [] and entries(workdir) == []
    # the same source to a container format is fine: the nested image stays guest data
    convert_image(src, outdir / "out.qcow2", "qcow2", "qcow2", config=cfg, workdir=workdir)
    assert identical(guest, "raw", outdir / "out.qcow2", "qcow2")


# --------------------------------------------------------------------------------------- qemu-img failure


def qcow2_with_bad_compressed_cluster(directory: Path) -> Path:
    """A compressed qcow2 whose first compressed cluster is garbage.

    qemu-img check only walks metadata, so inspection passes; qemu-img convert fails reading the data.
    """
    raw = directory / "text.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write((b"compressible guest data " * 50_000)[:MiB])
    path = directory / "badcluster.qcow2"
    assert qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, path).returncode == 0
    data = bytearray(path.read_bytes())
    (l1_offset,) = struct.unpack_from(">Q", data, 40)
    (l2_offset,) = struct.unpack_from(">Q", data, l1_offset)
    l2_offset &= 0x00FF_FFFF_FFFF_FE00
    entry = next(e for e in struct.unpack_from(">512Q", data, l2_offset) if e)
    assert entry >> 62 & 1, "expected a compressed cluster"
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    offset = entry & ((1 << (62 - (cluster_bits - 8))) - 1)
    for i in range(offset + 16, offset + 400):
        data[i] ^= 0x5A
    path.write_bytes(data)
    return path


def test_qemu_img_failure_raises_conversion_failed_with_its_message_and_removes_partial_output(
    tmp_path: Path, cfg: Config, workdir: Path, outdir: Path
) -> None:
    src = qcow2_with_bad_compressed_cluster(tmp_path)
    with pytest.raises(ConversionFailed) as exc:
        convert_image(src, outdir / "out.vhdx", "vhdx", "qcow2", config=cfg, workdir=workdir)
    assert exc.value.code == "ConversionFailed.QemuImg"
    assert "error while reading" in exc.value.message
    assert entries(outdir) == [] and entries(workdir) == []


class RecordingLedger:
    """Stands where a workflow step's context would: records what convert_image announces."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Path, bool]] = []  # (action, path, existed at that moment)

    def ledger_created(self, resource: str | Path) -> None:
        self.entries.append(("created", Path(resource), os.path.lexists(resource)))

    def ledger_removed(self, resource: str | Path) -> None:
        self.entries.append(("removed", Path(resource), os.path.lexists(resource)))


def test_partial_output_is_private_and_in_the_ledger_before_it_exists(
    inputs: dict[str, tuple[Path, str, str]], disk: Path, cfg: Config, workdir: Path, outdir: Path
) -> None:
    src, claim, _ = inputs["qcow2"]
    ledger = RecordingLedger()
    seen: list[tuple[str, int]] = []

    def on_progress(p: Progress) -> None:
        if p.total and p.done < p.total:  # qemu-img is still writing
            seen.extend((e.name, stat_mode(e)) for e in outdir.iterdir())

    dst = outdir / "out.raw"
    convert_image(src, dst, "raw", claim, config=cfg, workdir=workdir, on_progress=on_progress, ledger=ledger)
    [(created, partial, existed), (removed, gone, exists_after)] = ledger.entries
    assert (created, removed, gone) == ("created", "removed", partial)
    assert not existed and not exists_after  # announced before it was created; renamed away after
    assert partial.parent == outdir and partial.name.startswith(".out.raw.partial-")
    assert seen and set(seen) == {(partial.name, 0o600)}  # while qemu-img wrote: only the partial, 0600
    assert entries(outdir) == ["out.raw"] and identical(disk, "raw", dst, "raw")
    assert stat_mode(dst) == 0o666 & ~current_umask()  # published with the mode a new file gets


def test_a_filesystem_that_fills_up_under_qemu_img_is_insufficient_scratch(
    inputs: dict[str, tuple[Path, str, str]], tmp_path: Path, cfg: Config, workdir: Path
) -> None:
    src, claim, _ = inputs["qcow2"]  # ~1.4 MiB of data
    with tmpfs(tmp_path / "small", "1m") as small:
        with pytest.raises(InsufficientScratch) as exc:
            convert_image(src, small / "out.raw", "raw", claim, config=cfg, workdir=workdir)
        assert exc.value.code == "InsufficientScratch"
        assert f"no space left on the filesystem of {small}" in exc.value.message
        assert entries(small) == [] and entries(workdir) == []


def stat_mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def current_umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask in /proc/self/status")


# ------------------------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize(
    ("to_format", "subformat"),
    [("qed", None), ("vmdk", "monolithicSparse"), ("vhd", "differencing"), ("qcow2", "fixed")],
)
def test_unsupported_output_is_refused_before_any_work(
    to_format: str,
    subformat: str | None,
    inputs: dict[str, tuple[Path, str, str]],
    cfg: Config,
    workdir: Path,
    outdir: Path,
) -> None:
    src, claim, _ = inputs["qcow2"]
    with pytest.raises(UsageError):
        convert_image(src, outdir / "out", to_format, claim, config=cfg, workdir=workdir, subformat=subformat)
    assert entries(outdir) == []


def test_output_path_that_is_a_directory_is_refused(
    inputs: dict[str, tuple[Path, str, str]], cfg: Config, workdir: Path, outdir: Path
) -> None:
    src, claim, _ = inputs["qcow2"]
    with pytest.raises(UsageError, match="is a directory"):
        convert_image(src, outdir, "raw", claim, config=cfg, workdir=workdir)


# ------------------------------------------------------------------------------------------------ progress


@pytest.mark.slow
def test_progress_is_monotonic_with_rate_and_eta_and_ends_at_100(
    slow_input: Path, cfg: Config, workdir: Path, outdir: Path
) -> None:
    seen: list[Progress] = []
    clock = ReadCounter(step=0.125)
    convert_image(
        slow_input,
        outdir / "out.vmdk",
        "vmdk",
        "qcow2",
        config=cfg,
        workdir=workdir,
        on_progress=seen.append,
        clock=clock,
    )
    total = 256 * MiB
    assert all(p.phase == "converting" and p.total == total for p in seen)
    done = [p.done for p in seen]
    assert done == sorted(done)
    assert seen[-1].done == total and seen[-1].percent == 100.0 and seen[-1].eta == 0.0
    running = [p for p in seen if 0 < p.done < total]
    assert running, "expected progress while qemu-img was running"
    assert all(p.rate and p.rate > 0 and p.eta is not None and p.eta > 0 for p in running)
    # throttled to one update per 0.5 s of the clock it was given (the first and the final one
    # excepted), although qemu-img itself reports every 1 %: the clock moves 1/8 s each time it is
    # read (once per report of qemu-img, once at the start and once at the end), so at most one report
    # in four reaches the callback, and some were held back
    assert len(seen) <= 2 + clock.reads / 4, (len(seen), clock.reads)
    assert len(seen) < clock.reads - 2, (len(seen), clock.reads)


# ---------------------------------------------------------------------------------------- cancel, Ctrl-C


class ReadCounter:
    """A clock that moves ``step`` seconds each time it is read: time counted in reads."""

    def __init__(self, step: float) -> None:
        self.step, self.reads = step, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.reads * self.step


def qemu_img_children(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "qemu-img"]


def kill_leftovers(procs: list[psutil.Process]) -> None:
    """If the code under test failed to stop them, stop them here: the machine is shared."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def left_of(procs: list[psutil.Process]) -> list[int]:
    """The pids of ``procs`` that still exist: running, stopped, or a zombie nobody reaped yet (psutil
    tells a later process that got the same pid apart)."""
    return [p.pid for p in procs if p.is_running()]


def hold(proc: psutil.Process) -> None:
    """Stop ``proc`` where it is (SIGSTOP): it cannot finish by itself, only a signal that kills it
    ends it, so its end is the work of whoever sent that signal."""
    proc.suspend()


@pytest.mark.slow
def test_cancel_stops_qemu_img_before_the_call_returns_and_removes_partial_output(
    slow_input: Path, cfg: Config, workdir: Path, outdir: Path
) -> None:
    cancel = threading.Event()
    running = threading.Event()
    outcome: list[BaseException | None] = []
    procs: list[psutil.Process] = []
    left_at_return: list[list[int]] = []
    dst = outdir / "out.vmdk"

    def on_progress(p: Progress) -> None:
        if p.percent and 0 < p.percent < 100:
            running.set()

    def work() -> None:
        try:
            convert_image(
                slow_input,
                dst,
                "vmdk",
                "qcow2",
                config=cfg,
                workdir=workdir,
                on_progress=on_progress,
                cancel=cancel,
            )
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        left_at_return.append(left_of(procs))

    thread = threading.Thread(target=work)
    thread.start()
    try:
        assert running.wait(60), "conversion never reported progress"
        procs += qemu_img_children(os.getpid())
        assert len(procs) == 1 and "convert" in procs[0].cmdline()
        # while running, output exists only under the temporary name
        partial = entries(outdir)
        assert len(partial) == 1 and partial[0].startswith(".out.vmdk.partial-")
        hold(procs[0])
        cancel.set()
        thread.join(60)  # only keeps a broken cancel from hanging the test
        assert not thread.is_alive(), "convert_image did not return after the cancel"
    finally:
        cancel.set()
        thread.join(60)
        kill_leftovers(procs)
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    assert outcome[0].code == "Cancelled"
    # the held qemu-img was killed, and reaped, before convert_image raised
    assert left_at_return == [[]]
    assert entries(outdir) == [] and entries(workdir) == []


CTRL_C_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import psutil
    from appliance import config
    from appliance.image.convert import BUFFERED_INPUTS, DIRECT_IO_FORMATS, convert_image

    src, dst, workdir, state = map(Path, sys.argv[1:5])
    cfg = config.from_dict({"state_dir": str(state)})
    def report(p):
        print(json.dumps(p.to_dict()), flush=True)
    try:
        convert_image(src, dst, "vmdk", "qcow2", config=cfg, workdir=workdir, on_progress=report)
    except KeyboardInterrupt:
        # what is left below this process once the interrupt reaches the caller (a zombie counts)
        left = [c.pid for c in psutil.Process().children(recursive=True)]
        print("KeyboardInterrupt", json.dumps(left), flush=True)
        sys.exit(130)
    print("finished", flush=True)
    """
)


@pytest.mark.slow
def test_ctrl_c_stops_qemu_img_removes_partial_output_and_reraises(
    slow_input: Path, tmp_path: Path, workdir: Path, outdir: Path
) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CTRL_C_CHILD,
            str(slow_input),
            str(outdir / "out.vmdk"),
            str(workdir),
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
        preexec_fn=processes.interruptible,  # Ctrl-C reaches it even where the suite's SIGINT is ignored
    )
    procs: list[psutil.Process] = []
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if 0 < (json.loads(line)["percent"] or 0) < 100:
                break
        else:
            pytest.fail("conversion never reported progress")
        procs += qemu_img_children(child.pid)
        assert len(procs) == 1
        hold(procs[0])
        child.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        rest, _ = child.communicate(timeout=60)  # the timeout only keeps a broken stop from hanging
        assert child.returncode == 130
        assert "finished" not in rest
        # the held qemu-img was killed and reaped before the interrupt reached the caller
        interrupted = [line for line in rest.splitlines() if line.startswith("KeyboardInterrupt ")]
        assert [json.loads(line.split(" ", 1)[1]) for line in interrupted] == [[]]
        assert left_of(procs) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        kill_leftovers(procs)
    assert entries(outdir) == [] and entries(workdir) == []


# ---------------------------------------------------------------------------------------------- block device


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A loop device over a 64 MiB file full of garbage (so unwritten zeros would show), detached after."""
    losetup = shutil.which("losetup")
    if losetup is None:
        pytest.skip("losetup (util-linux) is not installed")
    backing = tmp_path / "device.img"
    with open(backing, "wb") as f:
        for _ in range(SIZE // MiB):
            f.write(os.urandom(MiB))
    res = subprocess.run([losetup, "--show", "-f", str(backing)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(
            f"cannot attach a loop device here (needs root and the loop driver): {res.stderr.strip()}"
        )
    device = Path(res.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run([losetup, "-d", str(device)], check=False)


def test_raw_output_onto_a_block_device_is_identical(
    loop_device: Path, inputs: dict[str, tuple[Path, str, str]], disk: Path, cfg: Config, workdir: Path
) -> None:
    src, claim, _ = inputs["vmdk-stream"]
    result = convert_image(src, loop_device, "raw", claim, config=cfg, workdir=workdir)
    assert result.block_device and result.dst == loop_device
    assert {"-n", "-t", "none"} <= set(result.command)
    assert identical(disk, "raw", loop_device, "raw")  # also proves the garbage was zeroed
    assert entries(workdir) == []
    assert loop_device.is_block_device()  # written in place, not replaced by a file


def test_a_source_that_qemu_img_check_rejects_never_touches_a_block_device(
    loop_device: Path, tmp_path: Path, cfg: Config, workdir: Path
) -> None:
    # a file output is converted while qemu-img check runs (it stays a partial until the check has
    # passed); a device is written in place, so its check runs first
    images = tmp_path / "images"
    images.mkdir()
    src = factory.qcow2_corrupt_l1(images)
    before = loop_device.read_bytes()
    with pytest.raises(ImageRejected) as exc:
        convert_image(src, loop_device, "raw", "qcow2", config=cfg, workdir=workdir)
    assert exc.value.code == "CorruptImage"
    assert loop_device.read_bytes() == before
    assert entries(workdir) == []


def test_block_device_output_refuses_container_formats(
    loop_device: Path, inputs: dict[str, tuple[Path, str, str]], cfg: Config, workdir: Path
) -> None:
    src, claim, _ = inputs["qcow2"]
    with pytest.raises(UsageError, match="only receive raw"):
        convert_image(src, loop_device, "vhdx", claim, config=cfg, workdir=workdir)


def test_block_device_smaller_than_the_image_is_refused(
    loop_device: Path, tmp_path: Path, cfg: Config, workdir: Path
) -> None:
    big = tmp_path / "big.qcow2"
    assert qemu_img("create", "-f", "qcow2", big, str(2 * SIZE)).returncode == 0
    with pytest.raises(UsageError, match="holds"):
        convert_image(big, loop_device, "raw", "qcow2", config=cfg, workdir=workdir)


@pytest.mark.parametrize("inner", ["qcow2", "vhd-fixed"])
def test_nested_format_written_to_a_block_device_fails_the_conversion(
    inner: str, loop_device: Path, tmp_path: Path, cfg: Config, workdir: Path
) -> None:
    if inner == "qcow2":
        guest = factory.qcow2(tmp_path, "inner.qcow2", virtual_size="1M")
    else:
        # a fixed VHD exactly as large as the device, so its footer lands in the device's last sector
        data = tmp_path / "inner.raw"
        with open(data, "wb") as f:
            f.truncate(SIZE - 512)
        guest = tmp_path / "inner.vhd"
        res = qemu_img(
            "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", data, guest
        )
        assert res.returncode == 0 and guest.stat().st_size == SIZE
    src = qcow2_containing(tmp_path, guest, "outer.qcow2")
    with pytest.raises(ConversionFailed) as exc:
        convert_image(src, loop_device, "raw", "qcow2", config=cfg, workdir=workdir)
    assert exc.value.code == "ConversionFailed.UnexpectedFormat"
    assert entries(workdir) == []


# ------------------------------------------------------------------------------------------- confinement


def test_qemu_img_convert_runs_under_the_confinement_policy(
    slow_input: Path, cfg: Config, workdir: Path, outdir: Path, tmp_path: Path
) -> None:
    sentinel = tmp_path / "inherited-secret"
    sentinel.write_text("not for qemu-img")
    inherited = os.open(sentinel, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    seen: list[confinement.Observed] = []
    partial: list[str] = []

    def on_progress(p: Progress) -> None:
        # qemu-img is copying (it reported progress past 0 %, which it prints before opening its
        # files): hold it still and look at it, once
        if seen or p.complete or p.done == 0:
            return
        pid = confinement.find_descendant(confinement.is_tool("qemu-img", "convert"))
        with confinement.stop(pid):
            seen.append(confinement.observe(pid))
            partial.extend(entries(outdir))

    try:
        result = convert_image(
            slow_input,
            outdir / "out.vmdk",
            "vmdk",
            "qcow2",
            config=cfg,
            workdir=workdir,
            on_progress=on_progress,
        )
    finally:
        os.close(inherited)
    assert seen, "qemu-img was never seen running"
    policy = confine.qemu_img_convert(cfg.limits, result.virtual_size)
    assert (
        policy.cpu_seconds
        == cfg.limits.qemu_img_convert_cpu_seconds + cfg.limits.qemu_img_convert_cpu_seconds_per_gib
    )
    link = seen[0].cwd / "image"
    output = outdir / partial[0]
    confinement.assert_confined(
        seen[0], policy, cwd_entries=["image"], files={link, output}, forbidden_fd_targets={str(sentinel)}
    )
    # it has exactly the image (through its link) and its output open
    assert set(seen[0].files().values()) == {str(link), str(output)}
    assert seen[0].cwd.parent == workdir


def test_conversion_over_its_cpu_limit_rejects_the_image_and_leaves_nothing(
    slow_input: Path, tmp_path: Path, workdir: Path, outdir: Path
) -> None:
    # ~6 CPU seconds of work against a 1 s limit
    limits = {"qemu_img_convert_cpu_seconds": 1, "qemu_img_convert_cpu_seconds_per_gib": 0}
    cfg = config_mod.from_dict({"state_dir": str(tmp_path / "state"), "limits": limits})
    with pytest.raises(ImageRejected) as exc:
        convert_image(slow_input, outdir / "out.vmdk", "vmdk", "qcow2", config=cfg, workdir=workdir)
    assert exc.value.code == "UnsafeImage.ResourceLimit"
    # killed by a signal, and the message names the policy it ran under: the configured CPU limit
    assert "qemu-img convert was killed by SIG" in exc.value.message
    assert confine.qemu_img_convert(cfg.limits, 0).describe() in exc.value.message
    assert entries(outdir) == [] and entries(workdir) == []


def test_conversion_over_its_address_space_limit_rejects_the_image(
    inputs: dict[str, tuple[Path, str, str]], tmp_path: Path, workdir: Path, outdir: Path
) -> None:
    src, claim, _ = inputs["qcow2"]
    cfg = config_mod.from_dict(
        {"state_dir": str(tmp_path / "state"), "limits": {"qemu_img_convert_address_space": "32MiB"}}
    )
    with pytest.raises(ImageRejected) as exc:
        convert_image(src, outdir / "out.raw", "raw", claim, config=cfg, workdir=workdir)
    assert exc.value.code == "UnsafeImage.ResourceLimit"
    assert "32 MiB address space" in exc.value.message
    assert entries(outdir) == [] and entries(workdir) == []
