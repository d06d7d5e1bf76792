"""``imaging export``: a RAW disk (or several, as one OVA) written as VMDK, VHD, RAW or OVA to a file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UsageError
from ..targets.diskexport import EXPORT_FORMATS, FileDestination, OvaSource, export_disk, export_ova
from .common import EXIT_OK, PROGRESS_MODES, cancel_on_signals, cli_scratch, print_json, progress_callback


def add_commands(sub: Any) -> None:
    """Add ``export`` to the ``imaging`` subcommands."""
    s = sub.add_parser(
        "export",
        help="write a RAW disk as streamOptimized VMDK, VHD, RAW, or several disks as one OVA",
        description="Read the RAW disk SRC (a file or block device) and write DST: vmdk (streamOptimized, "
        "grains deflated in parallel), vhd (dynamic, or fixed with --subformat), raw, or ova (an OVF "
        "envelope, a SHA256 manifest and a streamOptimized VMDK per disk; add disks with --disk). "
        "DST appears only when complete.",
    )
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument(
        "-t",
        "--to",
        required=True,
        choices=(*EXPORT_FORMATS, "ova"),
        metavar="FMT",
        help=f"output format: {', '.join(EXPORT_FORMATS)}, ova",
    )
    s.add_argument("--subformat", help="vhd: dynamic (default) or fixed")
    s.add_argument("--adapter-type", default="lsilogic", help="vmdk: ddb.adapterType (default lsilogic)")
    s.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="SRC",
        help="ova: a further RAW disk (data disks follow the boot disk SRC)",
    )
    s.add_argument("--name", help="ova: the VM's name (default: DST's name without .ova)")
    s.add_argument("--firmware", choices=("bios", "efi"), default="bios", help="ova: the guest's firmware")
    s.add_argument("--platform", choices=("linux", "windows"), default="linux", help="ova: the guest's OS")
    s.add_argument("--cpus", type=int, default=1, help="ova: virtual CPUs")
    s.add_argument("--memory", type=int, default=1024, metavar="MIB", help="ova: memory in MiB")
    s.add_argument("--threads", type=int, default=0, help="deflate threads (default: one per CPU)")
    s.add_argument("--progress", choices=PROGRESS_MODES, default="auto", help="progress on stderr")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace, cfg: Config) -> int:
    src, dst = Path(args.src), Path(args.dst)
    for p in (src, *map(Path, args.disk)):
        if not p.exists():
            raise UsageError(f"no such disk: {p}")
    if args.disk and args.to != "ova":
        raise UsageError("--disk adds disks to an OVA; use --to ova")
    with cli_scratch(cfg) as scratch, cancel_on_signals() as cancel:
        if args.to == "ova":
            result = export_ova(
                [OvaSource(src), *(OvaSource(Path(d)) for d in args.disk)],
                FileDestination(dst),
                name=args.name or dst.name.removesuffix(".ova"),
                config=cfg,
                workdir=scratch.path,
                firmware=args.firmware,
                platform=args.platform,
                cpus=args.cpus,
                memory_mib=args.memory,
                threads=args.threads,
                on_progress=progress_callback(args.progress),
                cancel=cancel,
            )
        else:
            result = export_disk(
                src,
                args.to,
                FileDestination(dst),
                config=cfg,
                workdir=scratch.path,
                subformat=args.subformat,
                adapter_type=args.adapter_type,
                threads=args.threads,
                on_progress=progress_callback(args.progress),
                cancel=cancel,
            )
    if args.json:
        print_json(result.to_dict())
    else:
        print(
            f"{dst}: {result.format}, {result.size} bytes, sha256 {result.sha256}, in {result.seconds:.1f}s"
        )
    return EXIT_OK
