#!/usr/bin/env python3
"""Confinement benchmark: ``qemu-img convert`` bare against the same command under appliance.confine.

Uses the cached test disk of ``bench/convert.py`` (4 GiB, ~1.5 GiB of files) in each input format and
converts it to ``--to`` (raw by default) with exactly the argv ``convert_image`` builds, two ways, in the
same run, rotating which goes first: ``bare`` (qemu-img as it is, the caller's environment) and
``confined`` (behind ``setpriv``/``unshare``/``prlimit`` with the policy's limits and environment, as the
appliance runs it). Page cache dropped and an idle machine awaited before every timed run, ``sync``
included, runs that overlapped other work repeated (the machinery of ``bench/convert.py``). Also records
qemu-img's peak address space (``VmPeak``) and thread count in each variant.

    .venv/bin/python bench/confine.py                  # 4 GiB disk, 3 runs, qcow2 / vmdk-stream / vhd / vhdx
    .venv/bin/python bench/confine.py --quick          # 256 MiB disk, 1 run: a smoke test
    .venv/bin/python bench/confine.py --to vmdk --formats qcow2 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the sibling benchmark's disk and timing machinery
from convert import (
    DEFAULT_FORMATS,
    DEFAULT_OUT,
    INPUTS,
    GiB,
    MiB,
    _disk_stat_file,
    _timed,
    allocated,
    build_disk,
    build_input,
    drop_caches,
    log,
    wait_for_idle,
)

from appliance import config as config_mod
from appliance import confine
from appliance.config import parse_size
from appliance.image.convert import build_command, page_cache_bytes, use_direct_io

VARIANTS = ("bare", "confined")
MAX_ATTEMPTS = 3


@dataclass
class Run:
    variant: str
    seconds: float
    vm_peak_mib: int
    threads: int
    other_cpu: float
    attempts: int


def _sample(pid: int, peak: list[int]) -> None:
    """Keep the largest VmPeak (KiB) and thread count of ``pid`` until it exits."""
    while True:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            return
        peak[0] = max(peak[0], int(fields.get("VmPeak", "0 kB").split()[0]))
        peak[1] = max(peak[1], int(fields.get("Threads", "0").strip()))
        time.sleep(0.01)


def _convert(argv: list[str], env: dict[str, str] | None, peak: list[int]) -> None:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = threading.Thread(target=_sample, args=(proc.pid, peak), daemon=True)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")


def run_once(
    variant: str,
    argv: list[str],
    policy: confine.Policy,
    dst: Path,
    *,
    quick: bool,
    idle_timeout: float,
    attempts: int,
) -> Run:
    hz = os.sysconf("SC_CLK_TCK")
    disk = _disk_stat_file(dst.parent)
    attempts = 1 if quick else max(1, attempts)
    for attempt in range(1, attempts + 1):
        dst.unlink(missing_ok=True)
        dst.touch()  # convert_image hands qemu-img an existing temporary file
        drop_caches()
        wait_for_idle(disk, timeout=2.0 if quick else idle_timeout)
        peak = [0, 0]
        if variant == "bare":
            command, env = argv, None
        else:
            command, env = confine.command(argv, policy), confine.child_env()
        seconds, other = _timed(lambda c=command, e=env, k=peak: _convert(c, e, k), hz, disk)
        dst.unlink(missing_ok=True)
        overlapped = other.overlapped(seconds)
        log(
            f"  {variant:<9} {seconds:7.2f} s  VmPeak {peak[0] // 1024:5d} MiB  threads {peak[1]:3d}  "
            f"others {other.cpu:5.2f} CPU-s"
            + ("  (overlapped: repeating)" if overlapped and attempt < attempts else "")
        )
        if not overlapped or attempt == attempts:
            return Run(variant, seconds, peak[0] // 1024, peak[1], other.cpu, attempt)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="4GiB")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    p.add_argument("--to", default="raw", help="output format (raw, qcow2, vmdk, vhd, vhdx)")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--idle-timeout", type=float, default=120.0, help="seconds to wait for an idle machine before a run"
    )
    p.add_argument(
        "--attempts", type=int, default=MAX_ATTEMPTS, help="tries of a run that overlapped other work"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.runs = "256MiB", 1
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    limits = config_mod.from_dict({}).limits
    disk = build_disk(out, parse_size(args.size))
    log(f"network isolation: {confine.isolation().to_dict()}")
    results = []
    for name in [f.strip() for f in args.formats.split(",") if f.strip()]:
        src = build_input(disk, name).resolve()
        _, _, qemu_fmt = INPUTS[name]
        dst = (out / f"confine-result.{args.to}").resolve()
        dst.touch()
        virtual = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-f", qemu_fmt, "--output=json", str(src)],
                capture_output=True,
                check=True,
            ).stdout
        )["virtual-size"]
        direct = use_direct_io(
            args.to, qemu_fmt, block_device=False, output_bytes=virtual, page_cache_bytes=page_cache_bytes()
        )
        command = build_command(src, qemu_fmt, dst, args.to, None, direct_io=direct)
        dst.unlink()
        policy = confine.qemu_img_convert(limits, virtual)
        log(f"{name} -> {args.to}: {' '.join(command)}")
        log(f"  policy: {policy.cpu_seconds} CPU s, {policy.address_space // MiB} MiB address space")
        if not args.quick:
            _convert(command, None, [0, 0])  # untimed warm-up (see bench/convert.py)
        runs: list[Run] = []
        for i in range(args.runs):
            order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                runs.append(
                    run_once(
                        variant,
                        command,
                        policy,
                        dst,
                        quick=args.quick,
                        idle_timeout=args.idle_timeout,
                        attempts=args.attempts,
                    )
                )
        med = {v: statistics.median(r.seconds for r in runs if r.variant == v) for v in VARIANTS}
        peak = {v: max(r.vm_peak_mib for r in runs if r.variant == v) for v in VARIANTS}
        results.append(
            {
                "input": name,
                "to": args.to,
                "data_gib": allocated(disk) / GiB,
                "median_seconds": med,
                "ratio": med["confined"] / med["bare"],
                "vm_peak_mib": peak,
                "runs": [asdict(r) for r in runs],
            }
        )
    log("")
    log(
        f"{'input':<12} {'to':<6} {'bare s':>7} {'confined s':>10} {'ratio':>6} "
        f"{'VmPeak bare':>11} {'confined':>8}"
    )
    for r in results:
        log(
            f"{r['input']:<12} {r['to']:<6} {r['median_seconds']['bare']:7.2f} "
            f"{r['median_seconds']['confined']:10.2f} {r['ratio']:6.3f} "
            f"{r['vm_peak_mib']['bare']:8d} MiB {r['vm_peak_mib']['confined']:5d} MiB"
        )
    (out / "confine-results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
