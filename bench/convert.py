#!/usr/bin/env python3
"""Conversion benchmark: the toolkit's ``convert_image`` against bare ``qemu-img convert -O raw``.

A realistic disk is generated once and cached under ``bench/out/`` (gitignored): a sparse raw disk
with an MBR and one ext4 partition holding ~37 % of the virtual size in files, half incompressible
random data, half text. It is converted once to each input format (qcow2, stream-optimized VMDK,
dynamic VHD, VHDX). For each input both variants convert it to raw, in the same run, alternating
which goes first, each timed including a ``sync``; page cache dropped before every timed run
(when root), and each run waits for an idle machine (CPU and disk) first. The CPU time and disk
I/O other processes used during a run are recorded, and a run that overlapped other work is
repeated. Reported: the median
of ``--runs`` for each variant, their ratio (goal <= 1.05: the toolkit's inspection, flush and
output check cost at most 5 %) and throughput in MB/s of data.

    .venv/bin/python bench/convert.py            # 4 GiB disk, 7 runs, four input formats
    .venv/bin/python bench/convert.py --quick    # 256 MiB disk, 1 run: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance import config as config_mod
from appliance.config import parse_size
from appliance.image.convert import build_command, convert_image, page_cache_bytes, use_direct_io
from appliance.image.convertcmd import use_direct_input

MiB = 1 << 20
GiB = 1 << 30
ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out"
GOAL = 1.05
#: bump when the generated disk changes, so stale caches are not reused
DISK_VERSION = 1
#: share of the virtual size filled with file data (the reference disk: ~1.5 GiB of 4 GiB)
DATA_SHARE = 0.375

#: input name → (qemu-img convert arguments that make it from the raw disk, claim, qemu format)
INPUTS: dict[str, tuple[list[str], str, str]] = {
    "raw": ([], "raw", "raw"),
    "qcow2": (["-O", "qcow2"], "qcow2", "qcow2"),
    "vmdk-stream": (["-O", "vmdk", "-o", "subformat=streamOptimized"], "vmdk", "vmdk"),
    "vhd": (["-O", "vpc", "-o", "subformat=dynamic,force_size=on"], "vhd", "vpc"),
    "vhdx": (["-O", "vhdx"], "vhdx", "vhdx"),
}
DEFAULT_FORMATS = ("qcow2", "vmdk-stream", "vhd", "vhdx")

# Runs during which other processes used more than this share of one CPU (user time), or moved more
# than this much data on the benchmark's disk, are repeated (up to MAX_ATTEMPTS times).
OTHER_CPU_LIMIT = 0.25
OTHER_IO_LIMIT = 64 * MiB
MAX_ATTEMPTS = 3
IDLE_BUSY = 0.15  # machine counts as idle below this share of all CPUs busy …
IDLE_IO = 8 * MiB  # … and below this many bytes per second on the benchmark's disk
IDLE_TIMEOUT = 120.0


def log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------ the test disk


def mbr(size: int) -> bytes:
    """An MBR with one bootable Linux partition from 1 MiB to the end of the disk."""
    sector = bytearray(512)
    start = MiB // 512
    struct.pack_into(
        "<B3BB3BII", sector, 446, 0x80, 0, 2, 0, 0x83, 0xFE, 0xFF, 0xFF, start, size // 512 - start
    )
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def text_pool(rng: random.Random, size: int) -> bytes:
    """Log-like text: lines of words from a fixed vocabulary (compresses roughly 3-4x, like real logs)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4000)]
    lines = []
    n = 0
    while n < size:
        line = (
            f"{rng.randint(0, 86400):05d} host{rng.randint(1, 40)} "
            + " ".join(rng.choices(vocab, k=12))
            + "\n"
        )
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()[:size]


