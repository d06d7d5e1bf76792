"""Export tasks inside the toolkit: ImportService (a real import) → ExportService → the export-image
workflow → S3 (moto server), the exported object compared with the original by ``qemu-img compare``.

The HTTP API (botocore parsing, the AWS CLI) is tested on top of this in tests/api/test_e2e_export.py.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ImagingError, IncorrectState, TaskNotFound
from appliance.image.ova import unpack_ova
from appliance.service.exports import ExportService, object_key
from appliance.service.imports import ImportService
from appliance.service.importtasks import Caller, DiskContainer
from appliance.service.importviews import outcome
from appliance.store import TaskState
from appliance.targets.chunkdigest import digest_file
from appliance.targets.rawio import segments
from tests import guestfactory, stores
from tests.processes import wait_until
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy
from tests.taskrun import Running, abandoned_steps, run

pytestmark = pytest.mark.slow

MiB = 1 << 20


def cfg_data(tmp_path: Path, s3_endpoint: str, **s3: Any) -> dict[str, Any]:
    return {
        "state_dir": str(tmp_path / "state"),
        "sources": {
            "allowed_endpoints": [s3_endpoint],
            "retries": 2,
            "s3": {
                "endpoint_url": s3_endpoint,
                "region": "us-east-1",
                "access_key": "testing",
                "secret_key": "testing",
                **s3,
            },
        },
        "tasks": {"max_active": 3},
    }


@pytest.fixture
def buckets(moto: MotoServer, request: pytest.FixtureRequest) -> tuple[str, str]:
    """(the bucket disks are imported from, the bucket exports go to)."""
    name = request.node.name.replace("_", "-")[:30].lower().strip("-")
    s3 = moto.client("s3")
    for b in (f"in-{name}", f"out-{name}"):
        s3.create_bucket(Bucket=b)
    return f"in-{name}", f"out-{name}"


@pytest.fixture
def imported(tmp_path: Path, moto: MotoServer, buckets: tuple[str, str]) -> Iterator[dict[str, Any]]:
    """A bootable Linux disk imported with ImportImage (RAW, from a user bucket, the file image target)."""
    cfg = stores.config(cfg_data(tmp_path, moto.endpoint), base_dir=tmp_path)
    disk = guestfactory.linux_disk(tmp_path)
    moto.client("s3").upload_file(str(disk), buckets[0], "disk.raw")
    imports = ImportService(cfg)
    try:
        task = imports.import_image([DiskContainer(format="RAW", bucket=buckets[0], key="disk.raw")])
        done = run(cfg, task)
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        yield {
            "cfg": cfg,
            "disk": disk,
            "image_id": "ami-" + done.id[-17:],
            "task": done,
            "store": imports.store,
        }
    finally:
        imports.store.close()


def qemu_compare(original: Path, exported: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt, str(original), str(exported)],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(("disk_format", "qemu_format"), [("VMDK", "vmdk"), ("VHD", "vpc"), ("RAW", "raw")])
def test_an_imported_image_exports_to_s3_identical_to_the_original(
    imported: dict[str, Any],
    moto: MotoServer,
    buckets: tuple[str, str],
    tmp_path: Path,
    disk_format: str,
    qemu_format: str,
) -> None:
    cfg = imported["cfg"]
    exports = ExportService(cfg, imported["store"])
    task = exports.export_image(
        imported["image_id"], disk_image_format=disk_format, bucket=buckets[1], prefix="vms/"
    )
    assert task.id.startswith("export-ami-") and len(task.id) == len("export-ami-") + 17
    key = object_key(task)
    assert key == f"vms/{task.id}.{disk_format.lower()}"
    done = run(cfg, task)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)

    out = tmp_path / f"exported.{disk_format.lower()}"
    s3 = moto.client("s3")
    s3.download_file(buckets[1], key, str(out))
    compared = qemu_compare(imported["disk"], out, qemu_format)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    if disk_format == "VMDK":
        info = subprocess.run(["qemu-img", "info", "-f", "vmdk", str(out)], capture_output=True, text=True)
        assert "streamOptimized" in info.stdout

    # provenance: in the result and as the object's metadata, the digests those of the real bytes
    exported = done.result["exported"]
    output_sha = hashlib.sha256(out.read_bytes()).hexdigest()
    record = exported["provenance"]
    assert exported["sha256"] == record["output"]["sha256"] == output_sha
    # the stored image's sha256-chunked (its import recorded it while writing), checked on the one read
    source_digest = digest_file(imported["disk"]).hexdigest
    assert (
        record["source"]["digest"]["value"] == record["source"]["recorded_digest"]["value"] == source_digest
    )
    assert record["tools"]["qemu-img"].startswith("qemu-img version")
    assert len(record["workflow"]["workflow_sha256"]) == 64
    meta = s3.head_object(Bucket=buckets[1], Key=key)["Metadata"]
    assert meta["sha256"] == output_sha and meta["source-sha256-chunked"] == source_digest
    assert meta["export-task-id"] == task.id and meta["source-id"] == imported["image_id"]
    # the chunked SHA-256 of the object (its parts), recomputed here, and S3's own composite checksum
    digest = record["output"]["digest"]
    body, part = out.read_bytes(), digest["chunk_size"]
    parts = [hashlib.sha256(body[i : i + part]).digest() for i in range(0, len(body), part)]
    assert digest["value"] == hashlib.sha256(b"".join(parts)).hexdigest() and digest["chunks"] == len(parts)
    assert digest == exported["digest"] and digest["s3_verified"] is True
    # S3 checked the composite checksum; the copy that added the whole sha256 got S3's sha256 of the copy
    head = s3.head_object(Bucket=buckets[1], Key=key, ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == output_sha


def as_imported_before_the_chunked_digest(imported: dict[str, Any]) -> str:
    """Rewrite the import's stored location as an import made before the import side recorded the
    output's sha256-chunked left it: its plain ``sha256`` only. Returns that sha256."""
    task = imported["store"].get_task(imported["task"].id)
    result = json.loads(json.dumps(task.result))
    stored = result["disk"]["streamed"]["stored"]
    sha256 = hashlib.sha256(Path(stored["path"]).read_bytes()).hexdigest()
    stored.pop("digest", None)
    stored["sha256"] = sha256
    store = imported["store"]
    with store._write() as conn:  # (the store has no API to rewrite a finished task's result)
        store._update(conn, task.id, {"result": json.dumps(result)})
    assert outcome(store.get_task(task.id))["location"]["sha256"] == sha256
    return sha256


