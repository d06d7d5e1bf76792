"""``imaging export``: a RAW disk (or several, as one OVA) written as VMDK, VHD, RAW or OVA to a file.

A disk is a path (a file or a block device) or the id of a volume the appliance issued, ``vol-…`` (a
completed ImportVolume/ImportInstance; :meth:`appliance.service.resolver.Resolver.volume`): nothing in the
EC2 wire API takes a volume id (CreateInstanceExportTask takes an instance, ExportImage an image), so this
is where the operator exports one. A file or device volume is read where it is; an EC2 volume is attached
here (found by its serial) and detached afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UsageError
from ..service.resolver import Resolver
from ..store import Store
from ..targets import get_volume_target
from ..targets.diskexport import EXPORT_FORMATS, export_disk
from ..targets.ec2 import Ec2VolumeTarget
from ..targets.exportdest import FileDestination
from ..targets.exportova import OvaSource, export_ova
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
    s.add_argument(
        "src", help="the RAW disk: a file, a block device, or a volume id vol-… the appliance issued"
    )
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
        help="ova: a further RAW disk or vol-… (data disks follow the boot disk SRC)",
    )
    s.add_argument("--name", help="ova: the VM's name (default: DST's name without .ova)")
    s.add_argument("--firmware", choices=("bios", "efi"), default="bios", help="ova: the guest's firmware")
    s.add_argument("--platform", choices=("linux", "windows"), default="linux", help="ova: the guest's OS")
    s.add_argument("--cpus", type=int, default=1, help="ova: virtual CPUs")
    s.add_argument("--memory", type=int, default=1024, metavar="MIB", help="ova: memory in MiB")
    s.add_argument("--threads", type=int, default=0, help="deflate threads (default: one per CPU)")
    s.add_argument(
        "--sha256",
        action="store_true",
        default=None,
        help="also the whole-output sha256 (serial: ~0.9 CPU-s per GiB); by default only for VMDK, OVA "
        "and outputs of at most 256 MiB, the chunked digest (sha256-chunked) always",
    )
    s.add_argument("--progress", choices=PROGRESS_MODES, default="auto", help="progress on stderr")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.set_defaults(func=cmd_export)


_VOLUME_ID = re.compile(r"^vol-[0-9a-f]{8}(?:[0-9a-f]{9})?$")


@contextlib.contextmanager
def _disks(cfg: Config, names: list[str]) -> Iterator[list[Path]]:
    """The readable paths of the disks ``names`` (paths, or ``vol-…`` ids resolved through the task store;
    an EC2 volume is attached until the block ends)."""
    with contextlib.ExitStack() as stack:
        paths: list[Path] = []
        store: Store | None = None
        for name in names:
            if not _VOLUME_ID.match(name) or os.path.lexists(name):
                if not Path(name).exists():
                    raise UsageError(f"no such disk: {name}")
                paths.append(Path(name))
                continue
            if store is None:
                store = Store(cfg.store)
                stack.callback(store.close)
            volume = Resolver(cfg, store).volume(name)["volume"]
            if volume.get("type") == "ec2":
                target = get_volume_target(cfg)
                if not isinstance(target, Ec2VolumeTarget):
                    raise UsageError(f"{name} is an EC2 volume but the volume target is not ec2")
                attached = target.adopt(str(volume["volume_id"]), f"cli-export-{os.getpid()}")
                stack.callback(target.release, attached.info)
                paths.append(attached.path)
            elif volume.get("path") and Path(volume["path"]).exists():
                paths.append(Path(volume["path"]))
            else:
                raise UsageError(f"the volume {name} is no longer where its import wrote it")
        yield paths


def cmd_export(args: argparse.Namespace, cfg: Config) -> int:
    dst = Path(args.dst)
    if args.disk and args.to != "ova":
        raise UsageError("--disk adds disks to an OVA; use --to ova")
    with (
        _disks(cfg, [args.src, *args.disk]) as disks,
        cli_scratch(cfg) as scratch,
        cancel_on_signals() as cancel,
    ):
        src = disks[0]
        if args.to == "ova":
            result = export_ova(
                [OvaSource(d) for d in disks],
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
                full_sha256=args.sha256,
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
                full_sha256=args.sha256,
            )
    if args.json:
        print_json(result.to_dict())
    else:
        digest = result.digest
        print(
            f"{dst}: {result.format}, {result.size} bytes, "
            f"{digest.get('algorithm')}:{digest.get('chunk_size')} {digest.get('value')}, "
            f"sha256 {result.sha256 or '(not computed; --sha256)'}, "
            f"in {result.seconds:.1f}s"
        )
    return EXIT_OK
