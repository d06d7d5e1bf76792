"""A streamed ImportSnapshot whose task process is killed mid-stream resumes from its checkpoint in the
task store instead of from zero (``image.stream``, :mod:`appliance.steps.stream_checkpoint`).

Real parts: the moto S3 server behind :class:`~tests.stallproxy.StallingProxy` (which holds the download
at a chosen offset and counts every byte it serves), the real worker and its task child (killed with
SIGKILL by its PID while the worker lives on: the worker takes the orphaned task over), the confined
decoder child, qemu-img (making the images and comparing the stored disk with its conversion).
Settings: 1 MiB ranges, 2 in flight, a checkpoint every MiB of source.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.service.importtasks import DiskContainer
from appliance.service.importviews import outcome
from appliance.store import Task, TaskState
from tests import imagefactory as imgs
from tests import processes
from tests.appliance.service.test_import_recovery import Appliance
from tests.euca_upload import random_file
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: the download is held inside the range [40, 41) MiB: the reader hands over 40 MiB, no more
HOLD = 40 * MiB + MiB // 2
SETTINGS = {"sources": {"range_size": "1MiB", "parallel_ranges": 2, "checkpoint_every": MiB}}
wait_until = functools.partial(processes.wait_until, timeout=120.0, interval=0.1)
TERMINAL = (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


@pytest.fixture
def app(tmp_path: Path, moto: MotoServer, proxy: StallingProxy) -> Iterator[Appliance]:
    made = Appliance(tmp_path, moto, proxy, **SETTINGS)
    yield made
    made.close()


def stream_checkpoint(app: Appliance, task_id: str) -> dict[str, Any] | None:
    """The stream step's checkpoint in the task store (None before the first)."""
    steps = [r.idx for r in app.store.step_results(task_id) if r.name == "stream"]
    return app.store.load_checkpoint(task_id, steps[0]) if steps else None


def checkpointed(app: Appliance, task_id: str) -> int:
    saved = stream_checkpoint(app, task_id)
    return int(saved["boundary"]["input_offset"]) if saved else 0


def kill_task_child(app: Appliance, task_id: str) -> None:
    """kill -9 of the task's process (by the PID its lease names); the worker lives on and takes the
    orphaned task over."""
    owner = app.task(task_id).owner
    assert owner is not None
    os.kill(int(owner.rpartition(":")[2]), signal.SIGKILL)


def wait_ended(app: Appliance, task_id: str) -> Task:
    wait_until(lambda: app.task(task_id).state in TERMINAL, what="the task to end")
    return app.task(task_id)


def events(app: Appliance, task_id: str, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in app.store.events(task_id=task_id, limit=100_000) if e.kind == kind]


def same_disk(reference: Path, fmt: str, stored: Path) -> None:
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", fmt, "-F", "raw", str(reference), str(stored)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_path(done: Task) -> Path:
    return Path(outcome(done)["location"]["path"])


def only_the_image(app: Appliance, done: Task) -> None:
    """The image directory holds the published image and no partial."""
    assert [p.name for p in (app.state / "images").iterdir()] == [stored_path(done).name]


def upload_in_parts(moto: MotoServer, bucket: str, image: Path) -> None:
    """A multipart upload (as boto3's upload_file makes one above 8 MiB): its ETag is no MD5."""
    s3 = moto.client("s3")
    data, part = image.read_bytes(), 16 * MiB
    upload = s3.create_multipart_upload(Bucket=bucket, Key=image.name)["UploadId"]
    parts = []
    for number, at in enumerate(range(0, len(data), part), start=1):
        done = s3.upload_part(
            Bucket=bucket, Key=image.name, UploadId=upload, PartNumber=number, Body=data[at : at + part]
        )
        parts.append({"PartNumber": number, "ETag": done["ETag"]})
    s3.complete_multipart_upload(
        Bucket=bucket, Key=image.name, UploadId=upload, MultipartUpload={"Parts": parts}
    )


