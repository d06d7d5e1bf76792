"""Genuine EC2 image bundles, made the way ``ec2-bundles.md`` §12 says, independent of the appliance's code.

tar (Python ``tarfile``, GNU format, one member named after the prefix, 10,240-byte records) → SHA-1 of the
tar stream → gzip → ``openssl enc -e -aes-128-cbc -K -iv`` → 10 MiB parts (``prefix.part.NN``, a final empty
part when the ciphertext is an exact multiple) → the manifest of §4 (one line, no indentation) with the
key and IV (as 32 hex characters) encrypted by ``openssl pkeyutl -encrypt -certin`` for the cloud and user
certificates, signed by ``openssl dgst -sha1 -sign`` with the user key over ``<machine_configuration>`` +
``<image>``. :func:`unbundle_independently` unbundles with the same tools (the reference's §12.2 steps).
Nothing here imports ``appliance``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PART_SIZE = 10 * 1024 * 1024


@dataclass(frozen=True)
class KeyPair:
    key: Path
    cert: Path


def make_keypair(directory: Path, name: str) -> KeyPair:
    """An RSA-2048 key and a self-signed certificate (``openssl req -x509``)."""
    key, cert = directory / f"{name}-pk.pem", directory / f"{name}-cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
        ],
        check=True,
        capture_output=True,
    )
    return KeyPair(key, cert)


def _wrap(hex_text: str, cert: Path) -> str:
    out = subprocess.run(
        ["openssl", "pkeyutl", "-encrypt", "-certin", "-inkey", cert],
        input=hex_text.encode(),
        check=True,
        capture_output=True,
    ).stdout
    return out.hex()


def _sign(data: bytes, key: Path) -> str:
    return subprocess.run(
        ["openssl", "dgst", "-sha1", "-sign", key], input=data, check=True, capture_output=True
    ).stdout.hex()


def default_tar(prefix: str, image: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(mode="w|", fileobj=buf, format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(prefix)
        info.size = len(image)
        tar.addfile(info, io.BytesIO(image))
    return buf.getvalue()


@dataclass
class Bundle:
    directory: Path
    prefix: str
    manifest: Path
    parts: list[Path]
    image: bytes
    key_hex: str
    iv_hex: str
    extra: dict[str, str] = field(default_factory=dict)


def make_bundle(
    directory: Path,
    image: bytes,
    cloud: KeyPair,
    user: KeyPair,
    *,
    prefix: str = "disk.img",
    tar_bytes: Callable[[str, bytes], bytes] = default_tar,
    part_size: int = PART_SIZE,
    part_names: Callable[[int], str] | None = None,
    sign: bool = True,
    gzipped: tuple[bytes, str] | None = None,
) -> Bundle:
    """Write ``<prefix>.manifest.xml`` and its parts into ``directory``. ``gzipped`` is (a gzip stream,
    the SHA-1 of what it decompresses to) to encrypt instead of the gzip of ``tar_bytes(prefix, image)``
    (a stream too large to hold decompressed)."""
    directory.mkdir(parents=True, exist_ok=True)
    if gzipped is None:
        tar = tar_bytes(prefix, image)
        gzipped = gzip.compress(tar, 6), hashlib.sha1(tar).hexdigest()
    stream, digest = gzipped
    key_hex, iv_hex = os.urandom(16).hex(), os.urandom(16).hex()
    ciphertext = subprocess.run(
        ["openssl", "enc", "-e", "-aes-128-cbc", "-K", key_hex, "-iv", iv_hex],
        input=stream,
        check=True,
        capture_output=True,
    ).stdout
    chunks = [ciphertext[i : i + part_size] for i in range(0, len(ciphertext), part_size)]
    if len(ciphertext) % part_size == 0:
        chunks.append(b"")
    names = [part_names(i) if part_names else f"{prefix}.part.{i:02}" for i in range(len(chunks))]
    paths = []
    for name, chunk in zip(names, chunks, strict=True):
        path = directory / os.path.basename(name)
        path.write_bytes(chunk)
        paths.append(path)
    parts_xml = "".join(
        f'<part index="{i}"><filename>{name}</filename>'
        f'<digest algorithm="SHA1">{hashlib.sha1(chunk).hexdigest()}</digest></part>'
        for i, (name, chunk) in enumerate(zip(names, chunks, strict=True))
    )
    mc = "<machine_configuration><architecture>x86_64</architecture></machine_configuration>"
    img = (
        f"<image><name>{prefix}</name><user>000000000001</user><type>machine</type>"
        f'<digest algorithm="SHA1">{digest}</digest><size>{len(image)}</size>'
        f"<bundled_size>{len(ciphertext)}</bundled_size>"
        f'<ec2_encrypted_key algorithm="AES-128-CBC">{_wrap(key_hex, cloud.cert)}</ec2_encrypted_key>'
        f'<user_encrypted_key algorithm="AES-128-CBC">{_wrap(key_hex, user.cert)}</user_encrypted_key>'
        f"<ec2_encrypted_iv>{_wrap(iv_hex, cloud.cert)}</ec2_encrypted_iv>"
        f"<user_encrypted_iv>{_wrap(iv_hex, user.cert)}</user_encrypted_iv>"
        f'<parts count="{len(chunks)}">{parts_xml}</parts></image>'
    )
    signature = _sign((mc + img).encode(), user.key) if sign else "UNSIGNED"
    manifest = directory / f"{prefix}.manifest.xml"
    manifest.write_text(
        "<?xml version='1.0' encoding='ASCII'?>\n<manifest><version>2007-10-10</version>"
        "<bundler><name>euca2ools</name><version>3.4.1</version><release>0</release></bundler>"
        f"{mc}{img}<signature>{signature}</signature></manifest>"
    )
    return Bundle(directory, prefix, manifest, paths, image, key_hex, iv_hex)


def unbundle_with_openssl(bundle: Bundle) -> bytes:
    """The reference's CLI unbundle (§12.2): cat parts | openssl enc -d | gunzip | tar -xO."""
    ciphertext = b"".join(p.read_bytes() for p in bundle.parts)
    plain = subprocess.run(
        ["openssl", "enc", "-d", "-aes-128-cbc", "-K", bundle.key_hex, "-iv", bundle.iv_hex],
        input=ciphertext,
        check=True,
        capture_output=True,
    ).stdout
    return subprocess.run(
        ["tar", "-xOf", "-"], input=gzip.decompress(plain), check=True, capture_output=True
    ).stdout


