"""``imaging unbundle``: an EC2 image bundle (manifest + encrypted parts) to a raw image file;
``imaging bundle``: a raw image file to an EC2 image bundle (a directory or ``s3://bucket/prefix/``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..config import Config
from ..errors import UsageError
from ..sources import s3 as s3mod
from ..sources.bundle import BundleLocation, unbundle_to_file
from ..sources.bundle_manifest import configured_cloud_key, configured_signer_keys, load_public_keys
from ..sources.euca_manifest import CertificateFailure, load_certificates
from ..sources.s3names import bucket_problem
from ..sources.urlfilter import UrlPolicy
from ..targets.bundle import (
    ARCHITECTURES,
    BundleKeys,
    DirectorySink,
    MachineConfiguration,
    S3Sink,
    Sink,
    write_bundle,
)
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
        help="PEM certificate(s) of the bundle's owner: the manifest signature must verify against one "
        "(default: bundles.signer_certs[_file] of the configuration, when set)",
    )
    s.add_argument("--parallel", type=int, metavar="N", help="parts fetched at once (bundles.parallel_parts)")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.set_defaults(func=cmd_unbundle)

    b = sub.add_parser(
        "bundle",
        help="make an EC2 image bundle (as ec2-bundle-image) of a raw image file",
        description="tar → gzip → AES-128-CBC (fresh key and IV) → 10 MiB parts → manifest with the key and "
        "IV encrypted for the cloud certificate (and the user certificate), signed with the user key. "
        "OUTPUT is a directory or s3://bucket/prefix/ (sources.s3); the manifest is written last.",
    )
    b.add_argument("image")
    b.add_argument("output")
    b.add_argument("--cloud-cert", type=Path, required=True, metavar="CERT", help="the cloud's certificate")
    b.add_argument(
        "--user-cert", type=Path, metavar="CERT", help="the owner's certificate (user_encrypted_*)"
    )
    b.add_argument("--user-key", type=Path, metavar="KEY", help="the key that signs the manifest")
    b.add_argument("--user", required=True, metavar="ACCOUNT", help="the owner's account id")
    b.add_argument("--prefix", help="the bundle's name (default: the image's file name)")
    b.add_argument("--arch", default="x86_64", choices=ARCHITECTURES)
    b.add_argument("--kernel", metavar="EKI", help="kernel_id of the machine configuration")
    b.add_argument("--ramdisk", metavar="ERI", help="ramdisk_id of the machine configuration")
    b.add_argument("--part-size", type=int, default=10 * 1024 * 1024, help=argparse.SUPPRESS)
    b.add_argument("--json", action="store_true", help="print the result as one JSON object")
    b.set_defaults(func=cmd_bundle)


def _public_key(path: Path) -> rsa.RSAPublicKey:
    try:
        return load_certificates(path.read_bytes())[0]
    except (OSError, CertificateFailure) as exc:
        raise UsageError(f"{path}: not a readable RSA certificate ({exc})") from None


def _private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        raise UsageError(f"{path}: not a readable unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UsageError(f"{path}: not an RSA private key")
    return key


def cmd_bundle(args: argparse.Namespace, cfg: Config) -> int:
    keys = BundleKeys(
        cloud=_public_key(args.cloud_cert),
        user=_public_key(args.user_cert) if args.user_cert else None,
        signer=_private_key(args.user_key) if args.user_key else None,
    )
    image = Path(args.image)
    machine = MachineConfiguration(args.arch, args.kernel, args.ramdisk)
    sink: Sink
    if args.output.lower().startswith("s3://"):
        bucket, _, key_prefix = args.output[len("s3://") :].partition("/")
        if bucket_problem(bucket) is not None:
            raise UsageError(f"{bucket[:80]!r} is not an S3 bucket name: {bucket_problem(bucket)}")
        client = s3mod.s3_client(cfg.sources.s3, UrlPolicy.from_config(cfg.sources))
        sink = S3Sink(
            client, bucket, key_prefix if not key_prefix or key_prefix.endswith("/") else key_prefix + "/"
        )
    else:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        sink = DirectorySink(Path(args.output))
    with cancel_on_signals() as cancel, open(image, "rb") as src:
        result = write_bundle(
            src,
            image.stat().st_size,
            args.prefix or image.name,
            keys,
            sink,
            user=args.user,
            machine=machine,
            part_size=args.part_size,
            cancel=cancel,
        )
    if args.json:
        print_json(
            {
                "manifest": result.manifest_name,
                "parts": [p.name for p in result.parts],
                "size": result.size,
                "bundled_size": result.bundled_size,
                "digest": result.digest,
                "signed": result.signed,
            }
        )
    else:
        print(f"{result.manifest_name}: {len(result.parts)} parts, {result.bundled_size} bytes")
    return EXIT_OK


def cmd_unbundle(args: argparse.Namespace, cfg: Config) -> int:
    cloud_key = configured_cloud_key(cfg.bundles, args.cloud_key)
    if args.user_cert:
        user_keys = load_public_keys(args.user_cert.read_bytes())
    else:
        user_keys = configured_signer_keys(cfg.bundles)
    with cancel_on_signals() as cancel:
        location = BundleLocation(args.manifest, UrlPolicy.from_config(cfg.sources), cancel=cancel)
        result = unbundle_to_file(
            location,
            cloud_key,
            Path(args.output),
            user_keys=user_keys,
            parallel=args.parallel or cfg.bundles.parallel_parts,
            max_bytes=cfg.limits.max_decompressed_size,
            limits=cfg.limits,
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
