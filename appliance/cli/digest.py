"""``imaging digest``: the chunked SHA-256 (``sha256-chunked``) of a file, as an export records it, so a
user can check a downloaded export without the appliance (:mod:`appliance.targets.chunkdigest`: the
definition, and the same check with coreutils and xxd)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from ..config import Config, parse_size
from ..errors import ConfigError, UsageError
from ..targets.chunkdigest import ALGORITHM, DEFAULT_CHUNK, digest_file
from .common import EXIT_OK, cancel_on_signals, print_json


def add_commands(sub: Any) -> None:
    """Add ``digest`` to the ``imaging`` subcommands."""
    s = sub.add_parser(
        "digest",
        help="the chunked SHA-256 of a file, as an export records it (to check a downloaded export)",
        description=f"Print the {ALGORITHM} digest of FILE: sha256 of the concatenated sha256 digests of "
        "its CHUNK-byte chunks (the last may be shorter); the same value, base64-N, is S3's composite "
        "SHA-256 checksum of an object uploaded in parts of CHUNK bytes. Holes are not read. Exit 1 when "
        "--expect is given and differs.",
    )
    s.add_argument("file", type=Path)
    s.add_argument(
        "--chunk-size",
        default=str(DEFAULT_CHUNK),
        help="bytes per chunk, as the export recorded it (default 64MiB; e.g. 67108864, 64MiB)",
    )
    s.add_argument("--sha256", action="store_true", help="also the plain sha256 of the whole file")
    s.add_argument("--expect", help="the recorded value (hex, or S3's base64-N form) to compare with")
    s.add_argument("--threads", type=int, default=0, help="hashing threads (default: one per CPU)")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.set_defaults(func=cmd_digest, needs_config=False)


def cmd_digest(args: argparse.Namespace, cfg: Config | None) -> int:
    try:
        chunk = parse_size(args.chunk_size)
    except ConfigError as exc:
        raise UsageError(f"--chunk-size {args.chunk_size!r}: {exc}") from exc
    if not args.file.is_file() and not args.file.is_block_device():
        raise UsageError(f"no such file: {args.file}")
    with cancel_on_signals() as cancel:
        digest = digest_file(args.file, chunk, threads=args.threads, cancel=cancel)
        out: dict[str, Any] = {"file": str(args.file), "size": digest.size, **digest.to_dict()}
        if args.sha256:
            h = hashlib.sha256()
            with open(args.file, "rb", buffering=0) as f:
                while block := f.read(4 << 20):
                    h.update(block)
            out["sha256"] = h.hexdigest()
    matches = None
    if args.expect:
        given = args.expect.strip()
        # hex is case-insensitive; S3's base64-N form is not (base64 letters differ by case)
        matches = given.lower() == digest.hexdigest or given == digest.s3_checksum
        out["matches"] = matches
    if args.json:
        print_json(out)
    else:
        print(f"{ALGORITHM}:{chunk} {digest.hexdigest}  {args.file}  ({digest.chunks} chunks)")
        print(f"s3-checksum-sha256 {digest.s3_checksum}")
        if args.sha256:
            print(f"sha256 {out['sha256']}")
        if matches is not None:
            print("matches the expected digest" if matches else "DOES NOT match the expected digest")
    if matches is False:
        raise UsageError(f"{args.file} does not have the expected digest {args.expect}")
    return EXIT_OK