def _fill(stage: Path, data_bytes: int, seed: int = 42) -> None:
    """Files totalling ``data_bytes``: half random (64 MiB files), half text (8 MiB files)."""
    rng = random.Random(seed)
    pool = text_pool(rng, 16 * MiB)
    chunk = 4 * MiB
    random_bytes = data_bytes // 2
    text_bytes = data_bytes - random_bytes
    for kind, total, file_size in (("bin", random_bytes, 64 * MiB), ("log", text_bytes, 8 * MiB)):
        directory = stage / kind
        directory.mkdir(parents=True)
        written = 0
        index = 0
        while written < total:
            size = min(file_size, total - written)
            with open(directory / f"{kind}-{index:04d}", "wb") as f:
                left = size
                while left:
                    n = min(chunk, left)
                    if kind == "bin":
                        f.write(os.urandom(n))
                    else:
                        at = rng.randrange(len(pool))
                        piece = (pool[at:] + pool[:at])[:n]
                        f.write(piece)
                    left -= n
            written += size
            index += 1


def build_disk(out: Path, size: int) -> Path:
    """The cached raw test disk for ``size`` (built on first use)."""
    disk = out / f"disk-{size // MiB}M-v{DISK_VERSION}.raw"
    if disk.exists():
        return disk
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not Path(mkfs).exists():
        sys.exit("mkfs.ext4 (e2fsprogs) is needed to build the test disk")
    stage = out / f"stage-{size // MiB}M"
    shutil.rmtree(stage, ignore_errors=True)
    partial = disk.with_suffix(".partial")
    data_bytes = int(size * DATA_SHARE)
    log(f"building {disk.name}: {size / GiB:.2f} GiB virtual, {data_bytes / GiB:.2f} GiB in files")
    try:
        _fill(stage, data_bytes)
        with open(partial, "wb") as f:
            f.truncate(size)
        fs_kib = (size - MiB) // 1024
        subprocess.run(
            [
                mkfs,
                "-q",
                "-F",
                "-b",
                "4096",
                "-L",
                "benchdisk",
                "-E",
                f"offset={MiB}",
                "-d",
                str(stage),
                str(partial),
                f"{fs_kib}k",
            ],
            check=True,
        )
        with open(partial, "r+b") as f:
            f.write(mbr(size))  # after mkfs, which may wipe the start of the device it is given
        partial.rename(disk)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        partial.unlink(missing_ok=True)
    return disk


def build_input(disk: Path, name: str) -> Path:
    """The cached conversion of ``disk`` to input format ``name``."""
    args, _, _ = INPUTS[name]
    if not args:
        return disk
    path = disk.with_name(f"{disk.stem}.{name}")
    if not path.exists():
        log(f"converting the test disk to {name}")
        partial = path.with_name(path.name + ".partial")
        subprocess.run(["qemu-img", "convert", "-f", "raw", *args, str(disk), str(partial)], check=True)
        partial.rename(path)
    return path


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


# ------------------------------------------------------------------------------------ machine conditions


def _cpu_jiffies() -> tuple[int, int, int]:
    """(total, busy, user) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total, total - idle - iowait, user + nice


def wait_for_idle(disk: Path | None, timeout: float = IDLE_TIMEOUT) -> None:
    """Wait for two consecutive quiet seconds: CPUs < IDLE_BUSY busy, disk < IDLE_IO bytes/s.

    Gives up (with a warning) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    quiet = 0
    while True:
        cpu_before, io_before = _cpu_jiffies(), _disk_sectors(disk)
        time.sleep(1.0)
        cpu_after, io_after = _cpu_jiffies(), _disk_sectors(disk)
        share = (cpu_after[1] - cpu_before[1]) / max(1, cpu_after[0] - cpu_before[0])
        io = (io_after - io_before) * 512
        quiet = quiet + 1 if share < IDLE_BUSY and io < IDLE_IO else 0
        if quiet >= 2:
            return
        if time.monotonic() > deadline:
            log(
                f"  warning: machine still busy after {timeout:.0f} s (CPUs {share:.0%}, "
                f"disk {io / MiB:.0f} MiB/s); measuring anyway"
            )
            return


def drop_caches() -> bool:
    """Flush and drop the page cache (root only); returns whether it was dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _own_cpu() -> tuple[float, float]:
    """(user, user+system) CPU seconds of this process and its reaped children."""
    me = os.times()
    return me.user + me.children_user, me.user + me.system + me.children_user + me.children_system


def _own_io() -> int:
    """512-byte blocks this process and its reaped children read and wrote (O_DIRECT included)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_inblock + me.ru_oublock + kids.ru_inblock + kids.ru_oublock


