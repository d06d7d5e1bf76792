#!/usr/bin/env python3
"""Guest validation benchmark: what static validation adds to an import, against bare qemu-img.

Uses ``bench/convert.py``'s cached test disk (MBR + ext4 holding ~37 % of the virtual size in
files) and its input formats. For each input, in the same run, it times
``appliance.guest.validate_image`` on the input as uploaded (the import workflows validate before
converting, in a limited child process) and bare ``qemu-img convert -f FMT -O raw`` of the same
input, page cache dropped before each (as root). Reported: the medians and ``ratio`` = validation /
conversion, the share of an import's conversion time that validation adds (goal <= 0.05).

    .venv/bin/python bench/validate.py             # 4 GiB disk, 3 runs, four input formats
    .venv/bin/python bench/validate.py --quick     # 256 MiB disk, 1 run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
# Run as ``python bench/validate.py``: bench/api.py would shadow the ``api`` package; convert.py
# (this directory) is imported by its own name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
sys.path.insert(0, str(REPO))
sys.path.append(str(ROOT))

from convert import (  # noqa: E402
    DEFAULT_FORMATS,
    DEFAULT_OUT,
    INPUTS,
    _disk_stat_file,
    build_disk,
    build_input,
    drop_caches,
    log,
    wait_for_idle,
)

from appliance import config as config_mod  # noqa: E402
from appliance.config import parse_size  # noqa: E402
from appliance.guest import validate_image  # noqa: E402

GOAL = 0.05


def timed_validation(src: Path, fmt: str, cfg: config_mod.Config) -> tuple[float, list[str]]:
    """Seconds to validate ``src`` (cold cache) and the finding codes."""
    drop_caches()
    start = time.perf_counter()
    report = validate_image(src, fmt, bootable=False, config=cfg)
    return time.perf_counter() - start, [f.code for f in report.findings]


def timed_conversion(src: Path, qemu_fmt: str, dst: Path) -> float:
    """Seconds for bare ``qemu-img convert -O raw`` of ``src`` (cold cache, synced)."""
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", qemu_fmt, "-O", "raw", str(src), str(dst)], check=True)
    os.sync()
    elapsed = time.perf_counter() - start
    dst.unlink(missing_ok=True)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="4GiB")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    p.add_argument("--quick", action="store_true", help="256 MiB disk, 1 run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--strict", action="store_true", help=f"exit 1 if any ratio exceeds {GOAL}")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.runs = "256MiB", 1
    size = parse_size(args.size)
    formats = [f.strip() for f in args.formats.split(",") if f.strip() in INPUTS]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_mod.from_dict({"state_dir": str(out / "state")}, base_dir=out)
    disk = build_disk(out, size)
    stat_file = _disk_stat_file(out)  # the block device's counters, for the idle wait
    rows = []
    for name in formats:
        src = build_input(disk, name)
        _args, fmt, qemu_fmt = INPUTS[name]  # (qemu-img options, format name, qemu-img's name)
        dst = out / "validate-bench.raw"
        val, conv = [], []
        for _ in range(args.runs):
            wait_for_idle(stat_file, timeout=2.0 if args.quick else 60.0)
            seconds, findings = timed_validation(src, fmt, cfg)
            val.append(seconds)
            wait_for_idle(stat_file, timeout=2.0 if args.quick else 60.0)
            conv.append(timed_conversion(src, qemu_fmt, dst))
        v, c = statistics.median(val), statistics.median(conv)
        rows.append((name, v, c, v / c, findings))
        log(f"{name}: validate {v:.2f}s, qemu-img convert {c:.2f}s, findings {findings}")
    log("")
    log(f"{'input':<12} {'validate':>9} {'convert':>9} {'ratio':>7}  goal: ratio <= {GOAL}")
    for name, v, c, r, _ in rows:
        log(f"{name:<12} {v:>8.2f}s {c:>8.2f}s {r:>7.3f}  {'ok' if r <= GOAL else 'OVER'}")
    if os.geteuid() != 0:
        log("note: not root, so the page cache was not dropped between runs")
    over = [name for name, _v, _c, r, _f in rows if r > GOAL]
    return 1 if args.strict and over else 0


if __name__ == "__main__":
    sys.exit(main())
