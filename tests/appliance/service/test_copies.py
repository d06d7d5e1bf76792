"""copy-image inside the toolkit: ImportService (a real ImportSnapshot) → CopyService → the copy-image
workflow → another store (a moto server process for S3, real files), the copy compared by sha256 with
the original and listed among the image's locations.

The admin API on top of this is tested in tests/api/test_images.py, the CLI in
tests/appliance/cli/test_copy.py.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.errors import ImagingError, IncorrectState
from appliance.service.copies import CopyService, copy_outcome
from appliance.service.imports import ImportService
from appliance.service.importtasks import Caller, DiskContainer
from appliance.service.importviews import image_disks, outcome
from appliance.service.resolver import Resolver
from appliance.store import Task, TaskState
from appliance.targets.chunkdigest import digest_file
from tests import guestfactory, stores
from tests.processes import wait_until
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy
from tests.taskrun import Running, abandoned_steps, run

pytestmark = pytest.mark.slow

MiB = 1 << 20


def make_disk(path: Path, size: int = 24 * MiB) -> Path:
    """A RAW disk with data in most MiBs and holes in some (no image format's magic anywhere)."""
    with open(path, "wb") as f:
        for i in range(size // MiB):
            if i % 5 == 3:
                f.seek(MiB, 1)
                continue
            f.write(hashlib.sha256(str(i).encode()).digest() * (MiB // 32))
        f.truncate(size)
    return path


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_settings(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "access_key": "testing",
        "secret_key": "testing",
        **extra,
    }


def cfg_data(tmp_path: Path, s3_endpoint: str, **s3: Any) -> dict[str, Any]:
    return {
        "state_dir": str(tmp_path / "state"),
        "sources": {"allowed_endpoints": [s3_endpoint], "retries": 2, "s3": s3_settings(s3_endpoint, **s3)},
        "tasks": {"max_active": 3},
    }


@pytest.fixture
def buckets(moto: MotoServer, request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """(the bucket disks are imported from, the image target's bucket, the bucket copies go to)."""
    name = request.node.name.replace("_", "-")[:28].lower().strip("-")
    s3 = moto.client("s3")
    names = (f"in-{name}", f"img-{name}", f"cp-{name}")
    for b in names:
        s3.create_bucket(Bucket=b)
    return names


def import_snapshot(
    cfg: config_mod.Config, moto: MotoServer, bucket: str, disk: Path
) -> tuple[Task, ImportService]:
    moto.client("s3").upload_file(str(disk), bucket, "disk.raw")
    imports = ImportService(cfg)
    done = run(cfg, imports.import_snapshot(DiskContainer(format="RAW", bucket=bucket, key="disk.raw")))
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    return done, imports


@pytest.fixture
def on_file(tmp_path: Path, moto: MotoServer, buckets: tuple[str, str, str]) -> Iterator[dict[str, Any]]:
    """A snapshot imported to the file image target; copies go to S3 through sources.s3."""
    cfg = stores.config(cfg_data(tmp_path, moto.endpoint), base_dir=tmp_path)
    disk = make_disk(tmp_path / "disk.raw")
    done, imports = import_snapshot(cfg, moto, buckets[0], disk)
    try:
        yield {
            "cfg": cfg,
            "disk": disk,
            "snapshot_id": "snap-" + done.id[-17:],
            "task": done,
            "store": imports.store,
        }
    finally:
        imports.store.close()


def image_target_s3(tmp_path: Path, endpoint: str, bucket: str, **sources: Any) -> dict[str, Any]:
    return cfg_data(tmp_path, endpoint, **sources) | {
        "targets": {"image": {"type": "s3", "bucket": bucket, **s3_settings(endpoint)}}
    }


def test_a_file_image_copies_to_s3_byte_identical_and_becomes_one_of_its_locations(
    on_file: dict[str, Any], moto: MotoServer, buckets: tuple[str, str, str]
) -> None:
    cfg, snapshot_id = on_file["cfg"], on_file["snapshot_id"]
    copies = CopyService(cfg, on_file["store"])
    task = copies.copy_image(snapshot_id, f"s3://{buckets[2]}/copies/")
    assert task.id.startswith("copy-") and task.kind == "copy-image"
    done = run(cfg, task)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)

    original = on_file["disk"].read_bytes()
    copied = copy_outcome(done)
    key = f"copies/{task.id}.raw"
    assert copied["location"] | {"type": "s3", "bucket": buckets[2], "key": key} == copied["location"]
    s3 = moto.client("s3")
    body = s3.get_object(Bucket=buckets[2], Key=key)["Body"].read()
    assert sha256_of(body) == sha256_of(original) == copied["sha256"] == copied["source_sha256"]
    assert copied["method"] == "stream"  # file → S3
    meta = s3.head_object(Bucket=buckets[2], Key=key)["Metadata"]
    assert meta["sha256"] == copied["sha256"] and meta["copy-task-id"] == task.id
    record = copied["provenance"]
    assert record["source"]["sha256"] == sha256_of(original)
    # the image was stored by a streamed import: its sha256-chunked (checked on the copy's read)
    assert record["source"]["recorded_digest"]["value"] == digest_file(on_file["disk"]).hexdigest
    # the copy ran in this process: its chunked digest's hashing threads are gone, also those of the
    # server-side job that a file source never takes (they leaked with every such copy)
    assert [t.name for t in threading.enumerate() if t.name.startswith("copy-chunks")] == []

    # recorded on the image: the resolver lists both locations, the import's first
    locations = copies.resolve(snapshot_id)["locations"]
    assert [loc["type"] for loc in locations] == ["file", "s3"]
    assert locations[1]["key"] == key and locations[1]["copy_task_id"] == task.id
    # progress was reported: bytes copied of the total
    progress = [
        e.data for e in on_file["store"].events(task_id=task.id, limit=1000) if e.kind == "step.progress"
    ]
    assert progress and progress[-1]["total"] == len(original) and progress[-1]["done"] == len(original)
    # a second copy to the same place is refused, nothing queued
    with pytest.raises(ImagingError) as exc:
        copies.copy_image(snapshot_id, f"s3://{buckets[2]}/copies/")
    assert exc.value.code == "Copy.AlreadyThere"


def test_an_s3_image_copies_to_a_file_byte_identical(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str, str]
) -> None:
    cfg = stores.config(image_target_s3(tmp_path, moto.endpoint, buckets[1]), base_dir=tmp_path)
    disk = make_disk(tmp_path / "disk.raw")
    done, imports = import_snapshot(cfg, moto, buckets[0], disk)
    try:
        assert outcome(done)["location"]["type"] == "s3"
        copies = CopyService(cfg, imports.store)
        target = tmp_path / "copies"
        task = copies.copy_image("snap-" + done.id[-17:], f"file://{target}")
        finished = run(cfg, task)
        assert finished.state is TaskState.COMPLETED, (finished.error_code, finished.error_message)
        copy = target / f"{task.id}.raw"
        assert (
            sha256_of(copy.read_bytes()) == sha256_of(disk.read_bytes()) == copy_outcome(finished)["sha256"]
        )
        assert copy.stat().st_mode & 0o777 == 0o600
        assert [p.name for p in target.iterdir()] == [copy.name]  # no partial left beside it
        assert copies.resolve("snap-" + done.id[-17:])["locations"][1]["path"] == str(copy)
    finally:
        imports.store.close()


def test_a_copy_between_buckets_of_one_endpoint_is_made_by_s3_and_is_identical(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str, str]
) -> None:
    # the image target and the user buckets share the endpoint and the credentials: UploadPartCopy
    cfg = stores.config(
        image_target_s3(tmp_path, moto.endpoint, buckets[1], part_size="5MiB"), base_dir=tmp_path
    )
    disk = make_disk(tmp_path / "disk.raw")
    done, imports = import_snapshot(cfg, moto, buckets[0], disk)
    try:
        copies = CopyService(cfg, imports.store)
        task = copies.copy_image("snap-" + done.id[-17:], f"s3://{buckets[2]}")
        finished = run(cfg, task)
        assert finished.state is TaskState.COMPLETED, (finished.error_code, finished.error_message)
        copied = copy_outcome(finished)
        assert copied["method"] == "server-side"
        s3 = moto.client("s3")
        body = s3.get_object(Bucket=buckets[2], Key=f"{task.id}.raw")["Body"].read()
        assert sha256_of(body) == sha256_of(disk.read_bytes()) == copied["sha256"]
        assert (
            s3.head_object(Bucket=buckets[2], Key=f"{task.id}.raw")["Metadata"]["sha256"] == copied["sha256"]
        )
    finally:
        imports.store.close()


def test_a_store_that_refuses_server_side_copies_gets_a_streamed_copy_and_no_upload_is_left_open(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str, str]
) -> None:
    # one endpoint and one set of credentials (a server-side copy is tried), behind a proxy that
    # answers every UploadPartCopy as a store without it does: NotImplemented
    with StallingProxy(moto.endpoint) as proxy:
        cfg = stores.config(
            image_target_s3(tmp_path, proxy.endpoint, buckets[1], part_size="5MiB"), base_dir=tmp_path
        )
        disk = make_disk(tmp_path / "disk.raw")
        done, imports = import_snapshot(cfg, moto, buckets[0], disk)
        try:
            copies = CopyService(cfg, imports.store)
            task = copies.copy_image("snap-" + done.id[-17:], f"s3://{buckets[2]}")
            proxy.refuse("PUT", "x-amz-copy-source", 501, "NotImplemented")
            finished = run(cfg, task)
            assert finished.state is TaskState.COMPLETED, (finished.error_code, finished.error_message)
            assert proxy.refused == 1  # the first part was refused: no more were tried
            copied = copy_outcome(finished)
            assert copied["method"] == "stream"
            s3 = moto.client("s3")
            body = s3.get_object(Bucket=buckets[2], Key=f"{task.id}.raw")["Body"].read()
            assert sha256_of(body) == sha256_of(disk.read_bytes()) == copied["sha256"]
            # the refused upload was aborted; the streamed one completed: one object, nothing open
            assert s3.list_multipart_uploads(Bucket=buckets[2]).get("Uploads", []) == []
            objects = s3.list_objects_v2(Bucket=buckets[2], Prefix=task.id)["Contents"]
            assert [o["Key"] for o in objects] == [f"{task.id}.raw"]
        finally:
            imports.store.close()


@pytest.mark.parametrize("method", ["stream", "server-side"])
def test_cancel_mid_copy_to_s3_leaves_no_object_and_no_incomplete_multipart_upload(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str, str], method: str
) -> None:
    # every S3 call goes through a proxy that holds the upload's second part (an UploadPart, or with
    # one endpoint and one set of credentials for the image and the copy an UploadPartCopy): the copy
    # is provably mid-upload (a multipart upload open, a part stored) when it is cancelled
    with StallingProxy(moto.endpoint) as proxy:
        if method == "stream":
            data = cfg_data(tmp_path, proxy.endpoint, part_size="5MiB", threads=1)
        else:
            data = image_target_s3(tmp_path, proxy.endpoint, buckets[1], part_size="5MiB")
        cfg = stores.config(data, base_dir=tmp_path)
        done, imports = import_snapshot(cfg, moto, buckets[0], make_disk(tmp_path / "disk.raw"))
        try:
            copies = CopyService(cfg, imports.store)
            task = copies.copy_image("snap-" + done.id[-17:], f"s3://{buckets[2]}/copies/")
            proxy.arm_request("PUT", "partNumber=2")
            running = Running(cfg, task)
            wait_until(lambda: proxy.stalled_on("partNumber=2") >= 1, what="the second part to be held")
            s3 = moto.client("s3")
            assert len(s3.list_multipart_uploads(Bucket=buckets[2]).get("Uploads", [])) == 1
            copies.cancel(task.id)
            proxy.release()
            ended = running.ended()
            assert ended.state is TaskState.CANCELLED, ended
            assert s3.list_multipart_uploads(Bucket=buckets[2]).get("Uploads", []) == []
            assert s3.list_objects_v2(Bucket=buckets[2]).get("KeyCount") == 0
            assert len(copies.resolve("snap-" + done.id[-17:])["locations"]) == 1
            with pytest.raises(IncorrectState):
                copies.cancel(task.id)
        finally:
            imports.store.close()