def tamper(imported: dict[str, Any]) -> None:
    stored = Path(outcome(imported["store"].get_task(imported["task"].id))["location"]["path"])
    with open(stored, "r+b") as f:
        f.seek(1 * MiB)
        f.write(b"tampered")


def test_the_import_records_the_stored_images_chunked_digest_while_writing_it(
    imported: dict[str, Any],
) -> None:
    location = outcome(imported["task"])["location"]
    assert location["sha256"] is None  # no second read of the image for a whole-file sha256
    computed = digest_file(Path(location["path"]))  # what `imaging digest` computes
    assert (location["digest"]["value"], location["digest"]["chunks"]) == (
        computed.hexdigest,
        computed.chunks,
    )
    assert location["digest_method"].startswith("sha256-chunked computed while the streaming decoder")


@pytest.mark.parametrize("disk_format", ["RAW", "VHD"])
@pytest.mark.parametrize("record", ["sha256-chunked", "plain sha256 (imported before)"])
def test_a_stored_image_that_changed_since_its_import_is_not_exported(
    imported: dict[str, Any], moto: MotoServer, buckets: tuple[str, str], record: str, disk_format: str
) -> None:
    # RAW: the output's digest is the source's (hashed once); VHD: the source hashed on the writer's reads
    if record.startswith("plain"):
        as_imported_before_the_chunked_digest(imported)
    tamper(imported)
    exports = ExportService(imported["cfg"], imported["store"])
    task = exports.export_image(imported["image_id"], disk_image_format=disk_format, bucket=buckets[1])
    done = run(imported["cfg"], task)
    assert done.state is TaskState.FAILED
    assert done.error_code == "Source.DigestMismatch"
    assert ("sha256-chunked" in (done.error_message or "")) == (record == "sha256-chunked")
    s3 = moto.client("s3")
    assert s3.list_objects_v2(Bucket=buckets[1]).get("KeyCount") == 0
    assert not s3.list_multipart_uploads(Bucket=buckets[1]).get("Uploads")


