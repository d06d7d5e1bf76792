"""Eucalyptus download manifests: the signed document the Imaging service hands a worker.

The cloud turns the user's import manifest into a *download manifest* (``DownloadManifestFactory``;
``ec2-import-api.md`` §11.6, ``eucalyptus-worker-auth.md`` §7), stores it and hands out its presigned
URL with an ``imaging@`` user-info marker (:func:`strip_marker` removes it before any GET). As the cloud
serializes it (Java ``Transformer``, UTF-8, no whitespace between elements)::

    <?xml version="1.0" encoding="UTF-8" standalone="no"?><manifest><version>2014-01-14</version>
    <file-format>RAW|VMDK|VHD|BUNDLE</file-format>[<bundle>…</bundle>]<image><size>N</size><parts>
    <part index="0"><get-url>…</get-url>[<digest algorithm="SHA1">hex</digest>]</part>…</parts></image>
    <signature algorithm="RSA-SHA256">hex</signature></manifest>

The signature is SHA256withRSA, with the cloud's private key, over the concatenation of the serialized
``version``, ``file-format``, ``bundle`` (when present) and ``image`` elements: exactly the bytes between
``<manifest>`` and ``<signature``. :func:`verify_and_parse` checks it over those raw bytes **before**
reading anything from the document, with a fixed algorithm (``cryptography``: PKCS#1 v1.5, SHA-256),
and only then parses them (defusedxml, bounded size). Since every element it then interprets lies in
the signed bytes (the document must be ``<manifest>`` + signed bytes + the signature element, nothing
else, no DTD, UTF-8), what is used is what the cloud signed. A missing, malformed or wrong signature is
:class:`CertificateFailure` (Eucalyptus' code).

``BUNDLE`` manifests (instance-store bundles, ``ec2-bundles.md`` §9) carry ``<bundle>`` (the AES key and
IV re-encrypted for this worker's certificate, and the unbundled size) and SHA1 part digests; they are
parsed into :attr:`DownloadManifest.bundle` and unbundled by :mod:`appliance.steps.bundles`.
:func:`build_download_manifest` writes a manifest the way the
cloud does, for the reference controller.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

import defusedxml.ElementTree as SafeET
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from defusedxml import DefusedXmlException

from ..config import ControllerConfig
from ..errors import ImagingError
from ..redact import redact_url
from .http import HttpClient, SourceUnavailable
from .manifest import MAX_MANIFEST_BYTES, ImportManifest, ManifestInvalid, Part

VERSION = "2014-01-14"
ALGORITHM = "RSA-SHA256"
FILE_FORMATS = ("RAW", "VMDK", "VHD")
MARKER = "imaging"
GiB = 1 << 30
_INT = re.compile(r"^[0-9]{1,19}$")
_HEX = re.compile(r"^[0-9a-fA-F]{2,8192}$")
_SHA1 = re.compile(r"^[0-9a-fA-F]{40}$")
_HEAD = re.compile(rb"^(?:\xef\xbb\xbf)?(?:<\?xml\s(?P<decl>[^?>]{0,200})\?>)?\s{0,64}<manifest>")
_ENCODING = re.compile(rb"""encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_CONTENT_RANGE = re.compile(r"^bytes 0-0/([0-9]{1,19})$")
_TAIL = re.compile(rb'<signature algorithm="([^"<>]{0,64})">([^<]{0,8192})</signature></manifest>\s{0,64}\Z')


class CertificateFailure(ImagingError):
    """The download manifest's signature is missing or does not verify against the cloud certificate,
    or no cloud certificate is configured."""

    code = "CertificateFailure"


class BundleManifestUnsupported(ImagingError):
    """A ``BUNDLE`` download manifest that cannot be handled here (kept for the wire table)."""

    code = "ManifestUnsupported.Bundle"


@dataclass(frozen=True)
class DownloadPart:
    index: int
    get_url: str
    digest_algorithm: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class DownloadBundle:
    """The ``<bundle>`` element of a BUNDLE download manifest."""

    #: hex RSA ciphertexts of the 32 hex characters of the AES key / IV, for this worker's certificate
    encrypted_key: str
    encrypted_iv: str
    #: bytes of the image once unbundled
    unbundled_size: int


