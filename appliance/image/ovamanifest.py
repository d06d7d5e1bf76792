"""An OVA's manifest (``.mf``) and certificate (``.cert``): their line forms, and checking them.

Manifest lines (``ova-ovf.md`` §3.1): ``ALG(file)= hex`` as open-vmdk and ESXi write them, with any spaces
around the parentheses and ``=`` (VirtualBox and old ovftool write ``SHA1 (file) = hex``), LF or CRLF line
ends, ``SHA1``, ``SHA256`` or ``SHA512`` with a digest of that algorithm's length; any other line is
``Ova.BadManifest``. Every member but the manifest and certificate must be listed and match
(``Ova.DigestMismatch``); a line naming a file the package does not hold is a warning
(``Ova.ManifestExtraEntry``), as virt-v2v has it (VMware writes such lines for components it left out):
what the package holds is still all verified, and a disk the descriptor needs is missing either way
(``Ova.MissingDisk``).

Certificate (§3.2): ``ALG(name.mf)= hex`` (the signature of the manifest's exact bytes), then the
signer's X.509 certificate in PEM, as open-vmdk's ``ova-compose --sign`` writes it (``openssl dgst -sign``:
RSA PKCS#1 v1.5, or ECDSA for an EC key). XenCenter's export writes the same lines (CRLF ends) with two
differences, both read: between the PEM lines the base64 of a Windows serialized certificate
(``X509ContentType.SerializedCert``: property records, the DER certificate one of them), and an SHA-256
signature made over the manifest's SHA-256 digest rather than its bytes (.NET's ``SignData`` given the
digest), so a signature is verified over the manifest's bytes, else over its digest in the line's algorithm
(either binds the manifest's bytes, the digest being collision-resistant). The signature is verified with
the embedded certificate in a confined child (:func:`appliance.image.confinedparse.run_parser`;
``cryptography`` parses the certificate): a signature that does not verify is ``Ova.BadSignature``, a
certificate without a manifest or one that cannot be read is ``Ova.BadCertificate``. The appliance holds no
trust store, so a verified signature proves the manifest is what the key in the certificate signed, not who
signed it: the finding (``Ova.SignatureVerified``) names the certificate's subject and says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..config import Limits
from ..errors import Finding, ImageRejected
from .confinedparse import run_parser

_LINE = re.compile(r"^(SHA1|SHA256|SHA384|SHA512)\s*\(([^()]+)\)\s*=\s*([0-9a-fA-F]+)\r?$")
_HEX_LENGTHS = {"SHA1": 40, "SHA256": 64, "SHA512": 128}
#: manifest algorithm names → hashlib names
ALGORITHMS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_END = "-----END CERTIFICATE-----"
#: the property of a Windows serialized certificate store element that holds the certificate's DER
_CERT_PROP = 32


_reject = ImageRejected.nothing_imported


def manifest(entries: list[tuple[str, str]]) -> bytes:
    """``SHA256(name)= hex`` lines (open-vmdk's and ESXi's form)."""
    return "".join(f"SHA256({name})= {digest}\n" for name, digest in entries).encode("ascii")


def parse_manifest(data: bytes, name: str) -> dict[str, tuple[str, str]]:
    """``{file: (algorithm, hex)}`` from a manifest; any line out of the grammar is ``Ova.BadManifest``."""
    out: dict[str, tuple[str, str]] = {}
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise _reject("Ova.BadManifest", f"the manifest {name} is not ASCII text") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None or len(m.group(3)) != _HEX_LENGTHS.get(m.group(1)):
            raise _reject("Ova.BadManifest", f"line {n} of the manifest {name} is not 'SHA256(file)= hex'")
        file = m.group(2).strip()
        if file in out:
            raise _reject("Ova.BadManifest", f"the manifest {name} lists {file!r} twice")
        out[file] = (m.group(1), m.group(3).lower())
    return out


def check_manifest(
    name: str, body: bytes, members: list[str], digests: dict[str, dict[str, str]]
) -> list[Finding]:
    """Check the manifest ``name`` (``body``) against the package's ``members`` (in order) and their
    computed ``digests`` (member → hashlib name → hex). Raises on what the module docstring refuses;
    returns the warnings."""
    listed = parse_manifest(body, name)
    findings: list[Finding] = []
    for member in members:
        if not member.lower().endswith((".mf", ".cert")) and member not in listed:
            raise _reject("Ova.BadManifest", f"the manifest does not list the member {member!r}")
    for file, (alg, digest) in listed.items():
        if file not in digests:
            findings.append(
                Finding.warning(
                    "Ova.ManifestExtraEntry",
                    f"the manifest lists {file[:100]!r}, which the OVA does not hold (not verified)",
                )
            )
            continue
        have = digests[file].get(ALGORITHMS[alg])
        if have is None:  # a disk read before the manifest is hashed with SHA-256 and SHA-1 only
            raise _reject(
                "Ova.BadManifest",
                f"the manifest lists {file!r} with {alg}, and comes after it in the OVA: put the .mf "
                "right after the .ovf (as the OVF specification orders it), or use SHA256",
            )
        if have != digest:
            raise _reject(
                "Ova.DigestMismatch",
                f"the {alg} of {file!r} is {have}, the manifest says {digest}: the OVA is damaged or "
                "was altered",
            )
    return findings


def check_certificate(
    name: str, body: bytes, manifests: dict[str, bytes], limits: Limits, workdir: Path | None = None
) -> Finding:
    """Verify the certificate ``name`` (``body``) over the manifest it names (``manifests``: name →
    bytes) in a confined child (module docstring); the ``Ova.SignatureVerified`` finding, or raises."""
    if not manifests:
        raise _reject("Ova.BadCertificate", f"{name} signs a manifest, and the OVA has none")
    request = {
        "cert": body.decode("latin-1"),
        "manifests": {k: v.decode("latin-1") for k, v in manifests.items()},
    }
    result = run_parser(
        __name__,
        json.dumps(request).encode("ascii"),
        limits,
        what="certificate check",
        failed=lambda message: _reject("Ova.BadCertificate", message),
        workdir=workdir,
    )
    return Finding.info("Ova.SignatureVerified", str(result["message"]))


def _verify(cert: bytes, manifests: dict[str, bytes]) -> str:
    """The child's work: what :func:`check_certificate` finds, as a message; raises ImageRejected."""
    text = cert.decode("latin-1")
    head, begin, _ = text.partition(_PEM_BEGIN)
    lines = [line for line in head.splitlines() if line.strip()]
    m = _LINE.match(lines[0]) if len(lines) == 1 else None
    if not begin or m is None:
        raise _reject(
            "Ova.BadCertificate", "the certificate is not 'ALG(name.mf)= hex' then a PEM certificate"
        )
    alg, signed, signature_hex = m.group(1), m.group(2).strip(), m.group(3)
    if signed not in manifests:
        raise _reject("Ova.BadCertificate", f"the certificate signs {signed[:100]!r}, not the OVA's manifest")
    pem = text[text.index(_PEM_BEGIN) :]
    try:
        certificate = _certificate(pem)
        signature = binascii.unhexlify(signature_hex)
    except (ValueError, binascii.Error) as exc:
        raise _reject("Ova.BadCertificate", f"the certificate cannot be read ({str(exc)[:100]})") from None
    digests = {"SHA1": hashes.SHA1(), "SHA256": hashes.SHA256(), "SHA384": hashes.SHA384()}
    digest = digests.get(alg, hashes.SHA512())
    key = certificate.public_key()
    # the manifest's bytes, as openssl dgst -sign signs; else its digest, as XenCenter's SHA-256 signing does
    body = manifests[signed]
    hashed = hashlib.new(ALGORITHMS.get(alg, alg.lower()), body).digest()
    for data in (body, hashed):
        try:
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, data, padding.PKCS1v15(), digest)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, data, ec.ECDSA(digest))
            else:
                kind = type(key).__name__
                raise _reject("Ova.BadCertificate", f"the certificate's key ({kind}) is neither RSA nor EC")
            break
        except InvalidSignature:
            continue
    else:
        raise _reject(
            "Ova.BadSignature",
            f"the {alg} signature of {signed!r} does not verify with the certificate's key: the manifest "
            "was altered after it was signed",
        )
    subject = certificate.subject.rfc4514_string()[:200]
    self_signed = " (self-signed)" if certificate.issuer == certificate.subject else ""
    over = "" if data is body else f" (over its {alg} digest)"
    return (
        f"the {alg} signature of {signed!r}{over} verifies with the certificate of {subject!r}{self_signed}; "
        "the signer was not checked against a trust store"
    )


