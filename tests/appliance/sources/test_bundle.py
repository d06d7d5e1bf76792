"""Unbundling genuine EC2 image bundles (made by tests/bundlefactory.py with openssl, not the appliance's
code) from the moto S3 server and from a directory: byte-identical images, and coded failures that
leave nothing behind (appliance.sources.bundle, appliance.sources.bundle_manifest)."""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import BundleInvalid
from appliance.sources.bundle import BundleLocation, unbundle_to_file
from appliance.sources.bundle_manifest import load_private_key, load_public_keys
from appliance.sources.urlfilter import UrlPolicy
from tests.bundlefactory import Bundle, KeyPair, default_tar, make_bundle, make_keypair, unbundle_with_openssl
from tests.servers import MotoServer

PART = 64 * 1024
IMAGE = os.urandom(300 * 1024 + 512)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(d, name) for name in ("cloud", "user", "other")}


def _upload(moto: MotoServer, bundle: Bundle, prefix: str = "bundles/") -> str:
    bucket = f"bundle-{uuid.uuid4().hex[:12]}"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=bucket)
    for path in [*bundle.parts, bundle.manifest]:
        s3.put_object(Bucket=bucket, Key=prefix + path.name, Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}{bundle.manifest.name}"


def _s3_location(moto: MotoServer, url: str) -> BundleLocation:
    s3cfg: dict[str, Any] = {
        "endpoint_url": moto.endpoint,
        "region": "us-east-1",
        "access_key": "testing",
        "secret_key": "testing",
    }
    return BundleLocation(url, UrlPolicy(allowed_endpoints=[moto.endpoint]), s3cfg)


def _unbundle(
    location: BundleLocation, keys: dict[str, KeyPair], out: Path, *, cloud: str = "cloud", user: bool = False
) -> Any:
    return unbundle_to_file(
        location,
        load_private_key(keys[cloud].key.read_bytes()),
        out,
        user_keys=load_public_keys(keys["user"].cert.read_bytes()) if user else (),
        parallel=3,
    )


def _fails(tmp_path: Path, code: str, location: BundleLocation, keys: dict[str, KeyPair], **kw: Any) -> str:
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(BundleInvalid) as info:
        _unbundle(location, keys, out_dir / "disk.raw", **kw)
    assert info.value.code == code, info.value
    assert os.listdir(out_dir) == [], "nothing written: no output, no partial"
    return info.value.message


def _file(bundle: Bundle) -> BundleLocation:
    return BundleLocation(str(bundle.manifest), UrlPolicy())


def test_genuine_bundle_in_s3_unbundles_byte_identical_with_signature_checked(
    tmp_path: Path, moto: MotoServer, keys: dict[str, KeyPair]
) -> None:
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"], part_size=PART)
    assert len(bundle.parts) == 5
    assert unbundle_with_openssl(bundle) == IMAGE  # the reference's own CLI pipeline agrees
    result = _unbundle(_s3_location(moto, _upload(moto, bundle)), keys, tmp_path / "disk.raw", user=True)
    assert (tmp_path / "disk.raw").read_bytes() == IMAGE
    assert (result.size, result.parts, result.name) == (len(IMAGE), 5, "disk.img")