@pytest.mark.parametrize(
    ("kind", "mib", "upload"),
    [("raw", 96, "single"), ("vmdk-stream", 128, "single"), ("raw", 96, "multipart")],
)
def test_a_stream_killed_mid_stream_resumes_from_its_checkpoint_and_fetches_the_object_about_once(
    app: Appliance,
    moto: MotoServer,
    proxy: StallingProxy,
    bucket: str,
    tmp_path: Path,
    kind: str,
    mib: int,
    upload: str,
) -> None:
    raw = random_file(tmp_path / "disk.raw", mib * MiB, seed=3)
    if kind == "raw":
        image, claim, fmt = raw, "RAW", "raw"
    else:
        image, claim, fmt = tmp_path / "disk.vmdk", "VMDK", "vmdk"
        imgs.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, image)
    size = image.stat().st_size
    if upload == "single":
        # one PUT: its ETag is the object's MD5, which the resumed run still checks (a carried digest)
        moto.client("s3").put_object(Bucket=bucket, Key=image.name, Body=image.read_bytes())
    else:
        upload_in_parts(moto, bucket, image)
    proxy.arm(f"/{image.name}", after=HOLD)
    task = app.service.import_snapshot(DiskContainer(format=claim, bucket=bucket, key=image.name))
    app.start_worker()
    # RAW: the decoder's 4 MiB reads end at 40 MiB, all it was handed; stream-VMDK: its last grains
    # written before the held range (the ones still inflating are not before its boundary)
    least = 40 * MiB if kind == "raw" else 30 * MiB
    wait_until(
        lambda: proxy.stalled >= 1 and checkpointed(app, task.id) >= least,
        what=f"the stream held at {HOLD}, checkpointed at {least} or later",
    )
    kill_task_child(app, task.id)
    proxy.release()
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.attempts == 2
    saved = stream_checkpoint(app, task.id)
    assert saved is not None

    # it went on from the checkpoint: said so, and the object was fetched about once
    [resumed] = events(app, task.id, "stream.resumed")
    assert least <= resumed["offset"] <= HOLD
    assert resumed["message"].startswith(f"resumed at source byte {resumed['offset']} of {size}")
    assert events(app, task.id, "stream.restarted") == []
    fetched = proxy.served_by_path[f"/{bucket}/{image.name}"]  # the preflight and both runs
    assert size < fetched <= 1.1 * size, (fetched, size)

    # the disk is the source's, and the provenance's source digest is the whole object's
    same_disk(image, fmt, stored_path(done))
    source = done.result["provenance"]["source"]
    assert (source["sha256"], source["size"]) == (sha256_of(image), size)
    assert "sha256_unknown" not in source
    etag_md5 = {"what": "etag-md5", "value": hashlib.md5(image.read_bytes()).hexdigest(), "verified": True}
    if upload == "single":
        assert etag_md5 in source["checked"]
        # the checkpoint carried the MD5 across the kill, for the ETag check at the end
        assert set(saved["digests"]) == {"sha256", "md5"}
    else:
        # a multipart ETag is no MD5: the source is not hashed with MD5 at all (it costs about half
        # sha256's speed), and its checkpoints carry the sha256 alone, which the resumed run went on from
        assert [c for c in source.get("checked", []) if c["what"] == "etag-md5"] == []
        assert set(saved["digests"]) == {"sha256"}
    only_the_image(app, done)


def test_a_gzip_stream_killed_mid_stream_decodes_again_from_zero_and_completes(
    app: Appliance, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    raw = random_file(tmp_path / "disk.raw", 64 * MiB, seed=4)
    packed = tmp_path / "disk.raw.gz"
    packed.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=1))
    size = packed.stat().st_size
    moto.client("s3").upload_file(str(packed), bucket, packed.name)
    proxy.arm(f"/{packed.name}", after=HOLD)
    task = app.service.import_snapshot(DiskContainer(format="RAW", bucket=bucket, key=packed.name))
    app.start_worker()
    wait_until(
        lambda: proxy.stalled >= 1 and (app.task(task.id).bytes_done or 0) >= 30 * MiB,
        what="the gzip stream held at 40.5 MiB, decoded up to there",
    )
    kill_task_child(app, task.id)
    proxy.release()
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.attempts == 2
    # no decoder state past a compressed stream's start: nothing was checkpointed, it decoded again
    assert stream_checkpoint(app, task.id) is None
    assert events(app, task.id, "stream.resumed") == []
    fetched = proxy.served_by_path[f"/{bucket}/{packed.name}"]
    assert fetched >= size + 40 * MiB, (fetched, size)
    same_disk(raw, "raw", stored_path(done))
    assert done.result["provenance"]["source"]["sha256"] == sha256_of(packed)
    only_the_image(app, done)


def test_an_object_replaced_between_the_kill_and_the_resume_restarts_from_zero_and_imports_the_new_one(
    app: Appliance, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    old = random_file(tmp_path / "old.raw", 64 * MiB, seed=5)
    new = random_file(tmp_path / "new.raw", 48 * MiB, seed=6)
    s3 = moto.client("s3")
    s3.put_object(Bucket=bucket, Key="disk.raw", Body=old.read_bytes())
    proxy.arm("/disk.raw", after=HOLD)
    task = app.service.import_snapshot(DiskContainer(format="RAW", bucket=bucket, key="disk.raw"))
    app.start_worker()
    wait_until(
        lambda: proxy.stalled >= 1 and checkpointed(app, task.id) >= 40 * MiB,
        what="the stream held at 40.5 MiB, checkpointed at 40 MiB",
    )
    saved = stream_checkpoint(app, task.id)
    assert saved is not None
    # the worker first: a live worker would start the resume at once, and under load that resume
    # could read the old object's ETag before the new one lands, then fail Source.Changed on its
    # next range, which is right for a mid-stream replacement but not the case this test is about
    app.kill_worker_and_task(task.id)
    s3.put_object(Bucket=bucket, Key="disk.raw", Body=new.read_bytes())  # another ETag and size
    proxy.release()
    app.start_worker()
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    [restarted] = events(app, task.id, "stream.restarted")
    assert restarted["offset"] == 0
    assert "changed" in restarted["reason"], restarted
    assert events(app, task.id, "stream.resumed") == []
    same_disk(new, "raw", stored_path(done))
    source = done.result["provenance"]["source"]
    assert (source["sha256"], source["size"]) == (sha256_of(new), new.stat().st_size)
    only_the_image(app, done)
    assert not Path(saved["partial"]).exists()