def _certificate(pem: str) -> x509.Certificate:
    """The certificate of a ``.cert`` from its ``BEGIN CERTIFICATE`` line on: PEM, else XenCenter's base64 of
    a Windows serialized certificate (:func:`_serialized_der`). Raises ValueError."""
    try:
        return x509.load_pem_x509_certificate(pem.encode("latin-1"))
    except ValueError:
        inside = pem[len(_PEM_BEGIN) :].partition(_PEM_END)[0]
        blob = base64.b64decode("".join(inside.split()), validate=True)
        return x509.load_der_x509_certificate(_serialized_der(blob))


def _serialized_der(blob: bytes) -> bytes:
    """The DER certificate of a Windows certificate store element (``X509ContentType.SerializedCert``):
    properties, each a little-endian ``propID``, a reserved 1 and ``cb``, then ``cb`` bytes; the certificate
    itself is property 32 (``CERT_CERT_PROP_ID``). Raises ValueError."""
    at = 0
    while at + 12 <= len(blob):
        prop, _, size = struct.unpack_from("<III", blob, at)
        data = blob[at + 12 : at + 12 + size]
        if len(data) != size:
            break
        if prop == _CERT_PROP:
            return data
        at += 12 + size
    raise ValueError("neither PEM nor a Windows serialized certificate")


def main() -> int:
    """The certificate child: ``{"cert": …, "manifests": {name: text}}`` (latin-1) on stdin, one JSON
    line on stdout (``{"message": …}`` or ``{"error": code, "message": …}``)."""
    request: dict[str, Any] = json.loads(sys.stdin.buffer.read())
    manifests = {str(k): str(v).encode("latin-1") for k, v in request["manifests"].items()}
    try:
        out = {"message": _verify(str(request["cert"]).encode("latin-1"), manifests)}
    except ImageRejected as exc:
        out = {"error": exc.code, "message": exc.message}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0
