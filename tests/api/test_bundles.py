"""ImportImage of an EC2 image bundle (``DiskContainer.Url`` naming a ``.manifest.xml``): the worker
unbundles it (bundle made with openssl by tests/bundlefactory.py), then inspects, validates the guest and
stores it as any import; a broken bundle fails the task with its code, and the cloud key shows nowhere."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import guestfactory
from tests.api.e2e_support import Appliance, admin_task, running_appliance, wait_for
from tests.bundlefactory import KeyPair, make_bundle, make_keypair
from tests.httpfixtures import TestHTTPServer
from tests.servers import MotoServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("keys")
    return {name: make_keypair(d, name) for name in ("cloud", "user")}


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
