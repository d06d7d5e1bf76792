#!/usr/bin/env python3
"""Sequential decoders against qemu-img: the project's stream-VMDK decoder ÷ bare ``qemu-img convert -O raw``
on the same disk (goal ≤ 0.6 on the 2-core machine), and gzip: the decoder (ISA-L) against Python's
single-thread zlib and, when it is installed (``pip install rapidgzip``), rapidgzip's parallel decoder.

The disk is bench/convert.py's cached test disk (MBR + ext4 with ~37 % of the size in files, half random,
half text), converted once with qemu-img to streamOptimized VMDK and compressed once with ``gzip -6``.
Every timed run writes a new sparse raw file on the same filesystem and includes a ``sync``; the page cache
is dropped before each run (root only) and each run waits for an idle machine; variants alternate which
goes first. The decoder output is checked against qemu-img's with ``qemu-img compare`` once.

    .venv/bin/python bench/decoders.py              # 2 GiB disk, 3 runs
    .venv/bin/python bench/decoders.py --quick      # 256 MiB, 1 run: a smoke test
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from appliance.config import parse_size  # noqa: E402
from appliance.image.decoders import decode_file, open_decoder  # noqa: E402
from appliance.image.decoding import DecodeLimits  # noqa: E402

sys.path.append(str(ROOT))
from convert import _disk_stat_file, build_disk, build_input, drop_caches, log, wait_for_idle  # noqa: E402

GOAL = 0.6
MiB = 1 << 20


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds (with a ``sync``) and CPU seconds (this process and its children) of ``fn``."""
    drop_caches()
    cpu = _cpu()
    start = time.perf_counter()
    fn()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start, _cpu() - cpu


def _fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)
    return path


def _decode(fmt: str, src: Path, dst: Path, threads: int = 0) -> None:
    with open(src, "rb", buffering=1 << 20) as f:
        decode_file(open_decoder(fmt, f, DecodeLimits(1 << 44, 1 << 44, threads)), _fresh(dst))


def _qemu(src: Path, dst: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(src), str(_fresh(dst))], check=True)


def _isal_gunzip(src: Path, dst: Path) -> None:
    _decode("gzip", src, dst)  # the decoder: ISA-L


def _zlib_gunzip(src: Path, dst: Path) -> None:
    # Python's gzip module (single-thread zlib), written sparse like the decoder does
    zeros = bytes(4 * MiB)
    fd = os.open(_fresh(dst), os.O_WRONLY | os.O_CREAT, 0o600)
    pos = 0
    try:
        with gzip.open(src, "rb") as r:
            while block := r.read(4 * MiB):
                if block != zeros[: len(block)]:
                    os.pwrite(fd, block, pos)
                pos += len(block)
        os.ftruncate(fd, pos)
    finally:
        os.close(fd)


def _rapidgzip(src: Path, dst: Path, threads: int) -> None:
    # rapidgzip: measured here only; the decoder does not use it (README, "Dependencies")
    import rapidgzip

    zeros = bytes(4 * MiB)
    fd = os.open(_fresh(dst), os.O_WRONLY | os.O_CREAT, 0o600)
    pos = 0
    try:
        with open(src, "rb") as fo, rapidgzip.open(fo, parallelization=threads) as r:
            while block := r.read(4 * MiB):
                if block != zeros[: len(block)]:
                    os.pwrite(fd, block, pos)
                pos += len(block)
        os.ftruncate(fd, pos)
    finally:
        os.close(fd)