def _bytes_read_by_this_process() -> int:
    """``rchar`` of /proc/self/io: every byte this process (the engine runs here) got from read(2)
    and pread(2), whatever it read."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("record", ["sha256-chunked", "plain sha256 (imported before)"])
def test_an_export_reads_its_source_once_and_checks_it_on_that_read(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str], record: str
) -> None:
    cfg = stores.config(cfg_data(tmp_path, moto.endpoint), base_dir=tmp_path)
    disk = guestfactory.linux_disk(tmp_path)
    with open(disk, "r+b") as f:  # 48 MiB of data: what the export reads, against a few MiB of the rest
        f.seek(disk.stat().st_size)
        f.write(os.urandom(48 * MiB))
    fd = os.open(disk, os.O_RDONLY)
    try:  # the bytes of the disk's data ranges: what a sparse-aware read of it reads
        data_bytes = sum(end - start for start, end, is_data in segments(fd, disk.stat().st_size) if is_data)
    finally:
        os.close(fd)
    moto.client("s3").upload_file(str(disk), buckets[0], "disk.raw")
    imports = ImportService(cfg)
    try:
        done = run(
            cfg, imports.import_image([DiskContainer(format="RAW", bucket=buckets[0], key="disk.raw")])
        )
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        imported = {"task": done, "store": imports.store}
        plain = as_imported_before_the_chunked_digest(imported) if record.startswith("plain") else None
        exports = ExportService(cfg, imports.store)
        task = exports.export_image("ami-" + done.id[-17:], disk_image_format="RAW", bucket=buckets[1])
        before = _bytes_read_by_this_process()
        exported = run(cfg, task)
        read = _bytes_read_by_this_process() - before
    finally:
        imports.store.close()
    assert exported.state is TaskState.COMPLETED, (exported.error_code, exported.error_message)
    # the source's data once (it was read twice: hashed whole, then read again by the writer)
    assert data_bytes <= read < 1.5 * data_bytes, (read, data_bytes)
    source = exported.result["exported"]["provenance"]["source"]
    if plain is None:
        assert source["digest"]["value"] == source["recorded_digest"]["value"] == digest_file(disk).hexdigest
        assert source["checked"] == [{"what": "recorded-sha256-chunked", "value": source["digest"]["value"]}]
    else:
        assert source["sha256"] == source["recorded_sha256"] == plain
        assert source["checked"] == [{"what": "recorded-sha256", "value": plain}]


def test_unknown_and_malformed_ids_are_refused_with_ec2_codes(
    imported: dict[str, Any], buckets: tuple[str, str]
) -> None:
    exports = ExportService(imported["cfg"], imported["store"])
    cases = [
        (
            lambda: exports.export_image(
                "ami-0123456789abcdef0", disk_image_format="VMDK", bucket=buckets[1]
            ),
            "InvalidAMIID.NotFound",
        ),
        (
            lambda: exports.export_image("ami-xyz", disk_image_format="VMDK", bucket=buckets[1]),
            "InvalidAMIID.Malformed",
        ),
        (
            lambda: exports.export_instance(
                "i-0123456789abcdef0",
                target_environment="vmware",
                disk_image_format="VMDK",
                bucket=buckets[1],
            ),
            "InvalidInstanceID.NotFound",
        ),
        # an image of another account does not exist for this caller
        (
            lambda: exports.export_image(
                imported["image_id"],
                disk_image_format="VMDK",
                bucket=buckets[1],
                sees=Caller.acting_for("other").sees,
            ),
            "InvalidAMIID.NotFound",
        ),
    ]
    for call, code in cases:
        with pytest.raises(ImagingError) as exc:
            call()
        assert exc.value.code == code
    assert imported["store"].list_tasks(kind=["export-image", "export-instance"]) == []
    with pytest.raises(TaskNotFound):
        exports.cancel("export-i-0123456789abcdef0")


def test_resolver_maps_issued_snapshot_ids_to_the_stored_image(imported: dict[str, Any]) -> None:
    exports = ExportService(imported["cfg"], imported["store"])
    snap = exports.resolver.snapshot("snap-" + imported["task"].id[-17:])
    image = exports.resolver.image(imported["image_id"])
    assert snap["location"] == image["location"] == outcome(imported["task"])["location"]


def test_cancel_mid_upload_leaves_no_object_and_no_incomplete_multipart_upload(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str]
) -> None:
    # Every S3 call goes through a proxy that holds the upload's second part: the task is provably
    # mid-upload (a multipart upload open, a part stored) when it is cancelled.
    with StallingProxy(moto.endpoint) as proxy:
        cfg = stores.config(
            cfg_data(tmp_path, proxy.endpoint, part_size="5MiB", threads=1), base_dir=tmp_path
        )
        disk = guestfactory.linux_disk(tmp_path)  # 25 MiB: five parts
        moto.client("s3").upload_file(str(disk), buckets[0], "disk.raw")
        imports = ImportService(cfg)
        try:
            done = run(
                cfg, imports.import_image([DiskContainer(format="RAW", bucket=buckets[0], key="disk.raw")])
            )
            assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
            exports = ExportService(cfg, imports.store)
            task = exports.export_image("ami-" + done.id[-17:], disk_image_format="RAW", bucket=buckets[1])
            proxy.arm_request("PUT", "partNumber=2")
            running = Running(cfg, task)
            wait_until(lambda: proxy.stalled_on("partNumber=2") >= 1, what="the second part to be held")
            s3 = moto.client("s3")
            assert len(s3.list_multipart_uploads(Bucket=buckets[1]).get("Uploads", [])) == 1
            exports.cancel(task.id)
            proxy.release()
            ended = running.ended()
            assert ended.state is TaskState.CANCELLED, ended
            assert s3.list_multipart_uploads(Bucket=buckets[1]).get("Uploads", []) == []
            assert s3.list_objects_v2(Bucket=buckets[1]).get("KeyCount") == 0
            with pytest.raises(IncorrectState):
                exports.cancel(task.id)
        finally:
            imports.store.close()


@pytest.fixture
def imported_into_s3(tmp_path: Path, moto: MotoServer, buckets: tuple[str, str]) -> Iterator[dict[str, Any]]:
    """A RAW disk imported (streamed) into the s3 image target."""
    images = f"{buckets[0]}-images"
    moto.client("s3").create_bucket(Bucket=images)
    data = cfg_data(tmp_path, moto.endpoint) | {
        "targets": {
            "image": {
                "type": "s3",
                "bucket": images,
                "endpoint_url": moto.endpoint,
                "region": "us-east-1",
                "access_key": "testing",
                "secret_key": "testing",
            }
        }
    }
    cfg = stores.config(data, base_dir=tmp_path)
    disk = guestfactory.linux_disk(tmp_path)
    moto.client("s3").upload_file(str(disk), buckets[0], "disk.raw")
    imports = ImportService(cfg)
    try:
        done = run(
            cfg, imports.import_image([DiskContainer(format="RAW", bucket=buckets[0], key="disk.raw")])
        )
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        location = outcome(done)["location"]
        assert location["type"] == "s3" and location["bucket"] == images
        yield {"cfg": cfg, "store": imports.store, "disk": disk, "task": done, "location": location}
    finally:
        imports.store.close()


def test_an_image_stored_in_s3_is_downloaded_checked_and_exported(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str], imported_into_s3: dict[str, Any]
) -> None:
    # the s3 image target: the stored image is read back from its bucket (hashed on the way)
    cfg, disk, done = imported_into_s3["cfg"], imported_into_s3["disk"], imported_into_s3["task"]
    # the import recorded the stored bytes' sha256-chunked, as the file image target does
    recorded = imported_into_s3["location"]["digest"]
    assert (recorded["algorithm"], recorded["value"]) == ("sha256-chunked", digest_file(disk).hexdigest)
    exports = ExportService(cfg, imported_into_s3["store"])
    task = exports.export_image("ami-" + done.id[-17:], disk_image_format="VMDK", bucket=buckets[1])
    exported = run(cfg, task)
    assert exported.state is TaskState.COMPLETED, (exported.error_code, exported.error_message)
    out = tmp_path / "exported.vmdk"
    moto.client("s3").download_file(buckets[1], object_key(task), str(out))
    compared = qemu_compare(disk, out, "vmdk")
    assert compared.returncode == 0, compared.stdout + compared.stderr
    record = exported.result["exported"]["provenance"]
    # the source was checked by its sha256-chunked, computed on the export's download of it
    assert record["source"]["digest"]["value"] == recorded["value"]
    assert {"what": "recorded-sha256-chunked", "value": recorded["value"]} in record["source"]["checked"]
    assert record["source"]["recorded_sha256"] == hashlib.sha256(disk.read_bytes()).hexdigest()
    # the downloaded copy and the converted file are gone from scratch
    assert list((tmp_path / "state").rglob("export-source.raw")) == []
    assert list((tmp_path / "state").rglob("export.vmdk")) == []


@pytest.mark.parametrize("disk_format", ["RAW", "VMDK"])
def test_an_image_stored_in_s3_whose_object_changed_since_its_import_is_not_exported(
    moto: MotoServer, buckets: tuple[str, str], imported_into_s3: dict[str, Any], disk_format: str
) -> None:
    # the stored object replaced behind the appliance's back: same size, one byte range other
    location, disk = imported_into_s3["location"], imported_into_s3["disk"]
    s3 = moto.client("s3")
    body = bytearray(disk.read_bytes())
    body[MiB : MiB + 8] = b"tampered"
    s3.put_object(Bucket=location["bucket"], Key=location["key"], Body=bytes(body))
    exports = ExportService(imported_into_s3["cfg"], imported_into_s3["store"])
    image_id = "ami-" + imported_into_s3["task"].id[-17:]
    task = exports.export_image(image_id, disk_image_format=disk_format, bucket=buckets[1])
    done = run(imported_into_s3["cfg"], task)
    assert done.state is TaskState.FAILED
    assert done.error_code == "Source.DigestMismatch"
    assert "sha256-chunked" in (done.error_message or "")  # checked by the recorded chunked digest
    assert s3.list_objects_v2(Bucket=buckets[1]).get("KeyCount") == 0
    assert not s3.list_multipart_uploads(Bucket=buckets[1]).get("Uploads")


def test_a_rerun_after_a_killed_upload_aborts_the_upload_it_left(
    imported: dict[str, Any], moto: MotoServer, buckets: tuple[str, str]
) -> None:
    # what a worker killed mid-upload leaves: an incomplete multipart upload of the task's key
    exports = ExportService(imported["cfg"], imported["store"])
    task = exports.export_image(imported["image_id"], disk_image_format="RAW", bucket=buckets[1])
    s3 = moto.client("s3")
    left = s3.create_multipart_upload(Bucket=buckets[1], Key=object_key(task))["UploadId"]
    s3.upload_part(Bucket=buckets[1], Key=object_key(task), UploadId=left, PartNumber=1, Body=b"x" * MiB)
    done = run(imported["cfg"], task)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert s3.list_multipart_uploads(Bucket=buckets[1]).get("Uploads", []) == []
    assert (
        s3.get_object(Bucket=buckets[1], Key=object_key(task))["Body"].read() == imported["disk"].read_bytes()
    )


@pytest.mark.parametrize(("make_disk", "firmware"), [("linux_disk", "bios"), ("uefi_disk", "efi")])
def test_an_image_exports_as_an_ova_that_reads_back_with_the_guests_firmware(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str], make_disk: str, firmware: str
) -> None:
    # ImportImage validates the guest (a UEFI-only GPT disk: boot mode uefi); ExportImage with the
    # OVA container writes S3Prefix + id + '.ova' whose OVF carries the firmware that validation found
    cfg = stores.config(cfg_data(tmp_path, moto.endpoint), base_dir=tmp_path)
    disk = getattr(guestfactory, make_disk)(tmp_path)
    s3 = moto.client("s3")
    s3.upload_file(str(disk), buckets[0], "disk.raw")
    imports = ImportService(cfg)
    try:
        done = run(
            cfg, imports.import_image([DiskContainer(format="RAW", bucket=buckets[0], key="disk.raw")])
        )
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        exports = ExportService(cfg, imports.store)
        task = exports.export_image(
            "ami-" + done.id[-17:],
            disk_image_format="VMDK",
            container_format="ova",
            bucket=buckets[1],
            prefix="vms/",
        )
        finished = run(cfg, task)
        assert finished.state is TaskState.COMPLETED, (finished.error_code, finished.error_message)
        key = object_key(task)
        assert key == f"vms/{task.id}.ova"
        ova = tmp_path / "exported.ova"
        s3.download_file(buckets[1], key, str(ova))
        assert s3.head_object(Bucket=buckets[1], Key=key)["Metadata"]["sha256"] == (
            hashlib.sha256(ova.read_bytes()).hexdigest()
        )
        # Python's tarfile: .ovf, .mf, then the disk, which qemu-img finds equal to the original
        with tarfile.open(ova) as tar:
            names = tar.getnames()
            assert [n.rsplit(".", 1)[-1] for n in names] == ["ovf", "mf", "vmdk"]
            extracted = tmp_path / "extracted.vmdk"
            member = tar.extractfile(names[2])
            assert member is not None
            extracted.write_bytes(member.read())
        compared = qemu_compare(disk, extracted, "vmdk")
        assert compared.returncode == 0, compared.stdout + compared.stderr
        # the project's OVA reader: manifest verified, firmware as the guest validation said
        with open(ova, "rb") as f:
            pkg = unpack_ova(f, tmp_path / "unpacked", config=cfg)
        try:
            assert pkg.manifest_verified and pkg.ovf.firmware == firmware
            [read_disk] = pkg.disks
            assert read_disk.capacity == disk.stat().st_size
            compared = qemu_compare(disk, read_disk.path, "vmdk")
            assert compared.returncode == 0, compared.stdout + compared.stderr
        finally:
            pkg.remove()
        assert finished.result["exported"]["firmware"] == firmware
        assert finished.result["exported"]["provenance"]["firmware"] == firmware
        # nothing left in scratch
        assert not list((tmp_path / "state").rglob("*.vmdk"))
    finally:
        imports.store.close()


def test_the_ova_container_takes_only_vmdk_disks(imported: dict[str, Any], buckets: tuple[str, str]) -> None:
    exports = ExportService(imported["cfg"], imported["store"])
    with pytest.raises(ImagingError) as exc:
        exports.export_image(
            imported["image_id"], disk_image_format="RAW", container_format="ova", bucket=buckets[1]
        )
    assert exc.value.code == "InvalidParameterValue"


@pytest.mark.parametrize(("disk_format", "qemu_format"), [("VMDK", "vmdk"), ("VHD", "vpc")])
def test_vmdk_and_vhd_exports_of_a_stored_file_stream_with_no_scratch_reserved(
    imported: dict[str, Any],
    buckets: tuple[str, str],
    moto: MotoServer,
    tmp_path: Path,
    disk_format: str,
    qemu_format: str,
) -> None:
    # scratch smaller than the 25 MiB disk: the stream-VMDK writer and the VHD writer read the stored
    # image and upload as they write, so the export needs none (a scratch copy of the output would not fit)
    cfg = imported["cfg"]
    small = dataclasses.replace(cfg, scratch=dataclasses.replace(cfg.scratch, quota=4 * MiB))
    exports = ExportService(small, imported["store"])
    task = exports.export_image(imported["image_id"], disk_image_format=disk_format, bucket=buckets[1])
    done = run(small, task)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    exported = tmp_path / f"exported.{qemu_format}"
    moto.client("s3").download_file(buckets[1], object_key(task), str(exported))
    compared = qemu_compare(imported["disk"], exported, qemu_format)
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_a_cancel_while_the_store_sends_nothing_of_the_stored_image_ends_the_export_without_waiting(
    tmp_path: Path, moto: MotoServer, buckets: tuple[str, str]
) -> None:
    # the image is stored in S3 (the s3 image target) and its download into scratch held half-way by the
    # proxy for as long as the test wants (a store that stopped sending): the cancel must end the export
    # while the download is still held, not once the read times out (a suspend has seconds of grace)
    images = f"{buckets[0]}-images"
    moto.client("s3").create_bucket(Bucket=images)
    with StallingProxy(moto.endpoint) as proxy:
        target = {"type": "s3", "bucket": images, "endpoint_url": proxy.endpoint, "region": "us-east-1"}
        data = cfg_data(tmp_path, proxy.endpoint) | {
            "targets": {"image": target | {"access_key": "testing", "secret_key": "testing"}}
        }
        cfg = stores.config(data, base_dir=tmp_path)
        disk = guestfactory.linux_disk(tmp_path)
        moto.client("s3").upload_file(str(disk), buckets[0], "disk.raw")
        imports = ImportService(cfg)
        try:
            done = run(
                cfg, imports.import_image([DiskContainer(format="RAW", bucket=buckets[0], key="disk.raw")])
            )
            assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
            location = outcome(done)["location"]
            held = f"/{images}/{location['key']}"
            proxy.arm(held, after=disk.stat().st_size // 2)
            exports = ExportService(cfg, imports.store)
            task = exports.export_image("ami-" + done.id[-17:], disk_image_format="RAW", bucket=buckets[1])
            running = Running(cfg, task)
            wait_until(lambda: proxy.stalled_on(held) == 1, what="the download to be held")
            exports.cancel(task.id)
            ended = running.ended(timeout=30)
            assert ended.state is TaskState.CANCELLED, ended
            # the step stopped by itself (the engine abandons a step still running after its grace)
            assert not abandoned_steps(imports.store, task.id)
            assert not list((tmp_path / "state").rglob("export-source.raw"))  # the partial download
            s3 = moto.client("s3")
            assert s3.list_objects_v2(Bucket=buckets[1]).get("KeyCount") == 0
            assert s3.list_multipart_uploads(Bucket=buckets[1]).get("Uploads", []) == []
        finally:
            proxy.release()
            imports.store.close()
