"""``imaging inspect`` and ``imaging convert``: the safety pipeline on one file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UsageError
from ..image.convert import convert_image
from ..image.formats import INPUT_FORMATS, OUTPUT_FORMATS
from ..image.inspect import inspect_image
from ..image.ova import is_ova
from ..image.ovaconvert import convert_ova
from .common import (
    EXIT_OK,
    EXIT_REJECTED,
    PROGRESS_MODES,
    cancel_on_signals,
    cli_scratch,
    decompression_reserve,
    print_json,
    progress_callback,
)


def add_commands(sub: Any) -> None:
    """Add ``inspect`` and ``convert`` to the ``imaging`` subcommands."""
    s = sub.add_parser(
        "inspect",
        help="check an untrusted image and report its real format",
        description="Detect the real format of FILE from its content, run every safety "
        "check and qemu-img info/check under resource limits. Exit 0 when safe, 2 when rejected.",
    )
    s.add_argument("file")
    s.add_argument(
        "-f",
        "--format",
        metavar="CLAIMED",
        help=f"format the image claims to be ({', '.join(INPUT_FORMATS)}; '.gz'-style suffix "
        "for compressed input)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser(
        "convert",
        help="inspect, then convert an image with qemu-img",
        description="Inspect SRC (rejected: exit 2, nothing written), convert it to FMT, "
        "re-inspect the output and move it to DST atomically (or write a block device).",
    )
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument(
        "-t",
        "--to",
        required=True,
        choices=OUTPUT_FORMATS,
        metavar="FMT",
        help=f"output format: {', '.join(OUTPUT_FORMATS)}",
    )
    s.add_argument(
        "-f",
        "--from",
        dest="from_format",
        metavar="CLAIMED",
        help="format SRC claims to be; 'ova' (or a tar SRC): every disk of the OVA, the boot disk to DST, "
        "the others to DST-disk2, DST-disk3, ... beside it",
    )
    s.add_argument("--subformat", help="vhd: dynamic (default) or fixed")
    s.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="progress on stderr: a bar on a terminal, JSON lines otherwise (auto)",
    )
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.set_defaults(func=cmd_convert)


def cmd_inspect(args: argparse.Namespace, cfg: Config) -> int:
    src = Path(args.file)
    if not src.is_file():
        raise UsageError(f"no such image file: {src}")
    with cli_scratch(cfg) as scratch, cancel_on_signals() as cancel:
        reserve = decompression_reserve(scratch, src)
        result = inspect_image(
            src, args.format, config=cfg, workdir=scratch.path, reserve=reserve, cancel=cancel
        )
    if args.json:
        print_json(result.to_dict())
    else:
        verdict = "safe" if result.safe else "REJECTED"
        print(f"{src}: {verdict}")
        print(
            f"  format:       {result.format or 'unknown'}"
            + (f" (compressed: {result.compression})" if result.compression else "")
        )
        if result.virtual_size is not None:
            print(f"  virtual size: {result.virtual_size} bytes")
        if result.actual_size is not None:
            print(f"  actual size:  {result.actual_size} bytes")
        for f in result.findings:
            print(f"  {f.severity.upper():7} {f.code}: {f.message}")
    return EXIT_OK if result.safe else EXIT_REJECTED


def cmd_convert(args: argparse.Namespace, cfg: Config) -> int:
    src = Path(args.src)
    if not src.is_file():
        raise UsageError(f"no such image file: {src}")
    if args.from_format == "ova" or (args.from_format is None and is_ova(src)):
        return _convert_ova(args, cfg, src)
    with cli_scratch(cfg) as scratch, cancel_on_signals() as cancel:
        result = convert_image(
            src,
            Path(args.dst),
            args.to,
            args.from_format,
            config=cfg,
            workdir=scratch.path,
            subformat=args.subformat,
            on_progress=progress_callback(args.progress),
            cancel=cancel,
            reserve=decompression_reserve(scratch, src),
        )
    if args.json:
        print_json(result.to_dict())
    else:
        print(
            f"{result.dst}: {result.format}"
            + (f" ({result.subformat})" if result.subformat else "")
            + f", virtual size {result.virtual_size} bytes, {result.bytes_written} bytes written"
            f" in {result.seconds:.1f}s"
        )
    return EXIT_OK


def _convert_ova(args: argparse.Namespace, cfg: Config, src: Path) -> int:
    with cli_scratch(cfg) as scratch, cancel_on_signals() as cancel:
        result = convert_ova(
            src,
            Path(args.dst),
            args.to,
            config=cfg,
            workdir=scratch.path,
            subformat=args.subformat,
            on_progress=progress_callback(args.progress),
            cancel=cancel,
        )
    if args.json:
        print_json(result.to_dict())
    else:
        for out in result.outputs:
            print(f"{out.dst}: {out.format}, virtual size {out.virtual_size} bytes, from the OVA")
    return EXIT_OK