def test_cancel_mid_copy_to_a_file_leaves_no_partial_file(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str, str]
) -> None:
    # the image is read from S3 through a proxy that holds the GET after 8 MiB: the copy has written
    # part of its file when it is cancelled
    with StallingProxy(moto.endpoint) as proxy:
        cfg = stores.config(image_target_s3(tmp_path, proxy.endpoint, buckets[1]), base_dir=tmp_path)
        done, imports = import_snapshot(cfg, moto, buckets[0], make_disk(tmp_path / "disk.raw"))
        try:
            copies = CopyService(cfg, imports.store)
            target = tmp_path / "copies"
            task = copies.copy_image("snap-" + done.id[-17:], f"file://{target}")
            key = outcome(done)["location"]["key"]
            proxy.arm(key, 8 * MiB)
            running = Running(cfg, task)
            wait_until(lambda: proxy.stalled_on(key) >= 1, what="the read of the stored image to be held")
            wait_until(lambda: any(target.iterdir()), what="the partial file")
            copies.cancel(task.id)
            proxy.release()
            ended = running.ended()
            assert ended.state is TaskState.CANCELLED, ended
            assert list(target.iterdir()) == []
        finally:
            imports.store.close()


@pytest.mark.parametrize("to", ["s3", "file"])
def test_a_stored_image_that_changed_fails_with_source_digest_mismatch_and_leaves_nothing(
    on_file: dict[str, Any], moto: MotoServer, buckets: tuple[str, str, str], tmp_path: Path, to: str
) -> None:
    stored = Path(outcome(on_file["task"])["location"]["path"])
    with open(stored, "r+b") as f:
        f.seek(20 * MiB)
        f.write(b"tampered")
    copies = CopyService(on_file["cfg"], on_file["store"])
    target = tmp_path / "copies"
    spec = f"s3://{buckets[2]}/copies/" if to == "s3" else f"file://{target}"
    done = run(on_file["cfg"], copies.copy_image(on_file["snapshot_id"], spec))
    assert done.state is TaskState.FAILED
    assert done.error_code == "Source.DigestMismatch", done.error_message
    s3 = moto.client("s3")
    assert s3.list_objects_v2(Bucket=buckets[2]).get("KeyCount") == 0
    assert s3.list_multipart_uploads(Bucket=buckets[2]).get("Uploads", []) == []
    assert not target.exists() or list(target.iterdir()) == []
    assert len(copies.resolve(on_file["snapshot_id"])["locations"]) == 1