def _disk_stat_file(path: Path) -> Path | None:
    """/sys/.../stat of the whole disk holding ``path`` (its partition's parent), if there is one."""
    dev = os.stat(path).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not node.exists():
        return None  # e.g. overlayfs or tmpfs: no block device to watch
    node = node.resolve()
    return node.parent / "stat" if (node / "partition").exists() else node / "stat"


def _disk_sectors(stat_file: Path | None) -> int:
    """Sectors read plus written on the disk so far (0 when not observable)."""
    if stat_file is None:
        return 0
    fields = stat_file.read_text().split()
    return int(fields[2]) + int(fields[6])


# ------------------------------------------------------------------------------------------------ timing


@dataclass
class Run:
    variant: str
    seconds: float
    other_cpu: float  # CPU-seconds (user) other processes used during the run
    other_io: int  # bytes other processes read and wrote on the benchmark's disk during the run
    attempts: int
    cache_dropped: bool
    disturbed: bool = False  # still overlapped other work on the last attempt


@dataclass
class Measurement:
    input: str
    input_bytes: int
    data_bytes: int
    runs: list[Run] = field(default_factory=list)

    def median(self, variant: str) -> float:
        return statistics.median(r.seconds for r in self.runs if r.variant == variant)

    @property
    def ratio(self) -> float:
        """appliance / bare qemu-img with default options: the goal is <= GOAL."""
        return self.median("appliance") / self.median("qemu-img")

    def best(self, variant: str) -> float:
        return min(r.seconds for r in self.runs if r.variant == variant)

    @property
    def best_ratio(self) -> float:
        """appliance / bare qemu-img of the fastest runs: what is left when other work only ever slows a
        run down (the figure to read on a machine that never gets quiet)."""
        return self.best("appliance") / self.best("qemu-img")

    @property
    def overhead(self) -> float:
        """appliance / bare qemu-img with the same output options: the toolkit's own cost."""
        return self.median("appliance") / self.median("qemu-img-same")


@dataclass(frozen=True)
class Interference:
    """What other processes did during a timed run."""

    cpu: float  # user CPU-seconds
    io: int  # bytes read and written on the benchmark's disk

    def overlapped(self, seconds: float) -> bool:
        return self.cpu > OTHER_CPU_LIMIT * seconds or self.io > OTHER_IO_LIMIT


def _timed(fn: Callable[[], object], hz: int, disk: Path | None) -> tuple[float, Interference]:
    """Seconds ``fn`` plus a ``sync`` took, and what other processes did meanwhile."""
    own_before, io_before = _own_cpu(), _own_io()
    sys_before, disk_before = _cpu_jiffies(), _disk_sectors(disk)
    start = time.perf_counter()
    fn()
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    sys_after, disk_after = _cpu_jiffies(), _disk_sectors(disk)
    own_after, io_after = _own_cpu(), _own_io()
    other_cpu = (sys_after[2] - sys_before[2]) / hz - (own_after[0] - own_before[0])
    other_io = ((disk_after - disk_before) - (io_after - io_before)) * 512 if disk else 0
    return seconds, Interference(max(0.0, other_cpu), max(0, other_io))


#: the toolkit; bare qemu-img with default options (the goal's reference); bare qemu-img with the
#: options the toolkit passes (``use_direct_io``, ``use_direct_input`` + ``build_command``), which
#: separates the toolkit's choice of options from the rest of what it does (inspection, the output's
#: drop-behind, fsync, output check)
VARIANTS = ("appliance", "qemu-img", "qemu-img-same")


def _toolkit_options(qemu_fmt: str, src: Path, dst: Path, virtual_size: int) -> list[str]:
    """The extra options convert_image gives qemu-img for this conversion to raw (minus ``-p``): its
    cache-mode rules for the output (``use_direct_io``, for a file of this virtual size, with the memory
    available now) and for the source (``use_direct_input``, with the source as cached as it is now)."""
    direct = use_direct_io(
        "raw", qemu_fmt, block_device=False, output_bytes=virtual_size, page_cache_bytes=page_cache_bytes()
    )
    argv = build_command(
        Path("/src"),
        qemu_fmt,
        dst.absolute(),
        "raw",
        None,
        direct_io=direct,
        direct_input=use_direct_input(qemu_fmt, src),
    )
    return [a for a in argv[2 : argv.index("-f")] + argv[argv.index("-O") + 2 : -2] if a != "-p"]


