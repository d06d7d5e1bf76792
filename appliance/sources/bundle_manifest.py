"""EC2 image bundle manifests (``<prefix>.manifest.xml`` as ``ec2-bundle-image`` writes it): parsing,
signature and key unwrapping.

The manifest is untrusted XML: it is parsed with defusedxml (no DTD, no entities), at most
:data:`MAX_BUNDLE_MANIFEST_BYTES`. The signature (``ec2-bundles.md`` §5) is SHA1withRSA with the *user's*
private key over the raw bytes ``<machine_configuration>…</machine_configuration>`` followed by
``<image>…</image>``, with no canonicalization. Each of the two elements must occur exactly once in the
document (so a comment or CDATA holding ``<image>`` cannot change what is verified), and everything this
module hands out about the image is read from those same raw bytes, so what is used is what was signed.

The AES-128 key and IV are RSA PKCS#1 v1.5 encrypted for the cloud certificate as their 32 lowercase
hex characters (``ec2_encrypted_key``/``ec2_encrypted_iv``); :func:`unwrap` decrypts them with the
cloud's private key (a secret: never logged, never in a message).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import defusedxml.ElementTree as SafeET
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from defusedxml import DefusedXmlException

from .. import redact
from ..config import BundlesConfig
from ..errors import BundleInvalid, ConfigError
from .euca_manifest import CertificateFailure, load_certificates

MAX_BUNDLE_MANIFEST_BYTES = 8 * 2**20
MAX_PARTS = 100_000
#: a part file name: a plain name in the manifest's own bucket and prefix (no path, no URL)
_PART_NAME = re.compile(r"^[A-Za-z0-9._+=,@-]{1,255}$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_SHA1 = re.compile(r"^[0-9a-fA-F]{40}$")
_INT = re.compile(r"^[0-9]{1,19}$")


@dataclass(frozen=True)
class BundlePart:
    index: int
    filename: str
    #: lowercase SHA-1 hex of the part's bytes
    sha1: str


@dataclass(frozen=True)
class BundleManifest:
    """What is used of a bundle manifest (all of it from the signed ``<image>`` bytes)."""

    name: str
    #: lowercase SHA-1 hex of the uncompressed tar stream
    digest: str
    #: bytes of the unbundled image
    size: int
    #: bytes of the ciphertext (the parts together)
    bundled_size: int
    ec2_encrypted_key: str
    ec2_encrypted_iv: str
    #: in index order
    parts: list[BundlePart]
    #: ``<machine_configuration>`` + ``<image>`` as written: what the signature covers
    signed: bytes = field(repr=False)
    #: the hex signature, or ``UNSIGNED``
    signature: str = field(repr=False)


def _raw_element(data: bytes, name: str) -> bytes:
    start, end = b"<" + name.encode() + b">", b"</" + name.encode() + b">"
    if data.count(start) != 1 or data.count(end) != 1:
        raise BundleInvalid(
            "Manifest",
            f"the bundle manifest must hold exactly one <{name}> element written as the bundler does",
        )
    i, j = data.index(start), data.index(end) + len(end)
    if j < i:
        raise BundleInvalid("Manifest", f"the bundle manifest's <{name}> element is not closed")
    return data[i:j]


def _parse(data: bytes, what: str) -> ET.Element:
    try:
        return SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (DefusedXmlException, ET.ParseError) as exc:
        raise BundleInvalid("Manifest", f"the {what} is not well-formed XML: {exc}") from None


def _int(value: str | None, what: str) -> int:
    text = (value or "").strip()
    if not _INT.match(text) or int(text) > 2**63 - 1:
        raise BundleInvalid(
            "Manifest", f"bundle manifest {what} must be a non-negative integer, not {value!r}"
        )
    return int(text)


def parse_bundle_manifest(data: bytes) -> BundleManifest:
    """Parse an ``ec2-bundle-image`` manifest. Raises :class:`BundleInvalid` (``Manifest``,
    ``PartOutsideBucket``)."""
    if len(data) > MAX_BUNDLE_MANIFEST_BYTES:
        raise BundleInvalid(
            "Manifest", f"the bundle manifest is larger than {MAX_BUNDLE_MANIFEST_BYTES} bytes"
        )
    root = _parse(data, "bundle manifest")
    if root.tag != "manifest":
        raise BundleInvalid("Manifest", f"the document is a <{root.tag}>, not a bundle <manifest>")
    signed = _raw_element(data, "machine_configuration") + _raw_element(data, "image")
    signed_root = _parse(b"<signed>" + signed + b"</signed>", "signed part of the bundle manifest")
    image = signed_root.find("image")
    if image is None or len(signed_root) != 2:
        raise BundleInvalid("Manifest", "the bundle manifest has no <image> element")
    name = (image.findtext("name") or "").strip()
    digest_el = image.find("digest")
    digest = (digest_el.text or "").strip() if digest_el is not None else ""
    if digest_el is None or digest_el.get("algorithm", "SHA1").upper() != "SHA1" or not _SHA1.match(digest):
        raise BundleInvalid("Manifest", "the bundle manifest's image/digest is not a SHA1 hex digest")
    size = _int(image.findtext("size"), "image/size")
    bundled_size = _int(image.findtext("bundled_size"), "image/bundled_size")
    key = (image.findtext("ec2_encrypted_key") or "").strip()
    iv = (image.findtext("ec2_encrypted_iv") or "").strip()
    if not _HEX.match(key) or not _HEX.match(iv):
        raise BundleInvalid(
            "Manifest", "the bundle manifest has no hex ec2_encrypted_key and ec2_encrypted_iv"
        )
    parts_el = image.find("parts")
    elements = parts_el.findall("part") if parts_el is not None else []
    if not elements or len(elements) > MAX_PARTS:
        raise BundleInvalid("Manifest", "the bundle manifest lists no parts (or too many)")
    if parts_el is not None and parts_el.get("count") not in (None, str(len(elements))):
        raise BundleInvalid("Manifest", "the bundle manifest's parts@count differs from its part elements")
    parts: dict[int, BundlePart] = {}
    for el in elements:
        index = _int(el.get("index"), "part@index")
        filename = (el.findtext("filename") or "").strip()
        part_digest = el.find("digest")
        sha1 = (part_digest.text or "").strip().lower() if part_digest is not None else ""
        if index in parts or index >= len(elements):
            raise BundleInvalid("Manifest", f"bundle manifest part {index} is duplicated or out of range")
        if not _PART_NAME.match(filename) or filename in (".", ".."):
            raise BundleInvalid(
                "PartOutsideBucket",
                f"bundle manifest part {index} is named {filename[:80]!r}: a part must be a plain file name "
                "beside the manifest (no path, no URL)",
            )
        if (
            part_digest is None
            or part_digest.get("algorithm", "SHA1").upper() != "SHA1"
            or not _SHA1.match(sha1)
        ):
            raise BundleInvalid("Manifest", f"bundle manifest part {index} has no SHA1 digest")
        parts[index] = BundlePart(index, filename, sha1)
    signature = (root.findtext("signature") or "").strip()
    return BundleManifest(
        name=name,
        digest=digest.lower(),
        size=size,
        bundled_size=bundled_size,
        ec2_encrypted_key=key,
        ec2_encrypted_iv=iv,
        parts=[parts[i] for i in range(len(parts))],
        signed=signed,
        signature=signature,
    )


def is_bundle_manifest(data: bytes) -> bool:
    """Whether ``data`` looks like an ``ec2-bundle-image`` manifest (has ``ec2_encrypted_key``)."""
    return b"<manifest>" in data[:4096] and b"<ec2_encrypted_key" in data


# --------------------------------------------------------------------------------------------- keys


def load_public_keys(pem: bytes) -> list[rsa.RSAPublicKey]:
    """The RSA public keys of the PEM certificates / public keys in ``pem`` (user certificates)."""
    try:
        return load_certificates(pem)
    except CertificateFailure as exc:
        raise BundleInvalid("Signature", f"the user certificate cannot be used: {exc.message}") from None


def verify_signature(manifest: BundleManifest, user_keys: Sequence[rsa.RSAPublicKey]) -> None:
    """Check the manifest's SHA1withRSA signature against one of ``user_keys``.

    Raises ``BundleInvalid.Signature``."""
    if manifest.signature.upper() == "UNSIGNED" or not manifest.signature:
        raise BundleInvalid(
            "Signature", "the bundle manifest is not signed, but a user certificate was given"
        )
    try:
        signature = bytes.fromhex(manifest.signature)
    except ValueError:
        raise BundleInvalid("Signature", "the bundle manifest's signature is not hexadecimal") from None
    for key in user_keys:
        try:
            key.verify(signature, manifest.signed, padding.PKCS1v15(), hashes.SHA1())
            return
        except InvalidSignature:
            continue
    raise BundleInvalid(
        "Signature",
        "the bundle manifest's signature does not verify against the user certificate: it was changed after "
        "it was signed, or signed by someone else",
    )


def load_private_key(pem: bytes) -> rsa.RSAPrivateKey:
    """The cloud's RSA private key from PEM; ``BundleInvalid.Key`` (without quoting it) otherwise."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise BundleInvalid("Key", "the cloud key is not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BundleInvalid("Key", "the cloud key is not an RSA private key")
    return key