def _measure(
    variants: dict[str, Callable[[], object]], runs: int, out: Path, idle: float
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each variant, ``runs`` times, rotating which goes first."""
    disk = _disk_stat_file(out)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for run in range(runs):
        order = names[run % len(names) :] + names[: run % len(names)]
        for name in order:
            wait_for_idle(disk, timeout=idle)
            seconds, cpu = _timed(variants[name])
            times[name].append(seconds)
            cpus[name].append(cpu)
            log(f"run {run + 1} {name}: {seconds:.2f} s, {cpu:.2f} CPU-s, load {os.getloadavg()[0]:.1f}")
    return times, cpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 MiB, 1 run")
    parser.add_argument("--out", type=Path, default=ROOT / "out")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the VMDK goal is missed")
    parser.add_argument(
        "--idle-timeout", type=float, default=120.0, help="seconds to wait for an idle machine"
    )
    parser.add_argument("--vmdk-only", action="store_true", help="skip the gzip comparison")
    args = parser.parse_args(argv)
    size = parse_size("256MiB" if args.quick else args.size)
    runs = 1 if args.quick else args.runs
    idle = 2.0 if args.quick else args.idle_timeout
    args.out.mkdir(parents=True, exist_ok=True)
    disk = build_disk(args.out, size)
    vmdk = build_input(disk, "vmdk-stream")
    gz = disk.with_name(disk.name + ".gz")
    if not gz.exists():
        log("compressing the test disk with gzip -6")
        with open(gz.with_suffix(".partial"), "wb") as f:
            subprocess.run(["gzip", "-6", "-c", str(disk)], stdout=f, check=True)
        gz.with_suffix(".partial").rename(gz)
    ours, theirs = args.out / "dec-ours.raw", args.out / "dec-qemu.raw"
    data = disk.stat().st_blocks * 512
    try:
        _decode("vmdk-stream", vmdk, ours)
        _qemu(vmdk, theirs)
        subprocess.run(
            ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(ours), str(theirs)], check=True
        )
        vm_variants: dict[str, Callable[[], object]] = {
            "decoder": lambda: _decode("vmdk-stream", vmdk, ours),
            "qemu-img": lambda: _qemu(vmdk, theirs),
        }
        vm, vm_cpu = _measure(vm_variants, runs, args.out, idle)
        gz_variants: dict[str, Callable[[], object]] = {
            "decoder (isal)": lambda: _isal_gunzip(gz, ours),
            "zlib": lambda: _zlib_gunzip(gz, theirs),
        }
        if args.vmdk_only:
            gz_variants.clear()
        try:
            import rapidgzip  # noqa: F401  # measured only when installed

            cpus = os.cpu_count() or 1
            if gz_variants:
                gz_variants["rapidgzip"] = lambda: _rapidgzip(gz, theirs, cpus)
        except ImportError:
            log("rapidgzip is not installed: not measured")
        gz_times, gz_cpu = _measure(gz_variants, runs, args.out, idle) if gz_variants else ({}, {})
    finally:
        ours.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in vm.items()}
    cpu = {k: statistics.median(v) for k, v in vm_cpu.items()}
    ratio = med["decoder"] / med["qemu-img"]
    print(f"\ndisk {size / MiB:.0f} MiB virtual, {data / MiB:.0f} MiB data; {runs} run(s), medians")
    for k in vm:
        print(
            f"stream-VMDK  {k}: {med[k]:.2f} s ({data / med[k] / 1e6:.0f} MB/s of data), {cpu[k]:.2f} CPU-s"
        )
    verdict = "PASS" if ratio <= GOAL else "MISS"
    print(f"stream-VMDK  decoder / qemu-img = {ratio:.2f}  (goal <= {GOAL}: {verdict})")
    print(f"stream-VMDK  CPU-s decoder / qemu-img = {cpu['decoder'] / cpu['qemu-img']:.2f}")
    gmed = {k: statistics.median(v) for k, v in gz_times.items()}
    gcpu = {k: statistics.median(v) for k, v in gz_cpu.items()}
    for k in gz_times:
        print(f"gzip  {k}: {gmed[k]:.2f} s ({size / gmed[k] / 1e6:.0f} MB/s of output), {gcpu[k]:.2f} CPU-s")
    for k in gz_times:
        if k != "zlib" and "zlib" in gz_times:
            print(f"gzip  {k} / zlib = {gmed[k] / gmed['zlib']:.2f}")
    print(f"machine load (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    result = {
        "size": size,
        "data": data,
        "runs": runs,
        "times": {**vm, **gz_times},
        "cpu": {**vm_cpu, **gz_cpu},
        "ratio": ratio,
        "goal": GOAL,
    }
    (args.out / "decoders-results.json").write_text(json.dumps(result, indent=2) + "\n")
    return 1 if args.strict and ratio > GOAL else 0


if __name__ == "__main__":
    sys.exit(main())