@dataclass(frozen=True)
class DownloadManifest:
    """A verified download manifest."""

    version: str
    #: RAW, VMDK, VHD or BUNDLE
    file_format: str
    #: ``image/size``: the bytes of the uploaded file (of the ciphertext, for a BUNDLE)
    size: int
    #: in index order
    parts: list[DownloadPart]
    #: BUNDLE only
    bundle: DownloadBundle | None = None


# --------------------------------------------------------------------------------------------- the marker


def strip_marker(url: str) -> str:
    """Drop the ``imaging@`` user-info marker the cloud puts in download-manifest URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.username == MARKER and parts.password is None:
        return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.split("@", 1)[1]))
    return url


# --------------------------------------------------------------------------------------------- certificates


def load_certificates(pem: bytes | str) -> list[rsa.RSAPublicKey]:
    """The RSA public keys of the PEM certificates (or public keys) in ``pem``; several allow rotation.

    Raises :class:`CertificateFailure` when there is none.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    keys: list[rsa.RSAPublicKey] = []
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            keys += [
                k
                for c in x509.load_pem_x509_certificates(data)
                if isinstance(k := c.public_key(), rsa.RSAPublicKey)
            ]
        except ValueError as exc:
            raise CertificateFailure(f"the cloud certificate is not valid PEM: {exc}") from None
    for block in re.findall(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", data, re.S):
        key = serialization.load_pem_public_key(block)
        if isinstance(key, rsa.RSAPublicKey):
            keys.append(key)
    if not keys:
        raise CertificateFailure("no RSA certificate in the configured cloud certificate")
    return keys


def cloud_keys(controller: ControllerConfig) -> list[rsa.RSAPublicKey]:
    """The cloud certificate(s) of ``controller.cloud_cert`` and ``controller.cloud_cert_file`` (read
    now, so a replaced file is seen by the next task); :class:`CertificateFailure` when none is set."""
    pem = (controller.cloud_cert or "").encode()
    if controller.cloud_cert_file is not None:
        try:
            pem += b"\n" + controller.cloud_cert_file.read_bytes()
        except OSError as exc:
            raise CertificateFailure(
                f"the cloud certificate file {controller.cloud_cert_file} cannot be read: {exc.strerror}"
            ) from None
    if not pem.strip():
        raise CertificateFailure(
            "no cloud certificate is configured (controller.cloud_cert or controller.cloud_cert_file), so no "
            "download manifest can be verified"
        )
    return load_certificates(pem)


# --------------------------------------------------------------------------------------------- verifying


def signed_bytes(data: bytes) -> tuple[bytes, str, str]:
    """(the signed bytes, the signature's ``algorithm``, its hex text) of a serialized download
    manifest; :class:`CertificateFailure` when the document has no signature where the cloud puts it."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"the download manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    head = _HEAD.match(data)
    if head is None:
        raise CertificateFailure(
            "the download manifest does not start with <manifest> as the cloud writes it, so its signed "
            "bytes cannot be found"
        )
    decl = head.group("decl") or b""
    encoding = _ENCODING.search(decl)
    if encoding is not None and encoding.group(1).lower() not in (b"utf-8", b"utf8"):
        raise CertificateFailure(f"the download manifest is encoded in {encoding.group(1)!r}, not UTF-8")
    tail = _TAIL.search(data, head.end())
    if tail is None:
        raise CertificateFailure(
            "the download manifest is not signed (no <signature> element ends it); the cloud signs every "
            "download manifest"
        )
    return data[head.end() : tail.start()], tail.group(1).decode(), tail.group(2).decode("ascii", "replace")


def verify(data: bytes, keys: Sequence[rsa.RSAPublicKey]) -> bytes:
    """Check the signature of a serialized download manifest against ``keys``; the signed bytes.

    Raises :class:`CertificateFailure`.
    """
    signed, algorithm, hex_signature = signed_bytes(data)
    if algorithm != ALGORITHM:
        raise CertificateFailure(f"the download manifest is signed with {algorithm!r}, not {ALGORITHM}")
    try:
        signature = bytes.fromhex(hex_signature.strip())
    except ValueError:
        raise CertificateFailure("the download manifest's signature is not hexadecimal") from None
    for key in keys:
        try:
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
            return signed
        except InvalidSignature:
            continue
    raise CertificateFailure(
        "the download manifest's signature does not verify against the cloud certificate: it was changed "
        "after the cloud signed it, or signed by another cloud"
    )


def verify_and_parse(data: bytes, keys: Sequence[rsa.RSAPublicKey]) -> DownloadManifest:
    """Verify (:func:`verify`), then parse the signed elements. Raises :class:`CertificateFailure`,
    :class:`BundleManifestUnsupported`, :class:`ManifestInvalid`."""
    signed = verify(data, keys)
    try:
        # The signed bytes alone, wrapped: everything interpreted below is covered by the signature.
        root = SafeET.fromstring(
            b"<manifest>" + signed + b"</manifest>",
            forbid_dtd=True,
            forbid_entities=True,
            forbid_external=True,
        )
    except (DefusedXmlException, ET.ParseError) as exc:
        raise ManifestInvalid(f"the download manifest is not well-formed XML: {exc}") from None
    names = [c.tag for c in root]
    if names not in (["version", "file-format", "image"], ["version", "file-format", "bundle", "image"]):
        raise ManifestInvalid(
            f"the download manifest has the elements {names}, not version, file-format, [bundle], image"
        )
    version = (root[0].text or "").strip()
    if version != VERSION:
        raise ManifestInvalid(f"download manifest version {version!r} is not {VERSION}")
    file_format = (root[1].text or "").strip().upper()
    bundle = None
    if file_format == "BUNDLE" or names[2] == "bundle":
        if file_format != "BUNDLE" or names[2] != "bundle":
            raise ManifestInvalid("a BUNDLE download manifest needs both file-format BUNDLE and <bundle>")
        bundle = _bundle(root[2])
    elif file_format not in FILE_FORMATS:
        raise ManifestInvalid(f"download manifest file-format {file_format!r} is not one of RAW, VMDK, VHD")
    image = root[-1]
    size = _int(image.findtext("size"), "image/size")
    if size <= 0:
        raise ManifestInvalid("download manifest image/size must be greater than 0")
    elements = image.findall("parts/part")
    parts: dict[int, DownloadPart] = {}
    for el in elements:
        index = _int(el.get("index"), "part@index")
        url = (el.findtext("get-url") or "").strip()
        if index in parts or index >= len(elements) or not url:
            raise ManifestInvalid(
                f"download manifest part {index}: duplicated, out of range or without get-url"
            )
        digest = el.find("digest")
        parts[index] = DownloadPart(
            index,
            strip_marker(url),
            digest.get("algorithm") if digest is not None else None,
            (digest.text or "").strip() if digest is not None else None,
        )
    if not parts:
        raise ManifestInvalid("the download manifest lists no parts")
    if bundle is not None and any(
        p.digest_algorithm is None or p.digest_algorithm.upper() != "SHA1" or not _SHA1.match(p.digest or "")
        for p in parts.values()
    ):
        raise ManifestInvalid("every part of a BUNDLE download manifest needs a SHA1 digest")
    return DownloadManifest(version, file_format, size, [parts[i] for i in range(len(parts))], bundle)


def _bundle(element: ET.Element) -> DownloadBundle:
    key = (element.findtext("encrypted-key") or "").strip()
    iv = (element.findtext("encrypted-iv") or "").strip()
    if not _HEX.match(key) or not _HEX.match(iv):
        raise ManifestInvalid("the BUNDLE download manifest's encrypted-key and encrypted-iv must be hex")
    return DownloadBundle(key, iv, _int(element.findtext("unbundled-size"), "bundle/unbundled-size"))


def _int(value: str | None, what: str) -> int:
    text = (value or "").strip()
    if not _INT.match(text) or int(text) > 2**63 - 1:
        raise ManifestInvalid(f"download manifest {what} must be a non-negative integer, not {value!r}")
    return int(text)


def to_import_manifest(
    manifest: DownloadManifest, lengths: Sequence[int], image_format: str
) -> ImportManifest:
    """The :class:`ImportManifest` (byte ranges) of ``manifest`` once each part's length is known, so the
    import manifest's downloader (lengths, MD5s, checkpoints, resume) reads it.

    ``image_format`` is the task's: the cloud writes ``file-format`` RAW into every import's download
    manifest (``ImportImageManifest.getFileType()``), whatever was uploaded. The parts must cover
    ``image/size`` exactly for a RAW image; a VMDK or VHD is taken at the parts' total (Eucalyptus
    skipped the size check for them) and inspected as any upload."""
    total = sum(lengths)
    if image_format == "RAW" and total != manifest.size:
        raise ManifestInvalid(
            f"the parts of the download manifest hold {total} bytes but image/size is {manifest.size}"
        )
    parts, start = [], 0
    for part, length in zip(manifest.parts, lengths, strict=True):
        if length <= 0:
            raise ManifestInvalid(f"download manifest part {part.index} is empty")
        parts.append(
            Part(part.index, start, start + length - 1, f"part-{part.index}", part.get_url, part.get_url)
        )
        start += length
    return ImportManifest(
        version=manifest.version,
        file_format=image_format,
        importer=None,
        self_destruct_url=None,
        size=total,
        volume_size=max(1, -(-total // GiB)),
        parts=parts,
    )


# --------------------------------------------------------------------------------------------- fetching


def fetch_download_manifest(
    url: str, keys: Sequence[rsa.RSAPublicKey], http: HttpClient, cancel: threading.Event | None = None
) -> DownloadManifest:
    """GET the download manifest at ``url`` (marker stripped), verify it, parse it.

    Raises :class:`SourceUnavailable` (not readable), :class:`CertificateFailure`, :class:`ManifestInvalid`,
    :class:`BundleManifestUnsupported`.
    """
    url = strip_marker(url)
    with http.get_stream(url, cancel=cancel) as response:
        if response.status != 200:
            raise SourceUnavailable(
                f"the download manifest {redact_url(url)} answered HTTP {response.status}; the presigned URL "
                "expired or the manifest is gone",
                status=response.status,
            )
        data = response.read(MAX_MANIFEST_BYTES)
    return verify_and_parse(data, keys)


def part_lengths(
    manifest: DownloadManifest, http: HttpClient, cancel: threading.Event | None = None
) -> list[int]:
    """The length of every part (a download manifest names none), each from the ``Content-Range`` of a
    one-byte GET (the presigned URLs are for GET only). Call it only on a verified manifest."""
    lengths = []
    for part in manifest.parts:
        with http.get_stream(part.get_url, (0, 0), cancel=cancel) as response:
            if response.status == 206:
                found = _CONTENT_RANGE.match(response.headers.get("Content-Range") or "")
                length = int(found.group(1)) if found else None
            elif response.status == 200:  # a server that ignores Range: the length, then close
                length = response.content_length
            else:
                raise SourceUnavailable(
                    f"part {part.index} of the download manifest ({redact_url(part.get_url)}) answered HTTP "
                    f"{response.status}",
                    status=response.status,
                )
        if length is None:
            raise SourceUnavailable(f"part {part.index} of the download manifest does not say its length")
        lengths.append(length)
    return lengths


# --------------------------------------------------------------------------------------------- writing


def build_download_manifest(
    file_format: str, size: int, part_urls: Sequence[str], sign: Callable[[bytes], bytes]
) -> bytes:
    """A download manifest as the cloud serializes it, signed by ``sign(data) -> signature``."""
    parts = "".join(
        f'<part index="{i}"><get-url>{escape(url)}</get-url></part>' for i, url in enumerate(part_urls)
    )
    signed = (
        f"<version>{VERSION}</version><file-format>{escape(file_format)}</file-format>"
        f"<image><size>{int(size)}</size><parts>{parts}</parts></image>"
    ).encode()
    signature = sign(signed).hex()
    return (
        b'<?xml version="1.0" encoding="UTF-8" standalone="no"?><manifest>'
        + signed
        + f"<signature algorithm={quoteattr(ALGORITHM)}>{signature}</signature></manifest>".encode()
    )


def rsa_signer(private_key_pem: bytes) -> Callable[[bytes], bytes]:
    """``sign(data)``: SHA256withRSA with the PEM private key (the cloud's)."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateFailure("the cloud key is not an RSA private key")
    return lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())
