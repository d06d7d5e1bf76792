"""Bundles out: a disk image as an EC2 instance-store bundle, as ``euca-bundle-image`` writes one.

:func:`write_bundle` streams the image once (``ec2-bundles.md`` §2 to §5): a tar stream of one member named
after the prefix (GNU header, mode 0644, uid/gid 0, mtime 0, padded to 10,240-byte records) with a
SHA-1 tap (the manifest's ``image/digest``) → gzip → AES-128-CBC (PKCS#7) under a fresh random key and
IV → parts of ``part_size`` bytes (10 MiB, named ``<prefix>.part.NN``), each handed to ``put`` as it is
complete with its SHA-1 → the manifest (``<prefix>.manifest.xml``, one line, the element order of §4)
with the key and IV (as their 32 lowercase hex characters) RSA PKCS#1 v1.5-encrypted for the cloud
certificate and, when one is given, the user certificate, signed SHA1withRSA over the raw
``<machine_configuration>`` + ``<image>`` bytes with the signer's key (the user's, or the node's for a
BundleInstance) or ``UNSIGNED`` without one. The manifest is put last, so a reader never finds a
manifest whose parts are missing.

The key and IV exist only in this process's memory and, wrapped, in the manifest: never logged.
Sinks: :class:`DirectorySink` (files, each written to a partial and renamed) and :class:`S3Sink`
(``put_object`` of each part, then the manifest).
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from xml.sax.saxutils import escape

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import Cancelled, UsageError
from ..partials import partial_file, publish
from .upload_policy import UploadPolicy, UploadPolicyInvalid

PART_SIZE = 10 * 1024 * 1024
RECORD_SIZE = 10240
BLOCK = 512
CHUNK = 1 << 20
BUNDLER = ("imaging-appliance", "1.0", "0")
#: a prefix is one plain name of at most 100 characters (one ustar header, no GNU long name)
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,@-]{0,99}$")
_ID = re.compile(r"^[a-z]{3}-[0-9a-fA-F]{8,17}$|^true$")
_MAPPING = re.compile(r"^[A-Za-z0-9/._-]{1,64}$")
ARCHITECTURES = ("i386", "x86_64", "armhf", "ppc", "ppc64", "ppc64le", "arm64")
IMAGE_TYPES = ("machine", "kernel", "ramdisk")


class Sink(Protocol):
    def put(self, name: str, data: bytes) -> None: ...


@dataclass(frozen=True)
class MachineConfiguration:
    architecture: str = "x86_64"
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    #: virtual name → device (``ami`` → ``sda1``, ``root`` → ``/dev/sda1``, ``ephemeral0`` → ``sdb``)
    block_device_mapping: Mapping[str, str] = field(default_factory=dict)

    def xml(self) -> str:
        out = f"<machine_configuration><architecture>{escape(self.architecture)}</architecture>"
        if self.block_device_mapping:
            out += "<block_device_mapping>"
            for virtual, device in sorted(self.block_device_mapping.items()):
                out += f"<mapping><virtual>{escape(virtual)}</virtual>"
                out += f"<device>{escape(device)}</device></mapping>"
            out += "</block_device_mapping>"
        if self.kernel_id:
            out += f"<kernel_id>{escape(self.kernel_id)}</kernel_id>"
        if self.ramdisk_id:
            out += f"<ramdisk_id>{escape(self.ramdisk_id)}</ramdisk_id>"
        return out + "</machine_configuration>"


@dataclass(frozen=True)
class BundleKeys:
    """Whom the bundle is for: the cloud's certificate (required), the user's, and who signs it."""

    cloud: rsa.RSAPublicKey
    user: rsa.RSAPublicKey | None = None
    signer: rsa.RSAPrivateKey | None = field(default=None, repr=False)


@dataclass(frozen=True)
class BundlePartOut:
    name: str
    size: int
    sha1: str


@dataclass(frozen=True)
class WrittenBundle:
    prefix: str
    manifest_name: str
    manifest: bytes
    parts: list[BundlePartOut]
    #: SHA-1 of the tar stream (``image/digest``)
    digest: str
    size: int
    bundled_size: int
    signed: bool


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix) or ".." in prefix:
        raise UsageError(
            f"bundle prefix {prefix[:80]!r} must be a plain name of at most 100 characters "
            "(letters, digits, . _ + = , @ -)"
        )
    return prefix


def _check_machine(machine: MachineConfiguration, image_type: str) -> None:
    if machine.architecture not in ARCHITECTURES:
        raise UsageError(f"architecture must be one of {', '.join(ARCHITECTURES)}")
    if image_type not in IMAGE_TYPES:
        raise UsageError(f"image type must be one of {', '.join(IMAGE_TYPES)}")
    for virtual, device in machine.block_device_mapping.items():
        if not _MAPPING.match(virtual) or not _MAPPING.match(device):
            raise UsageError(f"block device mapping {virtual[:40]!r} → {device[:40]!r} is not a device name")
    for what, value in (("kernel", machine.kernel_id), ("ramdisk", machine.ramdisk_id)):
        if value is not None and not _ID.match(value):
            raise UsageError(f"{what} id {value[:40]!r} is not an image id (eki-…, eri-…)")


class _Parts:
    """Cuts the ciphertext into parts of ``part_size`` and hands each to the sink with its SHA-1."""

    def __init__(self, prefix: str, sink: Sink, part_size: int) -> None:
        self.prefix, self.sink, self.part_size = prefix, sink, part_size
        self.buf = bytearray()
        self.parts: list[BundlePartOut] = []
        self.total = 0

    def write(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= self.part_size:
            self._emit(bytes(self.buf[: self.part_size]))
            del self.buf[: self.part_size]

    def close(self) -> None:
        if self.buf or not self.parts:
            self._emit(bytes(self.buf))
            self.buf.clear()

    def _emit(self, data: bytes) -> None:
        name = f"{self.prefix}.part.{len(self.parts):02}"
        self.sink.put(name, data)
        self.parts.append(BundlePartOut(name, len(data), hashlib.sha1(data).hexdigest()))
        self.total += len(data)


def _wrap(secret_hex: str, key: rsa.RSAPublicKey | None) -> str:
    if key is None:
        return ""
    return key.encrypt(secret_hex.encode("ascii"), padding.PKCS1v15()).hex()


def write_bundle(
    src: BinaryIO,
    size: int,
    prefix: str,
    keys: BundleKeys,
    sink: Sink,
    *,
    user: str,
    image_type: str = "machine",
    machine: MachineConfiguration | None = None,
    part_size: int = PART_SIZE,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> WrittenBundle:
    """Bundle the ``size`` bytes read from ``src`` as ``prefix`` into ``sink`` (module docstring)."""
    check_prefix(prefix)
    machine = machine or MachineConfiguration()
    _check_machine(machine, image_type)
    account = user.replace("-", "")
    if not re.fullmatch(r"[0-9A-Za-z]{1,64}", account):
        raise UsageError("the bundle's user must be an account id (digits, dashes stripped)")
    if part_size < 16:
        raise UsageError("the part size must be at least 16 bytes")
    key, iv = os.urandom(16), os.urandom(16)
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    padder = sym_padding.PKCS7(128).padder()
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)
    sha1 = hashlib.sha1()
    parts = _Parts(prefix, sink, part_size)
    tar_bytes = 0

    def tar_out(data: bytes) -> None:
        nonlocal tar_bytes
        tar_bytes += len(data)
        sha1.update(data)
        compressed = gz.compress(data)
        if compressed:
            parts.write(encryptor.update(padder.update(compressed)))

    info = tarfile.TarInfo(prefix)
    info.size, info.mode, info.mtime, info.uid, info.gid = size, 0o644, 0, 0, 0
    tar_out(info.tobuf(tarfile.GNU_FORMAT))
    done = 0
    while done < size:
        if cancel is not None and cancel.is_set():
            raise Cancelled("bundling cancelled")
        data = src.read(min(CHUNK, size - done))
        if not data:
            raise UsageError(f"the image ended after {done} bytes; {size} were announced")
        tar_out(data)
        done += len(data)
        if on_progress is not None:
            on_progress(done)
    tar_out(bytes(-size % BLOCK) + bytes(2 * BLOCK))
    tar_out(bytes(-tar_bytes % RECORD_SIZE))
    parts.write(encryptor.update(padder.update(gz.flush()) + padder.finalize()) + encryptor.finalize())
    parts.close()

    key_hex, iv_hex = key.hex(), iv.hex()
    parts_xml = "".join(
        f'<part index="{i}"><filename>{escape(p.name)}</filename>'
        f'<digest algorithm="SHA1">{p.sha1}</digest></part>'
        for i, p in enumerate(parts.parts)
    )
    mc = machine.xml()
    image = (
        f"<image><name>{escape(prefix)}</name><user>{escape(account)}</user><type>{image_type}</type>"
        f'<digest algorithm="SHA1">{sha1.hexdigest()}</digest><size>{size}</size>'
        f"<bundled_size>{parts.total}</bundled_size>"
        f'<ec2_encrypted_key algorithm="AES-128-CBC">{_wrap(key_hex, keys.cloud)}</ec2_encrypted_key>'
        f'<user_encrypted_key algorithm="AES-128-CBC">{_wrap(key_hex, keys.user)}</user_encrypted_key>'
        f"<ec2_encrypted_iv>{_wrap(iv_hex, keys.cloud)}</ec2_encrypted_iv>"
        f"<user_encrypted_iv>{_wrap(iv_hex, keys.user)}</user_encrypted_iv>"
        f'<parts count="{len(parts.parts)}">{parts_xml}</parts></image>'
    )
    signed = (mc + image).encode("ascii")
    signature = (
        keys.signer.sign(signed, padding.PKCS1v15(), hashes.SHA1()).hex() if keys.signer else "UNSIGNED"
    )
    name, version, release = BUNDLER
    manifest = (
        "<?xml version='1.0' encoding='ASCII'?>\n<manifest><version>2007-10-10</version>"
        f"<bundler><name>{name}</name><version>{version}</version><release>{release}</release></bundler>"
        f"{mc}{image}<signature>{signature}</signature></manifest>"
    ).encode("ascii")
    manifest_name = f"{prefix}.manifest.xml"
    sink.put(manifest_name, manifest)
    return WrittenBundle(
        prefix,
        manifest_name,
        manifest,
        parts.parts,
        sha1.hexdigest(),
        size,
        parts.total,
        keys.signer is not None,
    )


# --------------------------------------------------------------------------------------------- sinks


class DirectorySink:
    """Each file written to a partial in ``directory`` and renamed into place when complete."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written: list[Path] = []

    def put(self, name: str, data: bytes) -> None:
        dst = self.directory / name
        with partial_file(dst, None) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            publish(tmp, dst, 0o644)
        self.written.append(dst)

    def remove(self) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)


