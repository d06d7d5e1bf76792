"""An export's source check against S3 through the real step (moto server): a source that fails its check
never shows up as an object, not even for a moment; and an image stored into the S3 image target through
scratch (not streamed) records the ``sha256-chunked`` an export's source check uses."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from appliance.service.exports import ExportService, object_key
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer
from appliance.service.importviews import outcome
from appliance.steps.export_check import SourceDigestCheck
from appliance.store import TaskState
from appliance.targets.chunkdigest import digest_file
from tests import guestfactory, stores
from tests.appliance.service.test_exports import buckets, cfg_data, imported, run, tamper
from tests.servers import MotoServer

pytestmark = pytest.mark.slow

__all__ = ["buckets", "imported"]  # fixtures of test_exports, used here by name

MiB = 1 << 20


def observe_the_key_while_the_check_runs(
    monkeypatch: pytest.MonkeyPatch, moto: MotoServer, bucket: str, key: str
) -> list[tuple[str, Any]]:
    """What a reader of ``bucket`` sees of ``key`` at the moment the export's source check compares its
    digest (the real check runs right after): whether the object exists, and its open uploads."""
    reader = moto.client("s3")
    seen: list[tuple[str, Any]] = []
    compare = SourceDigestCheck._compare

    def observed(self: SourceDigestCheck) -> None:
        try:
            seen.append(("object", reader.head_object(Bucket=bucket, Key=key)["ContentLength"]))
        except ClientError as exc:
            seen.append(("object", exc.response["Error"]["Code"]))
        uploads = reader.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
        seen.append(("open uploads", len(uploads)))
        compare(self)

    monkeypatch.setattr(SourceDigestCheck, "_compare", observed)
    return seen


@pytest.mark.parametrize("disk_format", ["RAW", "VHD", "VMDK"])
def test_an_export_whose_source_fails_its_check_never_makes_its_object_visible(
    imported: dict[str, Any],
    moto: MotoServer,
    buckets: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    disk_format: str,
) -> None:
    # RAW: the output's digest stands for the source's, compared once every part is up; VHD, VMDK: the
    # source hashed on the writer's reads. Either way the upload must still be open, no object there.
    tamper(imported)  # the stored disk changed behind the appliance after its import recorded its digest
    exports = ExportService(imported["cfg"], imported["store"])
    task = exports.export_image(imported["image_id"], disk_image_format=disk_format, bucket=buckets[1])
    seen = observe_the_key_while_the_check_runs(monkeypatch, moto, buckets[1], object_key(task))
    done = run(imported["cfg"], task)
    assert (done.state, done.error_code) == (TaskState.FAILED, "Source.DigestMismatch")
    assert seen == [("object", "404"), ("open uploads", 1)]
    s3 = moto.client("s3")
    assert s3.list_objects_v2(Bucket=buckets[1]).get("KeyCount") == 0
    assert not s3.list_multipart_uploads(Bucket=buckets[1]).get("Uploads")


@pytest.fixture
def imported_through_scratch(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str]
) -> Iterator[dict[str, Any]]:
    """A dynamic VHD imported into the S3 image target: not a streamable format, so fetched into
    scratch, converted to RAW and stored by the target's upload of the file (``image.store``)."""
    images = f"{buckets[0]}-images"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=images)
    image_target = {
        "type": "s3",
        "bucket": images,
        "endpoint_url": moto.endpoint,
        "region": "us-east-1",
        "access_key": "testing",
        "secret_key": "testing",
    }
    cfg = stores.config(
        cfg_data(tmp_path, moto.endpoint) | {"targets": {"image": image_target}}, base_dir=tmp_path
    )
    disk = guestfactory.linux_disk(tmp_path)
    vhd = tmp_path / "disk.vhd"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            str(disk),
            str(vhd),
        ],
        check=True,
    )
    s3.upload_file(str(vhd), buckets[0], "disk.vhd")
    imports = ImportService(cfg)
    try:
        done = run(
            cfg, imports.import_image([DiskContainer(format="VHD", bucket=buckets[0], key="disk.vhd")])
        )
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        assert "streamed" not in done.result["disk"]  # the scratch path, not image.stream
        location = outcome(done)["location"]
        assert location["type"] == "s3" and location["bucket"] == images
        yield {"cfg": cfg, "store": imports.store, "disk": disk, "task": done, "location": location}
    finally:
        imports.store.close()


def test_an_image_stored_in_s3_through_scratch_records_its_chunked_digest(
    tmp_path: Path, moto: MotoServer, imported_through_scratch: dict[str, Any]
) -> None:
    location = imported_through_scratch["location"]
    stored = tmp_path / "stored.raw"
    s3 = moto.client("s3")
    s3.download_file(location["bucket"], location["key"], str(stored))
    computed = digest_file(stored)
    digest = location["digest"]
    assert (digest["algorithm"], digest["value"], digest["chunks"]) == (
        "sha256-chunked",
        computed.hexdigest,
        computed.chunks,
    )
    meta = s3.head_object(Bucket=location["bucket"], Key=location["key"])["Metadata"]
    assert (meta["sha256-chunked"], meta["digest-chunk-size"], meta["digest-chunks"]) == (
        computed.hexdigest,
        str(computed.chunk_size),
        str(computed.chunks),
    )


@pytest.mark.parametrize("disk_format", ["RAW", "VMDK"])
def test_an_image_stored_through_scratch_and_replaced_since_is_caught_by_its_chunked_digest(
    moto: MotoServer, buckets: tuple[str, str], imported_through_scratch: dict[str, Any], disk_format: str
) -> None:
    # the stored object replaced behind the appliance's back: same size, one byte range other
    location = imported_through_scratch["location"]
    s3 = moto.client("s3")
    body = bytearray(s3.get_object(Bucket=location["bucket"], Key=location["key"])["Body"].read())
    body[MiB : MiB + 8] = b"tampered"
    s3.put_object(Bucket=location["bucket"], Key=location["key"], Body=bytes(body))
    exports = ExportService(imported_through_scratch["cfg"], imported_through_scratch["store"])
    image_id = "ami-" + imported_through_scratch["task"].id[-17:]
    task = exports.export_image(image_id, disk_image_format=disk_format, bucket=buckets[1])
    done = run(imported_through_scratch["cfg"], task)
    assert (done.state, done.error_code) == (TaskState.FAILED, "Source.DigestMismatch")
    assert "sha256-chunked" in (done.error_message or "")  # checked by the recorded chunked digest
    assert s3.list_objects_v2(Bucket=buckets[1]).get("KeyCount") == 0
    assert not s3.list_multipart_uploads(Bucket=buckets[1]).get("Uploads")