def _bare(qemu_fmt: str, src: Path, dst: Path, *options: str) -> None:
    subprocess.run(
        ["qemu-img", "convert", *options, "-f", qemu_fmt, "-O", "raw", str(src), str(dst)], check=True
    )


def run_once(
    variant: str,
    name: str,
    src: Path,
    dst: Path,
    cfg: config_mod.Config,
    workdir: Path,
    *,
    quick: bool,
    idle_timeout: float = IDLE_TIMEOUT,
    max_attempts: int = MAX_ATTEMPTS,
) -> Run:
    """One timed conversion of ``src`` to raw at ``dst``, repeated if other work overlapped it.

    ``quick`` (smoke test) waits at most a few seconds for an idle machine and never repeats.
    """
    _, claim, qemu_fmt = INPUTS[name]
    virtual_size = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-f", qemu_fmt, "--output=json", str(src)], check=True, capture_output=True
        ).stdout
    )["virtual-size"]
    hz = os.sysconf("SC_CLK_TCK")
    disk = _disk_stat_file(dst.parent)
    variants = {
        "appliance": lambda: convert_image(src, dst, "raw", claim, config=cfg, workdir=workdir),
        "qemu-img": lambda: _bare(qemu_fmt, src, dst),
        "qemu-img-same": lambda: _bare(
            qemu_fmt, src, dst, *_toolkit_options(qemu_fmt, src, dst, virtual_size)
        ),
    }
    attempts = 1 if quick else max(1, max_attempts)
    for attempt in range(1, attempts + 1):
        dst.unlink(missing_ok=True)
        dropped = drop_caches()
        wait_for_idle(disk, timeout=2.0 if quick else idle_timeout)
        seconds, other = _timed(variants[variant], hz, disk)
        dst.unlink(missing_ok=True)
        overlapped = other.overlapped(seconds)
        log(
            f"  {name:<12} {variant:<15} {seconds:7.2f} s   others: {other.cpu:5.2f} CPU-s, "
            f"{other.io / MiB:6.0f} MiB I/O"
            + ("   (overlapped other work: repeating)" if overlapped and attempt < attempts else "")
        )
        if not overlapped or attempt == attempts:
            return Run(variant, seconds, other.cpu, other.io, attempt, dropped, disturbed=overlapped)
    raise AssertionError("unreachable")