def unbundle_independently(manifest: Path, cloud_key: Path, user_cert: Path | None = None) -> bytes:
    """Unbundle the bundle of ``manifest`` (parts beside it) with the reference's steps only (§7, §12.2):
    the signature checked by ``openssl dgst -sha1 -verify`` over the raw ``<machine_configuration>`` +
    ``<image>`` text (when ``user_cert`` is given), the key and IV unwrapped by ``openssl pkeyutl
    -decrypt``, every part's SHA-1, ``openssl enc -d -aes-128-cbc``, ``gzip -dc``, the tar stream's SHA-1
    against ``image/digest``, one member named after the image, ``tar -xOf -``. Raises AssertionError or
    CalledProcessError on any mismatch. Nothing here imports ``appliance``."""
    text = manifest.read_text(encoding="ascii")
    root = ET.fromstring(text.encode("ascii"))
    image = root.find("image")
    assert image is not None
    if user_cert is not None:
        signed = _between(text, "machine_configuration") + _between(text, "image")
        work = manifest.parent / f".verify-{os.getpid()}"
        work.mkdir()
        try:
            pub = subprocess.run(
                ["openssl", "x509", "-pubkey", "-noout", "-in", user_cert], check=True, capture_output=True
            ).stdout
            (work / "pub.pem").write_bytes(pub)
            (work / "sig.bin").write_bytes(bytes.fromhex(root.findtext("signature") or ""))
            (work / "signed.bin").write_bytes(signed.encode("ascii"))
            verified = subprocess.run(
                ["openssl", "dgst", "-sha1", "-verify", "pub.pem", "-signature", "sig.bin", "signed.bin"],
                cwd=work,
                capture_output=True,
            )
            assert verified.stdout.strip() == b"Verified OK", verified
        finally:
            for f in work.iterdir():
                f.unlink()
            work.rmdir()

    def unwrap(element: str) -> str:
        out = subprocess.run(
            ["openssl", "pkeyutl", "-decrypt", "-inkey", cloud_key],
            input=bytes.fromhex(image.findtext(element) or ""),
            check=True,
            capture_output=True,
        ).stdout.decode("ascii")
        assert len(out) == 32 and int(out, 16) >= 0
        return out

    key_hex, iv_hex = unwrap("ec2_encrypted_key"), unwrap("ec2_encrypted_iv")
    parts = sorted(image.iter("part"), key=lambda p: int(p.get("index", "-1")))
    assert [int(p.get("index", "-1")) for p in parts] == list(range(len(parts)))
    ciphertext = b""
    for part in parts:
        data = (manifest.parent / (part.findtext("filename") or "")).read_bytes()
        assert hashlib.sha1(data).hexdigest() == part.findtext("digest"), part.findtext("filename")
        ciphertext += data
    assert len(ciphertext) == int(image.findtext("bundled_size") or "-1")
    compressed = subprocess.run(
        ["openssl", "enc", "-d", "-aes-128-cbc", "-K", key_hex, "-iv", iv_hex],
        input=ciphertext,
        check=True,
        capture_output=True,
    ).stdout
    tar = subprocess.run(["gzip", "-dc"], input=compressed, check=True, capture_output=True).stdout
    assert hashlib.sha1(tar).hexdigest() == image.findtext("digest")
    listing = subprocess.run(["tar", "-tf", "-"], input=tar, check=True, capture_output=True).stdout
    assert listing.decode().splitlines() == [image.findtext("name")]
    out = subprocess.run(["tar", "-xOf", "-"], input=tar, check=True, capture_output=True).stdout
    assert len(out) == int(image.findtext("size") or "-1")
    return out


def _between(text: str, name: str) -> str:
    start, end = f"<{name}>", f"</{name}>"
    assert text.count(start) == 1 and text.count(end) == 1
    return text[text.index(start) : text.index(end) + len(end)]
