"""The unbundle's gunzip and untar run in a confined child (appliance.sources.bundle_decrypt starting
appliance.sources.bundle_untar through appliance.confine): hostile plaintext inside validly encrypted
bundles (made with openssl by tests/bundlefactory.py) is stopped by the child, under the decompressor's
limits, with a coded error, and nothing is written."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tarfile
import zlib
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.config import Limits
from appliance.errors import BundleInvalid, ImageRejected
from appliance.sources.bundle import BundleLocation, unbundle_to_file
from appliance.sources.bundle_manifest import load_private_key
from appliance.sources.urlfilter import UrlPolicy
from tests.bundlefactory import Bundle, KeyPair, default_tar, make_bundle, make_keypair

IMAGE = os.urandom(200 * 1024)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(d, name) for name in ("cloud", "user")}


def _limits(**changes: int) -> Limits:
    return dataclasses.replace(config_mod.from_dict({}).limits, **changes)


def _unbundle(bundle: Bundle, keys: dict[str, KeyPair], out_dir: Path, limits: Limits | None = None) -> None:
    out_dir.mkdir(exist_ok=True)
    unbundle_to_file(
        BundleLocation(str(bundle.manifest), UrlPolicy()),
        load_private_key(keys["cloud"].key.read_bytes()),
        out_dir / "disk.raw",
        limits=limits,
    )


def _gzip_of(pieces: list[tuple[bytes, int]]) -> tuple[bytes, str]:
    """(gzip stream, SHA-1 of its content) of each ``data`` repeated ``times``, compressed piecewise."""
    z, sha1, out = zlib.compressobj(6, zlib.DEFLATED, 31), hashlib.sha1(), bytearray()
    for data, times in pieces:
        for _ in range(times):
            sha1.update(data)
            out += z.compress(data)
    out += z.flush()
    return bytes(out), sha1.hexdigest()


def test_gzip_bomb_after_a_valid_member_is_stopped_by_the_child_at_its_cap_and_nothing_is_written(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    # a genuine tar of IMAGE, then 256 MiB of zeros: about 250 KiB of gzip, validly encrypted and signed
    zeros = bytes(1 << 20)
    bomb = _gzip_of([(default_tar("disk.img", IMAGE), 1), (zeros, 256)])
    assert len(bomb[0]) < 1 << 20
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"], gzipped=bomb)
    with pytest.raises(BundleInvalid) as info:
        _unbundle(bundle, keys, tmp_path / "out")
    assert info.value.code == "BundleInvalid.Size"
    assert "overhead" in info.value.message, "the child's own cap stopped it, not the parent's"
    assert os.listdir(tmp_path / "out") == []


def _long_name_second_member(prefix: str, image: bytes) -> bytes:
    # a valid first member, then a GNU long-name header claiming 512 MiB of name: tarfile would read that
    # body into memory whole; the child's cap on the tar stream stops it first
    head = default_tar(prefix, image)
    end = 512 + (len(image) + 511) // 512 * 512
    info = tarfile.TarInfo("x")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 512 << 20
    return head[:end] + info.tobuf(tarfile.GNU_FORMAT) + bytes(2 << 20)


def test_hostile_second_header_is_stopped_by_the_child_and_nothing_is_written(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    bundle = make_bundle(
        tmp_path / "b", IMAGE, keys["cloud"], keys["user"], tar_bytes=_long_name_second_member
    )
    with pytest.raises(BundleInvalid) as info:
        _unbundle(bundle, keys, tmp_path / "out")
    assert info.value.code in ("BundleInvalid.Size", "BundleInvalid.Tar"), info.value
    assert os.listdir(tmp_path / "out") == []


def test_the_unpacker_runs_under_the_decompressor_memory_limit(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    # the same genuine bundle unbundles with the default limits and fails with the limit's code when the
    # decompressor's address space is too small for any Python child: gunzip and untar are not done here
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"])
    _unbundle(bundle, keys, tmp_path / "ok")
    assert (tmp_path / "ok" / "disk.raw").read_bytes() == IMAGE
    with pytest.raises(ImageRejected) as info:
        _unbundle(bundle, keys, tmp_path / "out", _limits(decompress_address_space=8 << 20))
    assert info.value.code == "UnsafeImage.ResourceLimit", info.value
    assert os.listdir(tmp_path / "out") == []