def measure(
    name: str,
    src: Path,
    data_bytes: int,
    runs: int,
    out: Path,
    cfg: config_mod.Config,
    *,
    quick: bool,
    idle_timeout: float = IDLE_TIMEOUT,
    max_attempts: int = MAX_ATTEMPTS,
) -> Measurement:
    """All timed runs for one input; run ``i`` rotates the variants' order so each goes first in turn."""
    m = Measurement(name, allocated(src), data_bytes)
    workdir = out / "work"
    workdir.mkdir(exist_ok=True)
    dst = out / "result.raw"
    if not quick:
        # The first conversion of an input after other work measured 1.1-2.3x slower than the
        # rest (whichever variant ran it); an untimed warm-up keeps that out of the medians.
        drop_caches()
        _bare(INPUTS[name][2], src, dst)
        dst.unlink()
        log(f"  {name:<12} (warm-up done)")
    for i in range(runs):
        shift = i % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            m.runs.append(
                run_once(
                    variant,
                    name,
                    src,
                    dst,
                    cfg,
                    workdir,
                    quick=quick,
                    idle_timeout=idle_timeout,
                    max_attempts=max_attempts,
                )
            )
    return m


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="4GiB", help="virtual size of the test disk (default 4GiB)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per variant; the median is reported")
    p.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help=f"comma-separated inputs from {', '.join(INPUTS)} (default {','.join(DEFAULT_FORMATS)})",
    )
    p.add_argument("--quick", action="store_true", help="256 MiB disk and 1 run: a smoke test")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cache and scratch directory")
    p.add_argument("--strict", action="store_true", help=f"exit 1 if any ratio exceeds {GOAL}")
    p.add_argument(
        "--attempts",
        type=int,
        default=MAX_ATTEMPTS,
        help=f"tries of a run that overlapped other work (default {MAX_ATTEMPTS})",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=IDLE_TIMEOUT,
        help=f"seconds to wait for an idle machine before each run (default {IDLE_TIMEOUT:.0f})",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.runs = "256MiB", 1
    args.size_bytes = parse_size(args.size)
    if args.size_bytes < 64 * MiB or args.size_bytes % MiB:
        p.error("--size must be a whole number of MiB, at least 64MiB")
    args.format_list = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in args.format_list if f not in INPUTS]
    if unknown:
        p.error(f"unknown input format(s) {', '.join(unknown)}; choose from {', '.join(INPUTS)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_mod.from_dict({"state_dir": str(out / "state")}, base_dir=out)
    if os.geteuid() != 0:
        log("note: not root, so the page cache is not dropped between runs; expect noisier figures")

    disk = build_disk(out, args.size_bytes)
    data_bytes = allocated(disk)
    inputs = {name: build_input(disk, name) for name in args.format_list}
    log(
        f"disk: {args.size_bytes / GiB:.2f} GiB virtual, {data_bytes / GiB:.2f} GiB allocated; "
        f"{args.runs} run(s) per variant, alternating order; times include sync"
    )

    results = []
    for name, src in inputs.items():
        results.append(
            measure(
                name,
                src,
                data_bytes,
                args.runs,
                out,
                cfg,
                quick=args.quick,
                idle_timeout=args.idle_timeout,
                max_attempts=args.attempts,
            )
        )

    log("")
    log(
        f"{'input':<12} {'file':>8} {'appliance':>9} {'qemu-img':>9} {'ratio':>6} {'same opt':>8} "
        f"{'overhead':>8} {'best':>6} {'app MB/s':>8} {'bare MB/s':>9}  goal: ratio <= {GOAL}"
    )
    for m in results:
        app, bare, same = m.median("appliance"), m.median("qemu-img"), m.median("qemu-img-same")
        verdict = "ok" if m.ratio <= GOAL else "OVER"
        disturbed = sum(r.disturbed for r in m.runs)
        if disturbed:
            verdict += f" ({disturbed} of {len(m.runs)} runs overlapped other work)"
        log(
            f"{m.input:<12} {m.input_bytes / GiB:>6.2f}Gi {app:>8.2f}s {bare:>8.2f}s {m.ratio:>6.3f} "
            f"{same:>7.2f}s {m.overhead:>8.3f} {m.best_ratio:>6.3f} {m.data_bytes / app / 1e6:>8.0f} "
            f"{m.data_bytes / bare / 1e6:>9.0f}  {verdict}"
        )
    worst = max(results, key=lambda m: m.ratio)
    geo = statistics.geometric_mean(m.ratio for m in results)
    geo_overhead = statistics.geometric_mean(m.overhead for m in results)
    log(
        f"summary: ratio to bare qemu-img: geometric mean {geo:.3f}, "
        f"worst {worst.ratio:.3f} ({worst.input}); "
        f"overhead against qemu-img with the toolkit's options: geometric mean {geo_overhead:.3f}. "
        "ratio/overhead are of medians; MB/s are of data (allocated bytes of the raw disk)"
    )

    report = {
        "size": args.size_bytes,
        "data_bytes": data_bytes,
        "runs": args.runs,
        "goal": GOAL,
        "results": [
            {
                **asdict(m),
                **{f"median_{v}": m.median(v) for v in VARIANTS},
                "ratio": m.ratio,
                "best_ratio": m.best_ratio,
                "overhead": m.overhead,
            }
            for m in results
        ],
    }
    (out / "convert-results.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"details: {out / 'convert-results.json'}")
    if args.strict and worst.ratio > GOAL:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
