"""Bundles out (appliance.targets.bundle): a disk bundled by the appliance unbundles byte-identical with
the reference's own openssl/gzip/tar steps (tests/bundlefactory.py, none of the appliance's code) and
with the appliance's unbundler, from a directory and from the moto S3 server; the CLI does the same."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from appliance.errors import UsageError
from appliance.sources.bundle import BundleLocation, unbundle_to_file
from appliance.sources.bundle_manifest import load_private_key, load_public_keys
from appliance.sources.euca_manifest import load_certificates
from appliance.sources.urlfilter import UrlPolicy
from appliance.targets.bundle import BundleKeys, DirectorySink, MachineConfiguration, S3Sink, write_bundle
from appliance.targets.upload_policy import UploadPolicy, UploadPolicyInvalid
from tests.bundlefactory import KeyPair, make_keypair, unbundle_independently
from tests.servers import MotoServer


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(d, name) for name in ("cloud", "user")}


def _keys(keys: dict[str, KeyPair], *, user: bool = True) -> BundleKeys:
    return BundleKeys(
        cloud=load_certificates(keys["cloud"].cert.read_bytes())[0],
        user=load_certificates(keys["user"].cert.read_bytes())[0] if user else None,
        signer=load_private_key(keys["user"].key.read_bytes()) if user else None,
    )


def _disk(size: int) -> bytes:
    # half random, half zeros: like a disk, and quick to compress
    return b"".join(os.urandom(1 << 19) + bytes(1 << 19) for _ in range(size >> 20)) + os.urandom(
        size % (1 << 20)
    )


def test_a_bundled_disk_unbundles_byte_identical_with_openssl_and_with_the_appliance(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    image = os.urandom(21 * 2**20 + 512)  # incompressible: three 10 MiB parts
    out = tmp_path / "bundle"
    out.mkdir()
    machine = MachineConfiguration("x86_64", block_device_mapping={"ami": "sda1", "root": "/dev/sda1"})
    result = write_bundle(
        io.BytesIO(image),
        len(image),
        "disk.img",
        _keys(keys),
        DirectorySink(out),
        user="0000-0000-0001",
        machine=machine,
    )
    assert [p.name for p in result.parts] == ["disk.img.part.00", "disk.img.part.01", "disk.img.part.02"]
    assert [p.size for p in result.parts][:2] == [10 * 2**20] * 2
    manifest = out / "disk.img.manifest.xml"
    text = manifest.read_text()
    assert "<user>000000000001</user>" in text and "<virtual>ami</virtual><device>sda1</device>" in text

    assert unbundle_independently(manifest, keys["cloud"].key, keys["user"].cert) == image
    got = unbundle_to_file(
        BundleLocation(str(manifest), UrlPolicy()),
        load_private_key(keys["cloud"].key.read_bytes()),
        tmp_path / "disk.raw",
        user_keys=load_public_keys(keys["user"].cert.read_bytes()),
    )
    assert (tmp_path / "disk.raw").read_bytes() == image and got.digest == result.digest


def test_the_user_certificate_also_unwraps_the_key(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    image = _disk(1 << 20)
    result = write_bundle(
        io.BytesIO(image), len(image), "u.img", _keys(keys), DirectorySink(tmp_path), user="1"
    )
    # the user's own key opens the bundle too (user_encrypted_*), as euca-unbundle does with -k
    text = (
        result.manifest.decode()
        .replace("ec2_encrypted", "cloud_was")
        .replace("user_encrypted", "ec2_encrypted")
    )
    (tmp_path / "u.img.manifest.xml").write_text(text)
    assert unbundle_independently(tmp_path / "u.img.manifest.xml", keys["user"].key) == image


def test_an_unsigned_bundle_without_a_user_certificate_still_unbundles(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    image = _disk(3 << 20)
    result = write_bundle(
        io.BytesIO(image),
        len(image),
        "plain.img",
        _keys(keys, user=False),
        DirectorySink(tmp_path),
        user="7",
        part_size=1 << 20,
    )
    assert not result.signed and b"<signature>UNSIGNED</signature>" in result.manifest
    assert b'<user_encrypted_key algorithm="AES-128-CBC"></user_encrypted_key>' in result.manifest
    assert unbundle_independently(tmp_path / "plain.img.manifest.xml", keys["cloud"].key) == image


def test_a_bundle_uploaded_to_s3_unbundles_from_the_bucket(
    tmp_path: Path, moto: MotoServer, keys: dict[str, KeyPair]
) -> None:
    image = _disk(5 << 20)
    bucket = f"out-{uuid.uuid4().hex[:12]}"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=bucket)
    result = write_bundle(
        io.BytesIO(image),
        len(image),
        "s3.img",
        _keys(keys),
        S3Sink(s3, bucket, "bundles/"),
        user="1",
        part_size=1 << 20,
    )
    assert len(result.parts) > 1
    names = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    written = [*(p.name for p in result.parts), "s3.img.manifest.xml"]
    assert names == sorted(f"bundles/{name}" for name in written)
    location = BundleLocation(
        f"s3://{bucket}/bundles/s3.img.manifest.xml",
        UrlPolicy(allowed_endpoints=[moto.endpoint]),
        {"endpoint_url": moto.endpoint, "region": "us-east-1", "access_key": "t", "secret_key": "t"},
    )
    unbundle_to_file(
        location,
        load_private_key(keys["cloud"].key.read_bytes()),
        tmp_path / "disk.raw",
        user_keys=load_public_keys(keys["user"].cert.read_bytes()),
    )
    assert (tmp_path / "disk.raw").read_bytes() == image


@pytest.mark.parametrize("prefix", ["../disk.img", "a/b", "", "x" * 101])
def test_a_prefix_that_is_not_a_plain_name_is_refused_before_anything_is_written(
    tmp_path: Path, keys: dict[str, KeyPair], prefix: str
) -> None:
    with pytest.raises(UsageError):
        write_bundle(io.BytesIO(b"x" * 512), 512, prefix, _keys(keys), DirectorySink(tmp_path), user="1")
    assert os.listdir(tmp_path) == []


def test_imaging_bundle_cli_writes_a_bundle_the_reference_steps_unbundle(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    image = _disk(2 << 20)
    (tmp_path / "disk.raw").write_bytes(image)
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    config = tmp_path / "imaging.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state")}))
    env["IMAGING_CONFIG"] = str(config)
    run = subprocess.run(
        [
            sys.executable, "-m", "appliance.cli", "bundle", tmp_path / "disk.raw", tmp_path / "out",
            "--cloud-cert", keys["cloud"].cert, "--user-cert", keys["user"].cert,
            "--user-key", keys["user"].key, "--user", "000000000001", "--json",
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["manifest"] == "disk.raw.manifest.xml" and summary["signed"] is True
    manifest = tmp_path / "out" / "disk.raw.manifest.xml"
    assert unbundle_independently(manifest, keys["cloud"].key, keys["user"].cert) == image


def test_an_upload_policy_that_expires_mid_bundle_or_is_too_small_stops_the_upload(
    moto: MotoServer, keys: dict[str, KeyPair]
) -> None:
    # the appliance uploads with its own credentials: what S3 enforces for a policy upload is enforced
    # by the sink, at every object
    image = _disk(4 << 20)
    bucket = f"out-{uuid.uuid4().hex[:12]}"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=bucket)
    start = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
    clock = [start]

    def now() -> datetime:
        clock[0] += timedelta(minutes=1)  # one minute per object
        return clock[0]

    policy = UploadPolicy(bucket, "p", "aws-exec-read", start + timedelta(minutes=2, seconds=30), None)
    sink = S3Sink(s3, bucket, "", "aws-exec-read", policy=policy, now=now)
    with pytest.raises(UploadPolicyInvalid) as info:
        write_bundle(io.BytesIO(image), len(image), "p", _keys(keys), sink, user="1", part_size=1 << 20)
    assert info.value.code == "UploadPolicyInvalid.Expired"
    assert len(sink.written) == 2  # two objects went up before the policy expired, the third did not
    sink.remove()
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)

    small = UploadPolicy(bucket, "p", "aws-exec-read", start + timedelta(days=1), 1000)
    sink = S3Sink(s3, bucket, "", "aws-exec-read", policy=small, now=lambda: start)
    with pytest.raises(UploadPolicyInvalid) as info:
        write_bundle(io.BytesIO(image), len(image), "p", _keys(keys), sink, user="1", part_size=1 << 20)
    assert info.value.code == "UploadPolicyInvalid.Size" and sink.written == []
