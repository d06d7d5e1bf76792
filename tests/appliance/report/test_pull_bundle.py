"""Pull mode with a BUNDLE download manifest (ec2-bundles.md §9), against the independent cloud of
tests/euca_controller.py: the cloud re-encrypts the bundle's AES key and IV for the node certificate and
signs the manifest (openssl, here); a real worker verifies it, decrypts the key with its configured private
key, fetches and SHA1-checks the parts and unbundles them onto the named volume."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import processes
from tests.appliance.report.test_pull_euca import start_worker
from tests.bundlefactory import Bundle, KeyPair, make_bundle, make_keypair
from tests.euca_controller import EucaCloud, PartServer, make_cloud_key, openssl_sign

pytestmark = pytest.mark.slow
wait_until = functools.partial(processes.wait_until, timeout=90.0)
PART = 1 << 20
#: compressible, so the ciphertext (image/size of the download manifest) is smaller than the image
IMAGE = os.urandom(3 * PART + 4096) + bytes(2 * PART)


def bundle_download_manifest(
    cloud_key: Path, bundle: Bundle, urls: list[str], node_cert: Path, *, key_hex: str | None = None
) -> bytes:
    """A BUNDLE download manifest as DownloadManifestFactory writes it (§9), signed by ``cloud_key``."""

    def wrap(hex_text: str) -> str:
        return subprocess.run(
            ["openssl", "pkeyutl", "-encrypt", "-certin", "-inkey", node_cert],
            input=hex_text.encode(),
            check=True,
            capture_output=True,
        ).stdout.hex()

    parts = "".join(
        f'<part index="{i}"><get-url>{u.replace("&", "&amp;")}</get-url>'
        f'<digest algorithm="SHA1">{hashlib.sha1(p.read_bytes()).hexdigest()}</digest></part>'
        for i, (u, p) in enumerate(zip(urls, bundle.parts, strict=True))
    )
    size = sum(p.stat().st_size for p in bundle.parts)
    signed = (
        "<version>2014-01-14</version><file-format>BUNDLE</file-format>"
        f"<bundle><encrypted-key>{wrap(key_hex or bundle.key_hex)}</encrypted-key>"
        f"<encrypted-iv>{wrap(bundle.iv_hex)}</encrypted-iv><unbundled-size>{len(bundle.image)}</unbundled-size>"
        f"</bundle><image><size>{size}</size><parts>{parts}</parts></image>"
    ).encode()
    return (
        b'<?xml version="1.0" encoding="UTF-8" standalone="no"?><manifest>'
        + signed
        + f'<signature algorithm="RSA-SHA256">{openssl_sign(cloud_key, signed)}</signature>'.encode()
        + b"</manifest>"
    )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[EucaCloud, PartServer, Bundle, Path, Path, KeyPair]]:
    cloud_key, cloud_cert = make_cloud_key(tmp_path)
    node, user = make_keypair(tmp_path, "node"), make_keypair(tmp_path, "user")
    bundle = make_bundle(tmp_path / "b", IMAGE, KeyPair(cloud_key, cloud_cert), user, part_size=PART)
    ciphertext = tmp_path / "ciphertext"
    ciphertext.write_bytes(b"".join(p.read_bytes() for p in bundle.parts))
    with EucaCloud(cloud_key) as cloud, PartServer(ciphertext, PART) as parts:
        worker = start_worker(
            tmp_path, cloud, parts, cloud_cert, config={"bundles": {"cloud_private_key_file": str(node.key)}}
        )
        try:
            yield cloud, parts, bundle, cloud_key, tmp_path, node
        finally:
            processes.stop_process(worker, grace=30)


def test_a_bundle_download_manifest_is_unbundled_onto_the_volume(setup) -> None:
    cloud, parts, bundle, cloud_key, tmp_path, node = setup
    urls = parts.urls()
    assert len(urls) == len(bundle.parts)
    cloud.add_volume_task(
        "import-vol-bbbb0001",
        "vol-0b0b0b01",
        "RAW",
        bundle_download_manifest(cloud_key, bundle, urls, node.cert),
    )
    wait_until(lambda: cloud.final("import-vol-bbbb0001", "vol-0b0b0b01") is not None, what="DONE")
    done = cloud.final("import-vol-bbbb0001", "vol-0b0b0b01")
    assert done is not None and done["Status"] == "DONE", done
    assert int(done["BytesConverted"]) == len(IMAGE)
    [volume] = list((tmp_path / "state" / "volumes").glob("vol-*"))
    assert volume.read_bytes()[: len(IMAGE)] == IMAGE
    logged = (tmp_path / "worker.log").read_text()
    lines = [x for x in node.key.read_text().splitlines() if x and not x.startswith("-----")]
    assert not [line for line in lines if line in logged]


def test_a_bundle_key_not_encrypted_for_this_node_fails_the_task(setup) -> None:
    cloud, parts, bundle, cloud_key, tmp_path, _node = setup
    other = make_keypair(tmp_path, "other")
    doc = bundle_download_manifest(cloud_key, bundle, parts.urls(), other.cert)
    cloud.add_volume_task("import-vol-bbbb0002", "vol-0b0b0b02", "RAW", doc)
    wait_until(lambda: cloud.final("import-vol-bbbb0002", "vol-0b0b0b02") is not None, what="FAILED")
    done = cloud.final("import-vol-bbbb0002", "vol-0b0b0b02")
    assert done is not None and done["Status"] == "FAILED", done
    assert done["ErrorCode"] == "InvalidInputData", done
    assert done["Message"].startswith("BundleInvalid.Key:"), done
    assert parts.requests == []  # the key is checked before any part is fetched
