"""``imaging validate FILE``: static guest validation from the command line.

Registered through the ``imaging.commands`` entry point. A file is first inspected exactly as ``imaging
inspect`` does (compressed input decompressed into scratch under the cap, the format detected from the
content, ``-f`` a claim that must match it, unsafe images rejected with their codes), then the guest is read
in the format found. A block device is read as raw (or as ``-f`` says). Exit status 0 when there are no error
findings, 2 when there are or the image was rejected, 1 for usage errors.
"""

from __future__ import annotations

import argparse
import stat
import sys
import threading
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UsageError
from ..guest import check_request, validate_image
from ..guest.report import GuestReport
from ..image.formats import INPUT_FORMATS, parse_claim
from ..image.inspect import inspect_image, require_safe
from .common import (
    EXIT_OK,
    EXIT_REJECTED,
    cancel_on_signals,
    cli_scratch,
    decompression_reserve,
    print_json,
)


def add_commands(sub: Any) -> None:
    """Add ``validate`` to the ``imaging`` subcommands."""
    s = sub.add_parser(
        "validate",
        help="check what is on a disk image and whether it will boot (guest findings)",
        description="Inspect FILE as `imaging inspect` does (format from the content, decompressed if "
        "compressed, unsafe images rejected), then read it without mounting or trusting it (in a "
        "resource-limited child process) and report its layout (disk or partition), partition table, "
        "filesystems, boot mode and operating system, with coded findings and what to do about each. "
        "Exit 0 without error findings, 2 with, or when inspection rejects the image.",
    )
    s.add_argument("file", help="image file (may be gzip/xz/zstd/bzip2-compressed) or block device")
    s.add_argument(
        "-f",
        "--format",
        metavar="CLAIMED",
        help=f"format the image claims to be ({', '.join(INPUT_FORMATS)}; '.gz'-style suffix for compressed "
        "input), checked against the content as by `imaging inspect`; default: detected from the content "
        "(a block device: raw)",
    )
    s.add_argument("--platform", choices=("Linux", "Windows"), help="the platform the import would request")
    s.add_argument(
        "--architecture",
        choices=("x86_64", "arm64", "i386"),
        help="the architecture the import would request",
    )
    s.add_argument(
        "--data-disk",
        action="store_true",
        help="the image is a data disk (ImportSnapshot/ImportVolume): boot findings are informational",
    )
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")
    s.set_defaults(func=cmd_validate)


def _validate(
    src: Path, claimed: str | None, bootable: bool, cfg: Config, cancel: threading.Event
) -> tuple[GuestReport, str, str | None]:
    """(guest report, format read, compression) of ``src``; ImageRejected when inspection rejects a file."""
    if stat.S_ISBLK(src.stat().st_mode):
        # inspection reads files; a block device holds a disk as it is: raw unless the user says otherwise
        fmt, compression = parse_claim(claimed or "raw")
        if compression is not None:
            raise UsageError(f"{src} is a block device: give its format without a compression suffix")
        return validate_image(src, fmt, bootable=bootable, config=cfg, cancel=cancel), fmt, None
    if not src.is_file():
        raise UsageError(f"not an image file or block device: {src}")
    with cli_scratch(cfg) as scratch:
        found = require_safe(
            inspect_image(
                src,
                claimed,
                config=cfg,
                workdir=scratch.path,
                reserve=decompression_reserve(scratch, src),
                cancel=cancel,
            )
        )
        if found.format is None:  # inspection names the format of every image it accepts
            raise UsageError(f"the format of {src} could not be determined")
        fmt = found.format
        report = validate_image(found.path, fmt, bootable=bootable, config=cfg, cancel=cancel)
    return report, fmt, found.compression


def cmd_validate(args: argparse.Namespace, cfg: Config) -> int:
    src = Path(args.file)
    if not src.exists():
        raise UsageError(f"no such image file: {src}")
    with cancel_on_signals() as cancel:
        report, fmt, compression = _validate(src, args.format, not args.data_disk, cfg, cancel)
    report = report.with_findings(report.findings + check_request(report, args.platform, args.architecture))
    result = report.to_dict() | {"format": fmt, "compression": compression}
    if args.json:
        print_json(result)
    else:
        print_report(str(src), result)
    return EXIT_REJECTED if report.errors else EXIT_OK


def _fmt_size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_report(name: str, r: dict[str, Any], out: Any = None) -> None:
    """The human-readable form of a guest report."""
    out = out or sys.stdout
    verdict = "OK" if r.get("ok") else "ERRORS"
    print(f"{name}: {verdict}", file=out)
    if r.get("format"):
        compressed = f" (compressed: {r['compression']})" if r.get("compression") else ""
        print(f"  format:      {r['format']}{compressed}", file=out)
    print(
        f"  layout:      {r['layout']}" + (f" ({r['partition_table']})" if r.get("partition_table") else ""),
        file=out,
    )
    for p in r.get("partitions") or []:
        flags = ", ".join(k for k in ("bootable", "esp", "bios_boot") if p.get(k))
        number = p["number"] if p["number"] is not None else "-"
        ident = " ".join(
            x
            for x in (
                f"label={p['label']}" if p.get("label") else "",
                f"uuid={p['uuid']}" if p.get("uuid") else "",
            )
            if x
        )
        print(
            f"  partition {number}: {_fmt_size(p.get('size'))} type {p.get('type') or '-'} "
            f"{p.get('filesystem') or 'no filesystem'} {ident}" + (f" [{flags}]" if flags else ""),
            file=out,
        )
    os_ = r.get("os") or {}
    if os_.get("family"):
        desc = os_.get("pretty_name") or os_.get("distribution") or os_["family"]
        print(
            f"  os:          {desc} ({os_['family']}, {os_.get('architecture') or 'architecture unknown'})",
            file=out,
        )
    else:
        print("  os:          not found", file=out)
    print(f"  boot mode:   {r.get('boot_mode') or 'none'}", file=out)
    if r.get("bootloader"):
        print(f"  bootloader:  {r['bootloader']['type']} ({', '.join(r['bootloader']['configs'])})", file=out)
    if r.get("kernels"):
        print(f"  kernels:     {', '.join(r['kernels'])}", file=out)
    if r.get("initrds"):
        print(f"  initrds:     {', '.join(r['initrds'])}", file=out)
    for f in r.get("findings") or []:
        print(f"  {f['severity'].upper():7} {f['code']}: {f['message']}", file=out)
