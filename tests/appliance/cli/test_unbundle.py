"""``imaging unbundle`` as a user runs it: a real process, a bundle made with openssl
(tests/bundlefactory.py),
the moto S3 server; coded failures leave nothing behind and the cloud key never shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.bundlefactory import Bundle, KeyPair, make_bundle, make_keypair
from tests.servers import MotoServer

IMAGE = os.urandom(200 * 1024 + 512)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(d, name) for name in ("cloud", "user", "other")}


def _env(tmp_path: Path, config: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("IMAGING_CONFIG", None)
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    if config is not None:
        path = tmp_path / "imaging.yaml"
        path.write_text(yaml.safe_dump(config))
        env["IMAGING_CONFIG"] = str(path)
    return env


def imaging(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _key_lines(pair: KeyPair) -> list[str]:
    """The base64 lines of a PEM private key: none may appear in any output."""
    return [line for line in pair.key.read_text().splitlines() if line and not line.startswith("-----")]


def _assert_no_key(text: str, pair: KeyPair) -> None:
    assert "PRIVATE KEY" not in text
    assert not [line for line in _key_lines(pair) if line in text]


def _upload(moto: MotoServer, bundle: Bundle) -> str:
    bucket = f"bundle-{uuid.uuid4().hex[:12]}"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=bucket)
    for path in [*bundle.parts, bundle.manifest]:
        s3.put_object(Bucket=bucket, Key=f"images/{path.name}", Body=path.read_bytes())
    return f"s3://{bucket}/images/{bundle.manifest.name}"


def test_unbundle_from_s3_with_the_configured_key_writes_the_image_byte_identical(
    tmp_path: Path, moto: MotoServer, keys: dict[str, KeyPair]
) -> None:
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"], part_size=64 * 1024)
    env = _env(
        tmp_path,
        {
            "log_level": "debug",
            "sources": {
                "allowed_endpoints": [moto.endpoint],
                "s3": {
                    "endpoint_url": moto.endpoint,
                    "region": "us-east-1",
                    "access_key": "testing",
                    "secret_key": "testing",
                },
            },
            "bundles": {"cloud_private_key": keys["cloud"].key.read_text()},
        },
    )
    out = tmp_path / "disk.raw"
    r = imaging("unbundle", _upload(moto, bundle), out, "--user-cert", keys["user"].cert, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == IMAGE
    result = json.loads(r.stdout)
    assert (result["size"], result["parts"], result["signature_verified"]) == (len(IMAGE), 4, True)
    _assert_no_key(r.stdout + r.stderr, keys["cloud"])
    shown = imaging("config", "show", env=env)
    assert shown.returncode == 0, shown.stderr
    _assert_no_key(shown.stdout + shown.stderr, keys["cloud"])


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("part", "BundleInvalid.PartDigest"),
        ("cloud-key", "BundleInvalid.Key"),
        ("signature", "BundleInvalid.Signature"),
    ],
)
def test_unbundle_failure_exits_1_with_its_code_and_writes_nothing(
    tmp_path: Path, keys: dict[str, KeyPair], damage: str, code: str
) -> None:
    bundle = make_bundle(tmp_path / "b", IMAGE, keys["cloud"], keys["user"], part_size=64 * 1024)
    cloud = keys["cloud"]
    if damage == "part":
        bundle.parts[1].write_bytes(b"x" + bundle.parts[1].read_bytes()[1:])
    elif damage == "cloud-key":
        cloud = keys["other"]
    else:
        text = bundle.manifest.read_text().replace("<architecture>x86_64<", "<architecture>i386<")
        bundle.manifest.write_text(text)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = imaging(
        "unbundle",
        bundle.manifest,
        out_dir / "disk.raw",
        "--cloud-key",
        cloud.key,
        "--user-cert",
        keys["user"].cert,
        env=_env(tmp_path, {"log_level": "debug"}),
    )
    assert r.returncode == 1
    assert code in r.stderr
    assert os.listdir(out_dir) == []
    _assert_no_key(r.stdout + r.stderr, cloud)
