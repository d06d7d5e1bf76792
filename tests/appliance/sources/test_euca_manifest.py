"""Download manifests signed the way the cloud signs them (by the openssl command, in
tests/euca_controller.py, not by the appliance's code) verify; any change to the signed elements, a
missing or foreign signature, and documents that are not the cloud's serialization are CertificateFailure."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.sources.euca_manifest import (
    CertificateFailure,
    load_certificates,
    strip_marker,
    to_import_manifest,
    verify_and_parse,
)
from appliance.sources.manifest import ManifestInvalid
from tests.euca_controller import download_manifest, make_cloud_key, openssl_sign

URLS = [
    "http://parts.example:8773/b/p0?AWSAccessKeyId=AK&Expires=1&Signature=s",
    "http://imaging@parts.example/b/p1",
]


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    key, cert = make_cloud_key(tmp_path_factory.mktemp("cloud"))
    return key, load_certificates(cert.read_bytes())


def test_a_manifest_the_cloud_signed_verifies_and_parses(cloud: tuple[Path, list]) -> None:
    key, keys = cloud
    doc, _ = download_manifest(key, "RAW", 12345, URLS)
    m = verify_and_parse(doc, keys)
    assert (m.version, m.file_format, m.size) == ("2014-01-14", "RAW", 12345)
    assert [p.get_url for p in m.parts] == [URLS[0], "http://parts.example/b/p1"]  # imaging@ stripped
    imported = to_import_manifest(m, [10000, 2345], "RAW")
    assert [(p.start, p.end) for p in imported.parts] == [(0, 9999), (10000, 12344)]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d.replace(b"<size>12345<", b"<size>12346<"), id="size"),
        pytest.param(lambda d: d.replace(b"parts.example:8773", b"evil.example:8773"), id="part-url"),
        pytest.param(lambda d: d.replace(b"<file-format>RAW", b"<file-format>VMDK"), id="format"),
        pytest.param(lambda d: d.replace(b"<image>", b"<!-- x --><image>"), id="comment"),
        pytest.param(lambda d: d.replace(b"<image>", b"\n<image>"), id="whitespace"),
        pytest.param(
            lambda d: d.replace(b"</parts>", b'<part index="2"><get-url>http://x/</get-url></part></parts>'),
            id="extra-part",
        ),
        pytest.param(lambda d: d.replace(b'algorithm="RSA-SHA256"', b'algorithm="RSA-SHA1"'), id="algorithm"),
        pytest.param(lambda d: d.split(b"<signature")[0] + b"</manifest>", id="unsigned"),
        pytest.param(
            lambda d: d.replace(b"</manifest>", b"<image><size>1</size></image></manifest>"),
            id="after-signature",
        ),
        pytest.param(lambda d: d.replace(b'encoding="UTF-8"', b'encoding="ISO-8859-1"'), id="encoding"),
        pytest.param(
            lambda d: d.replace(b"<manifest>", b'<!DOCTYPE manifest [<!ENTITY e "x">]><manifest>'),
            id="doctype",
        ),
    ],
)
def test_any_change_or_missing_signature_is_a_certificate_failure(cloud: tuple[Path, list], change) -> None:
    key, keys = cloud
    doc, _ = download_manifest(key, "RAW", 12345, URLS)
    with pytest.raises(CertificateFailure):
        verify_and_parse(change(doc), keys)


def test_a_manifest_signed_by_another_cloud_is_a_certificate_failure(
    cloud: tuple[Path, list], tmp_path: Path
) -> None:
    other_key, _ = make_cloud_key(tmp_path)
    doc, _ = download_manifest(other_key, "RAW", 12345, URLS)
    with pytest.raises(CertificateFailure, match="does not verify"):
        verify_and_parse(doc, cloud[1])


def test_a_rotated_certificate_bundle_verifies_with_either(cloud: tuple[Path, list], tmp_path: Path) -> None:
    other_key, other_cert = make_cloud_key(tmp_path)
    keys = cloud[1] + load_certificates(other_cert.read_bytes())
    doc, _ = download_manifest(other_key, "RAW", 12345, URLS)
    assert verify_and_parse(doc, keys).size == 12345


def _bundle_doc(key: Path, digest: str) -> bytes:
    signed = (
        b"<version>2014-01-14</version><file-format>BUNDLE</file-format><bundle><encrypted-key>00</encrypted-key>"
        b"<encrypted-iv>0a</encrypted-iv><unbundled-size>10</unbundled-size></bundle>"
        b'<image><size>16</size><parts><part index="0"><get-url>http://imaging@x/p0</get-url>'
        + digest.encode()
        + b"</part></parts></image>"
    )
    return (
        b"<?xml version='1.0' encoding='UTF-8'?><manifest>"
        + signed
        + f'<signature algorithm="RSA-SHA256">{openssl_sign(key, signed)}</signature></manifest>'.encode()
    )


def test_a_signed_bundle_manifest_is_parsed_with_its_key_iv_and_sizes(cloud: tuple[Path, list]) -> None:
    key, keys = cloud
    manifest = verify_and_parse(_bundle_doc(key, '<digest algorithm="SHA1">' + "ab" * 20 + "</digest>"), keys)
    assert manifest.file_format == "BUNDLE" and manifest.size == 16
    assert manifest.bundle is not None
    assert (manifest.bundle.encrypted_key, manifest.bundle.encrypted_iv) == ("00", "0a")
    assert manifest.bundle.unbundled_size == 10
    assert manifest.parts[0].get_url == "http://x/p0" and manifest.parts[0].digest == "ab" * 20


def test_a_bundle_manifest_part_without_a_sha1_digest_is_invalid(cloud: tuple[Path, list]) -> None:
    key, keys = cloud
    with pytest.raises(ManifestInvalid, match="SHA1"):
        verify_and_parse(_bundle_doc(key, ""), keys)


def test_signed_but_malformed_content_is_manifest_invalid(cloud: tuple[Path, list]) -> None:
    key, keys = cloud
    doc, _ = download_manifest(key, "RAW", 0, URLS)
    with pytest.raises(ManifestInvalid, match="image/size"):
        verify_and_parse(doc, keys)


def test_the_marker_is_stripped_only_when_it_is_the_whole_user_info() -> None:
    assert strip_marker("http://imaging@h:8773/p?q=1") == "http://h:8773/p?q=1"
    assert strip_marker("http://imaging:pw@h/p") == "http://imaging:pw@h/p"
    assert strip_marker("http://h/p") == "http://h/p"