class S3Sink:
    """``put_object`` of each file under ``bucket``/``key_prefix`` with ``acl`` (a botocore S3 client).

    ``policy``: the upload policy the bundle is written under (BundleInstance). The appliance uploads
    with its own credentials, so what S3 would enforce for a policy upload is enforced here, at every
    object: the policy's expiration and its ``content-length-range`` maximum."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        key_prefix: str = "",
        acl: str | None = None,
        *,
        policy: UploadPolicy | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.client, self.bucket, self.key_prefix, self.acl = client, bucket, key_prefix, acl
        self.policy, self.now = policy, now
        self.written: list[str] = []

    def put(self, name: str, data: bytes) -> None:
        key = self.key_prefix + name
        if self.policy is not None:
            if self.now() >= self.policy.expiration:
                raise UploadPolicyInvalid(
                    "Expired",
                    f"the upload policy expired at {self.policy.expiration.isoformat()} before {key} went up",
                )
            if self.policy.max_length is not None and len(data) > self.policy.max_length:
                raise UploadPolicyInvalid(
                    "Size",
                    f"{key} is {len(data)} bytes; the upload policy allows at most {self.policy.max_length}",
                )
        extra: dict[str, Any] = {"ACL": self.acl} if self.acl else {}
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)
        self.written.append(key)

    def remove(self) -> None:
        for key in self.written:
            self.client.delete_object(Bucket=self.bucket, Key=key)


def manifest_names(bundle: WrittenBundle) -> Sequence[str]:
    """Every object name of ``bundle``, parts first."""
    return [*(p.name for p in bundle.parts), bundle.manifest_name]