def test_ten_mib_parts_as_euca2ools_writes_them_unbundle_from_a_directory(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    image = os.urandom(21 * 2**20 + 512)
    bundle = make_bundle(tmp_path / "b", image, keys["cloud"], keys["user"])
    assert len(bundle.parts) == 3
    _unbundle(_file(bundle), keys, tmp_path / "disk.raw", user=True)
    assert (tmp_path / "disk.raw").read_bytes() == image


def test_unsigned_bundle_unbundles_without_a_user_certificate(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"], part_size=PART, sign=False)
    _unbundle(_file(bundle), keys, tmp_path / "disk.raw")
    assert (tmp_path / "disk.raw").read_bytes() == IMAGE
    assert _fails(tmp_path, "BundleInvalid.Signature", _file(bundle), keys, user=True)


def test_part_with_a_wrong_digest_is_named_and_nothing_is_written(
    tmp_path: Path, moto: MotoServer, keys: dict[str, KeyPair]
) -> None:
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"], part_size=PART)
    data = bytearray(bundle.parts[2].read_bytes())
    data[100] ^= 1
    bundle.parts[2].write_bytes(bytes(data))
    message = _fails(tmp_path, "BundleInvalid.PartDigest", _s3_location(moto, _upload(moto, bundle)), keys)
    assert "part 2" in message


def test_tampered_manifest_fails_the_signature_when_the_user_certificate_is_known(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"], part_size=PART)
    text = bundle.manifest.read_text()
    bundle.manifest.write_text(text.replace("<type>machine</type>", "<type>kernel</type>"))
    _fails(tmp_path, "BundleInvalid.Signature", _file(bundle), keys, user=True)


def test_a_second_image_element_in_a_comment_is_refused(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"], part_size=PART)
    text = bundle.manifest.read_text()
    bundle.manifest.write_text(text.replace("<signature>", "<!-- <image></image> --><signature>"))
    _fails(tmp_path, "BundleInvalid.Manifest", _file(bundle), keys, user=True)


def test_wrong_cloud_key_is_a_key_failure(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"], part_size=PART)
    _fails(tmp_path, "BundleInvalid.Key", _file(bundle), keys, cloud="other")


def test_part_named_outside_the_manifests_bucket_is_refused_before_any_fetch(
    tmp_path: Path, moto: MotoServer, keys: dict[str, KeyPair]
) -> None:
    bundle = make_bundle(
        tmp_path / "b",
        IMAGE,
        keys["cloud"],
        keys["user"],
        part_size=PART,
        part_names=lambda i: f"../other-bucket/disk.img.part.{i:02}",
    )
    _fails(tmp_path, "BundleInvalid.PartOutsideBucket", _s3_location(moto, _upload(moto, bundle)), keys)


def _tar_with(members: list[tarfile.TarInfo], payload: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(mode="w|", fileobj=buf, format=tarfile.GNU_FORMAT) as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return buf.getvalue()


def _member(name: str, size: int, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (size if kind == tarfile.REGTYPE else 0), kind, link
    return info


@pytest.mark.parametrize(
    "members",
    [
        pytest.param(lambda n: [_member("../disk.img", n)], id="traversal"),
        pytest.param(lambda n: [_member("disk.img", 0, tarfile.SYMTYPE, "/etc/shadow")], id="symlink"),
        pytest.param(lambda n: [_member("disk.img", 0, tarfile.LNKTYPE, "other")], id="hardlink"),
        pytest.param(lambda n: [_member("disk.img", n), _member("second.img", n)], id="two-members"),
        # a GNU long-name header first: its body would be read into memory whole, however large
        pytest.param(lambda n: [_member("d" * 200 + ".img", n)], id="long-name-header"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path: Path, keys: dict[str, KeyPair], members: Any) -> None:
    bundle = make_bundle(
        tmp_path / "b",
        IMAGE,
        keys["cloud"],
        keys["user"],
        part_size=PART,
        tar_bytes=lambda _prefix, image: _tar_with(members(len(image)), image),
    )
    _fails(tmp_path, "BundleInvalid.Tar", _file(bundle), keys, user=True)


def test_tar_stream_not_matching_image_digest_is_refused(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"], part_size=PART, sign=False)
    text = bundle.manifest.read_text()
    start = text.index('<digest algorithm="SHA1">') + len('<digest algorithm="SHA1">')
    wrong = "0" * 40
    bundle.manifest.write_text(text[:start] + wrong + text[start + 40 :])
    _fails(tmp_path, "BundleInvalid.Digest", _file(bundle), keys)


def test_an_exact_multiple_of_the_part_size_ends_with_an_empty_part_and_parts_go_by_index(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    # 16-byte parts: the ciphertext is always a multiple (the writer adds an empty last part), and there
    # are hundreds of parts (names .part.100 and on sort before .part.11 by name)
    image = os.urandom(4096)
    bundle = make_bundle(tmp_path / "b", image, keys["cloud"], keys["user"], part_size=16)
    assert len(bundle.parts) > 100 and bundle.parts[-1].stat().st_size == 0
    _unbundle(_file(bundle), keys, tmp_path / "disk.raw", user=True)
    assert (tmp_path / "disk.raw").read_bytes() == image


def test_a_gzip_bomb_member_larger_than_image_size_stops_at_its_header(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    bomb = 64 << 20  # 64 MiB of zeros: about 64 KiB compressed
    bundle = make_bundle(
        tmp_path / "b",
        IMAGE,
        keys["cloud"],
        keys["user"],
        part_size=1 << 20,
        tar_bytes=lambda prefix, _image: _tar_with([_member(prefix, bomb)], b"\0" * bomb),
    )
    _fails(tmp_path, "BundleInvalid.Size", _file(bundle), keys, user=True)


def test_zeros_after_the_tar_end_beyond_the_overhead_limit_are_refused(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    bundle = make_bundle(
        tmp_path / "b",
        IMAGE,
        keys["cloud"],
        keys["user"],
        part_size=1 << 20,
        tar_bytes=lambda prefix, image: default_tar(prefix, image) + b"\0" * (8 << 20),
    )
    _fails(tmp_path, "BundleInvalid.Size", _file(bundle), keys, user=True)
