"""``imaging unbundle``: an EC2 image bundle (manifest + encrypted parts) to a raw image file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import Config
from ..sources.bundle import BundleLocation, unbundle_to_file
from ..sources.bundle_manifest import configured_cloud_key, load_public_keys
from ..sources.urlfilter import UrlPolicy
from .common import EXIT_OK, cancel_on_signals, print_json


def add_commands(sub: Any) -> None:
    """Add ``unbundle`` to the ``imaging`` subcommands."""
    s = sub.add_parser(
        "unbundle",
        help="decrypt and unpack an EC2 image bundle (ec2-bundle-image) into a raw image file",
        description="Read the bundle manifest MANIFEST (a local path, s3://bucket/key or an http(s) URL; "
        "the parts are beside it), verify its signature when --user-cert is given, decrypt the AES key "
        "and IV with the cloud's private key, fetch and SHA1-check the parts in parallel, decrypt, "
        "gunzip and untar them as one stream (exactly one regular member), check the image digest and "
        "write OUTPUT. On any failure nothing is written.",
    )
    s.add_argument("manifest")
    s.add_argument("output")
    s.add_argument(
        "--cloud-key",
        type=Path,
        metavar="KEY",
        help="PEM file of the cloud's private key (default: bundles.cloud_private_key[_file] of the "
        "configuration)",
    )
    s.add_argument(
        "--user-cert",
        type=Path,
        metavar="CERT",
        help="PEM certificate(s) of the bundle's owner: the manifest signature must verify against one",
    )
    s.add_argument("--parallel", type=int, metavar="N", help="parts fetched at once (bundles.parallel_parts)")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.set_defaults(func=cmd_unbundle)


def cmd_unbundle(args: argparse.Namespace, cfg: Config) -> int:
    cloud_key = configured_cloud_key(cfg.bundles, args.cloud_key)
    user_keys = load_public_keys(args.user_cert.read_bytes()) if args.user_cert else []
    with cancel_on_signals() as cancel:
        location = BundleLocation(args.manifest, UrlPolicy.from_config(cfg.sources), cancel=cancel)
        result = unbundle_to_file(
            location,
            cloud_key,
            Path(args.output),
            user_keys=user_keys,
            parallel=args.parallel or cfg.bundles.parallel_parts,
            max_bytes=cfg.limits.max_decompressed_size,
        )
    if args.json:
        print_json(
            {
                "path": str(result.path),
                "size": result.size,
                "sha256": result.sha256,
                "digest": result.digest,
                "name": result.name,
                "parts": result.parts,
                "signature_verified": bool(user_keys),
            }
        )
    else:
        print(f"{result.path}: {result.size} bytes from {result.parts} parts (sha256 {result.sha256})")
    return EXIT_OK
