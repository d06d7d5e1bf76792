"""ImportImage of an EC2 image bundle (``DiskContainer.Url`` naming a ``.manifest.xml``): the worker
unbundles it (bundle made with openssl by tests/bundlefactory.py), then inspects, validates the guest and
stores it as any import; a broken bundle fails the task with its code, and the cloud key shows nowhere."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from api.app import create_app
from appliance import config as config_mod
from appliance.errors import BundleInvalid
from tests import guestfactory
from tests.api.e2e_support import Appliance, admin_task, running_appliance, wait_for
from tests.bundlefactory import KeyPair, make_bundle, make_keypair
from tests.httpfixtures import TestHTTPServer
from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(d, name) for name in ("cloud", "user", "other")}


@pytest.fixture
def bundle_appliance(
    tmp_path: Path, moto: MotoServer, parts_server: TestHTTPServer, keys: dict[str, KeyPair]
) -> Iterator[Appliance]:
    extra = {"bundles": {"cloud_private_key_file": str(keys["cloud"].key)}, "log_level": "debug"}
    with running_appliance(tmp_path, moto, parts_server, extra=extra) as app:
        yield app


def _upload(moto: MotoServer, directory: Path, names: list[str]) -> str:
    bucket = f"bundle-{uuid.uuid4().hex[:12]}"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=bucket)
    for name in names:
        s3.put_object(Bucket=bucket, Key=f"images/{name}", Body=(directory / name).read_bytes())
    return bucket


def _import(app: Appliance, url: str) -> dict:
    task_id = app.ec2.import_image(DiskContainers=[{"Format": "RAW", "Url": url}])["ImportTaskId"]

    def status() -> dict:
        return app.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]

    wait_for(lambda: status()["Status"] in ("completed", "deleted"), what="the bundle import")
    return {"task_id": task_id, **status()}


def _scan(app: Appliance, task_id: str, key: KeyPair) -> None:
    lines = [x for x in key.key.read_text().splitlines() if x and not x.startswith("-----")]
    texts = [str(admin_task(app, task_id))]
    texts += [p.read_text(errors="replace") for p in app.state.rglob("*.log")]
    for text in texts:
        assert "PRIVATE KEY" not in text
        assert not [line for line in lines if line in text]


def test_import_image_of_a_bundle_manifest_url_stores_the_unbundled_disk_byte_identical(
    bundle_appliance: Appliance, moto: MotoServer, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    disk = guestfactory.linux_disk(tmp_path)
    bundle = make_bundle(tmp_path / "b", disk.read_bytes(), keys["cloud"], keys["user"], prefix="linux.img")
    bucket = _upload(moto, bundle.directory, [p.name for p in [*bundle.parts, bundle.manifest]])
    final = _import(bundle_appliance, f"s3://{bucket}/images/linux.img.manifest.xml")
    assert final["Status"] == "completed", final
    stored = list((bundle_appliance.state / "images").glob(f"{final['task_id']}.*"))
    assert len(stored) == 1
    assert stored[0].read_bytes() == disk.read_bytes()
    task = admin_task(bundle_appliance, final["task_id"])
    assert "unbundl" in str(task)
    _scan(bundle_appliance, final["task_id"], keys["cloud"])


def test_import_image_of_a_bundle_with_a_corrupt_part_fails_with_its_code(
    bundle_appliance: Appliance, moto: MotoServer, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    image = b"\0" * (3 << 20)
    bundle = make_bundle(tmp_path / "b", image, keys["cloud"], keys["user"], part_size=1 << 20)
    bundle.parts[0].write_bytes(b"!" + bundle.parts[0].read_bytes()[1:])
    bucket = _upload(moto, bundle.directory, [p.name for p in [*bundle.parts, bundle.manifest]])
    final = _import(bundle_appliance, f"s3://{bucket}/images/disk.img.manifest.xml")
    assert final["Status"] == "deleted", final
    assert "BundleInvalid.PartDigest" in str(admin_task(bundle_appliance, final["task_id"]))
    assert list((bundle_appliance.state / "images").glob(f"{final['task_id']}.*")) == []
    _scan(bundle_appliance, final["task_id"], keys["cloud"])


# ------------------------------------------------------------------------------------- GetDecryptedImage


def _admin_client(tmp_path: Path, moto: MotoServer, key: Path, signers: Path | None = None) -> Any:
    bundles: dict[str, Any] = {"cloud_private_key_file": str(key)}
    if signers is not None:
        bundles["signer_certs_file"] = str(signers)
    cfg = config_mod.from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "api": {
                "credentials": [
                    {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY, "role": "admin"},
                    {"access_key": "AKIAUSERUSERUSER0001", "secret_key": "user-secret-0123456789"},
                ]
            },
            "sources": {
                "allowed_endpoints": [moto.endpoint],
                "s3": {
                    "endpoint_url": moto.endpoint,
                    "region": "us-east-1",
                    "access_key": "t",
                    "secret_key": "t",
                },
            },
            "bundles": bundles,
        },
        base_dir=tmp_path,
    )
    return testing.TestClient(create_app(cfg))


def _basic(key: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}


def test_get_decrypted_image_streams_the_bundles_image_to_an_admin_key(
    moto: MotoServer, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    image = os.urandom(700 * 1024 + 512)
    bundle = make_bundle(tmp_path / "b", image, keys["cloud"], keys["user"], part_size=128 * 1024)
    bucket = _upload(moto, bundle.directory, [p.name for p in [*bundle.parts, bundle.manifest]])
    client = _admin_client(tmp_path, moto, keys["cloud"].key, keys["user"].cert)
    url = f"s3://{bucket}/images/disk.img.manifest.xml"
    result = client.simulate_get(
        "/v1/bundles/decrypted-image",
        params={"manifest": url},
        headers=_basic(TEST_ACCESS_KEY, TEST_SECRET_KEY),
    )
    assert result.status_code == 200, result.text[:500]
    assert result.content == image
    assert result.headers["Content-Length"] == str(len(image))
    user = client.simulate_get(
        "/v1/bundles/decrypted-image",
        params={"manifest": url},
        headers=_basic("AKIAUSERUSERUSER0001", "user-secret-0123456789"),
    )
    assert user.status_code == 403 and user.json["error"]["code"] == "AccessDenied"


def test_get_decrypted_image_with_the_wrong_cloud_key_is_a_coded_error_without_the_key(
    moto: MotoServer, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "b", os.urandom(50_000), keys["cloud"], keys["user"])
    bucket = _upload(moto, bundle.directory, [p.name for p in [*bundle.parts, bundle.manifest]])
    # not the key the bundle was made for
    client = _admin_client(tmp_path, moto, keys["user"].key, keys["user"].cert)
    result = client.simulate_get(
        "/v1/bundles/decrypted-image",
        params={"manifest": f"s3://{bucket}/images/disk.img.manifest.xml"},
        headers=_basic(TEST_ACCESS_KEY, TEST_SECRET_KEY),
    )
    assert result.status_code == 422 and result.json["error"]["code"] == "BundleInvalid.Key"
    lines = [x for x in keys["user"].key.read_text().splitlines() if x and not x.startswith("-----")]
    assert not [line for line in lines if line in result.text]


def test_get_decrypted_image_never_completes_a_response_for_a_corrupt_part(
    moto: MotoServer, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    image = os.urandom(400 * 1024)
    bundle = make_bundle(tmp_path / "b", image, keys["cloud"], keys["user"], part_size=64 * 1024)
    last = bundle.parts[-1]
    last.write_bytes(bytes([last.read_bytes()[0] ^ 1]) + last.read_bytes()[1:])
    bucket = _upload(moto, bundle.directory, [p.name for p in [*bundle.parts, bundle.manifest]])
    client = _admin_client(tmp_path, moto, keys["cloud"].key, keys["user"].cert)
    # Falcon's test client reads the body in the test's thread: the pipeline's error surfaces here,
    # where a real server drops the connection short of Content-Length.
    with pytest.raises(BundleInvalid) as info:
        client.simulate_get(
            "/v1/bundles/decrypted-image",
            params={"manifest": f"s3://{bucket}/images/disk.img.manifest.xml"},
            headers=_basic(TEST_ACCESS_KEY, TEST_SECRET_KEY),
        )
    assert info.value.code == "BundleInvalid.PartDigest"


def _get(client: Any, url: str, **kw: Any) -> Any:
    return client.simulate_get(
        "/v1/bundles/decrypted-image",
        params={"manifest": url},
        headers=_basic(TEST_ACCESS_KEY, TEST_SECRET_KEY),
        **kw,
    )


def test_get_decrypted_image_requires_a_signature_that_verifies_against_a_signer_certificate(
    moto: MotoServer, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    image = os.urandom(100 * 1024)
    names = {
        "signed": make_bundle(tmp_path / "signed", image, keys["cloud"], keys["user"], prefix="signed.img"),
        "unsigned": make_bundle(
            tmp_path / "unsigned", image, keys["cloud"], keys["user"], prefix="unsigned.img", sign=False
        ),
        "foreign": make_bundle(
            tmp_path / "foreign", image, keys["cloud"], keys["other"], prefix="foreign.img"
        ),
        "tampered": make_bundle(
            tmp_path / "tampered", image, keys["cloud"], keys["user"], prefix="tampered.img"
        ),
    }
    tampered = names["tampered"].manifest
    tampered.write_text(tampered.read_text().replace("<type>machine</type>", "<type>kernel</type>"))
    files = [(b.directory, p.name) for b in names.values() for p in [*b.parts, b.manifest]]
    bucket = f"bundle-{uuid.uuid4().hex[:12]}"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=bucket)
    for directory, name in files:
        s3.put_object(Bucket=bucket, Key=f"images/{name}", Body=(directory / name).read_bytes())
    client = _admin_client(tmp_path, moto, keys["cloud"].key, keys["user"].cert)

    ok = _get(client, f"s3://{bucket}/images/signed.img.manifest.xml")
    assert ok.status_code == 200 and ok.content == image
    for name in ("unsigned", "foreign", "tampered"):
        refused = _get(client, f"s3://{bucket}/images/{name}.img.manifest.xml")
        assert refused.status_code == 422, (name, refused.text)
        assert refused.json["error"]["code"] == "BundleInvalid.Signature", name

    unconfigured = _admin_client(tmp_path, moto, keys["cloud"].key)
    answer = _get(unconfigured, f"s3://{bucket}/images/signed.img.manifest.xml")
    assert answer.status_code == 503 and answer.json["error"]["code"] == "InvalidConfiguration"
    assert "signer_certs" in answer.json["error"]["message"]


def test_get_decrypted_image_is_refused_over_plain_http_from_a_remote_client(
    moto: MotoServer, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    image = os.urandom(50 * 1024)
    bundle = make_bundle(tmp_path / "b", image, keys["cloud"], keys["user"])
    bucket = _upload(moto, bundle.directory, [p.name for p in [*bundle.parts, bundle.manifest]])
    client = _admin_client(tmp_path, moto, keys["cloud"].key, keys["user"].cert)
    url = f"s3://{bucket}/images/disk.img.manifest.xml"

    remote = _get(client, url, remote_addr="192.0.2.7")
    assert remote.status_code == 403 and remote.json["error"]["code"] == "InsecureTransport"
    over_tls = _get(client, url, remote_addr="192.0.2.7", protocol="https")
    assert over_tls.status_code == 200 and over_tls.content == image
    loopback = _get(client, url, remote_addr="::1")
    assert loopback.status_code == 200 and loopback.content == image