def test_unknown_and_other_accounts_ids_are_refused_and_nothing_is_queued(
    on_file: dict[str, Any], buckets: tuple[str, str, str]
) -> None:
    copies = CopyService(on_file["cfg"], on_file["store"])
    cases = [
        (lambda: copies.copy_image("ami-0123456789abcdef0", f"s3://{buckets[2]}"), "InvalidAMIID.NotFound"),
        (
            lambda: copies.copy_image("snap-0123456789abcdef0", f"s3://{buckets[2]}"),
            "InvalidSnapshot.NotFound",
        ),
        (lambda: copies.copy_image("ami-xyz", f"s3://{buckets[2]}"), "InvalidAMIID.Malformed"),
        (
            lambda: copies.copy_image(
                on_file["snapshot_id"], f"s3://{buckets[2]}", sees=Caller.acting_for("other").sees
            ),
            "InvalidSnapshot.NotFound",
        ),
        (lambda: copies.copy_image(on_file["snapshot_id"], "ftp://x/y"), "InvalidParameterValue"),
        (lambda: copies.copy_image(on_file["snapshot_id"], "s3://Bad_Bucket"), "InvalidParameterValue"),
        (
            lambda: copies.copy_image(on_file["snapshot_id"], "file:///tmp/x", allow_files=False),
            "Copy.FileDestinationDenied",
        ),
    ]
    for call, code in cases:
        with pytest.raises(ImagingError) as exc:
            call()
        assert exc.value.code == code
    assert on_file["store"].list_tasks(kind=["copy-image"]) == []