def unwrap(hex_ciphertext: str, key: rsa.RSAPrivateKey, what: str) -> bytes:
    """The 16 bytes of an AES key or IV the bundler encrypted (as 32 hex characters) for this key."""
    try:
        plain = key.decrypt(bytes.fromhex(hex_ciphertext), padding.PKCS1v15())
    except ValueError:
        plain = b""
    if len(plain) != 32 or not _HEX.match(plain.decode("latin-1")):
        raise BundleInvalid(
            "Key",
            f"the cloud key does not decrypt the bundle's {what}: the bundle was made for another cloud "
            "certificate, or the manifest is corrupt",
        )
    return bytes.fromhex(plain.decode("ascii"))


def configured_cloud_key(bundles: BundlesConfig, key_file: Path | None = None) -> rsa.RSAPrivateKey:
    """The cloud's private key: ``key_file`` when given, else ``bundles.cloud_private_key`` or
    ``bundles.cloud_private_key_file`` (read now). The PEM text is registered with :mod:`appliance.redact`
    before anything else happens, so no message can show it. Raises :class:`ConfigError` when none is
    set or the file cannot be read, ``BundleInvalid.Key`` when it is not an RSA private key."""
    path = key_file or bundles.cloud_private_key_file
    if path is not None:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"the cloud private key file cannot be read: {exc.strerror}") from None
    elif bundles.cloud_private_key:
        pem = bundles.cloud_private_key.encode()
    else:
        raise ConfigError(
            "no cloud private key is configured (bundles.cloud_private_key or "
            "bundles.cloud_private_key_file, or --cloud-key), so no bundle can be decrypted"
        )
    text = pem.decode("latin-1")
    redact.remember([text, text.strip()])
    return load_private_key(pem)


def configured_signer_keys(bundles: BundlesConfig) -> list[rsa.RSAPublicKey]:
    """The public keys of ``bundles.signer_certs`` / ``bundles.signer_certs_file`` (read now); [] when
    none is configured. Raises :class:`ConfigError` when they cannot be read or hold no certificate."""
    if bundles.signer_certs_file is not None:
        try:
            pem = bundles.signer_certs_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"bundles.signer_certs_file cannot be read: {exc.strerror}") from None
    elif bundles.signer_certs:
        pem = bundles.signer_certs.encode()
    else:
        return []
    try:
        return load_certificates(pem)
    except CertificateFailure as exc:
        raise ConfigError(f"bundles.signer_certs cannot be used: {exc.message}") from None