def test_a_source_replaced_during_a_server_side_copy_fails_and_leaves_nothing(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str, str]
) -> None:
    # the first UploadPartCopy is held after the source was read and verified; meanwhile the stored
    # object is overwritten: the copy S3 made is not of the verified bytes and must not be kept
    with StallingProxy(moto.endpoint) as proxy:
        data = image_target_s3(tmp_path, proxy.endpoint, buckets[1], part_size="5MiB")
        cfg = stores.config(data, base_dir=tmp_path)
        done, imports = import_snapshot(cfg, moto, buckets[0], make_disk(tmp_path / "disk.raw"))
        try:
            copies = CopyService(cfg, imports.store)
            task = copies.copy_image("snap-" + done.id[-17:], f"s3://{buckets[2]}")
            proxy.arm_request("PUT", "partNumber=1")
            running = Running(cfg, task)
            wait_until(lambda: proxy.stalled_on("partNumber=1") >= 1, what="the first part copy to be held")
            s3 = moto.client("s3")
            stored = outcome(done)["location"]
            # as large as before, so every part copy and the completion succeed: only the ETag tells
            s3.put_object(
                Bucket=stored["bucket"], Key=stored["key"], Body=b"replaced" * (stored["size"] // 8)
            )
            proxy.release()
            ended = running.ended()
            assert ended.state is TaskState.FAILED, ended
            assert ended.error_code == "Source.DigestMismatch", ended.error_message
            assert s3.list_objects_v2(Bucket=buckets[2]).get("KeyCount") == 0
            assert s3.list_multipart_uploads(Bucket=buckets[2]).get("Uploads", []) == []
        finally:
            imports.store.close()


def test_a_data_disk_of_a_multi_disk_image_resolves_by_its_snapshot_id_and_copies_on_its_own(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str, str]
) -> None:
    cfg = stores.config(cfg_data(tmp_path, moto.endpoint), base_dir=tmp_path)
    boot, data = guestfactory.linux_disk(tmp_path), make_disk(tmp_path / "data.raw")
    s3 = moto.client("s3")
    s3.upload_file(str(boot), buckets[0], "boot.raw")
    s3.upload_file(str(data), buckets[0], "data.raw")
    imports = ImportService(cfg)
    try:
        task = imports.import_image(
            [
                DiskContainer(format="RAW", bucket=buckets[0], key="boot.raw"),
                DiskContainer(format="RAW", bucket=buckets[0], key="data.raw"),
            ]
        )
        done = run(cfg, task)
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        disks = image_disks(done)
        boot_snap, data_snap = "snap-" + done.id[-17:], disks[1]["snapshot_id"]
        assert disks[0]["snapshot_id"] == boot_snap and data_snap != boot_snap

        # the data disk's snapshot id (which does not name its task) resolves to the data disk
        resolver = Resolver(cfg, imports.store)
        found = resolver.snapshot(data_snap)
        assert found["task_id"] == done.id and found["location"] == disks[1]["location"]
        assert sha256_of(Path(found["location"]["path"]).read_bytes()) == sha256_of(data.read_bytes())
        assert resolver.snapshot(boot_snap)["location"] == disks[0]["location"]

        # a copy of the data disk is a copy of that disk, listed with it and not with the boot disk
        copied = run(cfg, CopyService(cfg, imports.store).copy_image(data_snap, f"s3://{buckets[2]}/"))
        assert copied.state is TaskState.COMPLETED, (copied.error_code, copied.error_message)
        key = copy_outcome(copied)["location"]["key"]
        body = s3.get_object(Bucket=buckets[2], Key=key)["Body"].read()
        assert sha256_of(body) == sha256_of(data.read_bytes())
        assert [loc.get("copy_task_id") for loc in resolver.snapshot(data_snap)["locations"]] == [
            None,
            copied.id,
        ]
        assert len(resolver.snapshot(boot_snap)["locations"]) == 1
        assert len(resolver.image("ami-" + done.id[-17:])["locations"]) == 1
    finally:
        imports.store.close()


def test_a_cancel_while_s3_does_not_answer_a_part_copy_ends_the_copy_without_waiting_for_it(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str, str]
) -> None:
    # one endpoint and one set of credentials (S3 copies the parts), behind a proxy that holds the second
    # UploadPartCopy for as long as the test wants (S3 copying a part of GiBs, or a stalled connection):
    # the cancel must end the copy while that part is still held (a suspend has seconds of grace)
    with StallingProxy(moto.endpoint) as proxy:
        data = image_target_s3(tmp_path, proxy.endpoint, buckets[1], part_size="5MiB")
        cfg = stores.config(data, base_dir=tmp_path)
        done, imports = import_snapshot(cfg, moto, buckets[0], make_disk(tmp_path / "disk.raw"))
        try:
            copies = CopyService(cfg, imports.store)
            task = copies.copy_image("snap-" + done.id[-17:], f"s3://{buckets[2]}/copies/")
            held = proxy.arm_request("PUT", "partNumber=2", f"/{buckets[2]}/copies/{task.id}.raw")
            running = Running(cfg, task)
            wait_until(lambda: proxy.stalled_on(held) == 1, what="the second part copy to be held")
            copies.cancel(task.id)
            ended = running.ended(timeout=30)
            assert ended.state is TaskState.CANCELLED, ended
            # the step stopped by itself (the engine abandons a step still running after its grace)
            assert not abandoned_steps(imports.store, task.id)
            assert proxy.stalled_on(held) == 1  # still held: not waited for
            s3 = moto.client("s3")
            assert s3.list_multipart_uploads(Bucket=buckets[2]).get("Uploads", []) == []
            assert s3.list_objects_v2(Bucket=buckets[2]).get("KeyCount") == 0
        finally:
            proxy.release()
            imports.store.close()
