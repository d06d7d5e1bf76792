"""A streamed ImportSnapshot into the S3 image target whose task process is killed mid-stream resumes from
its multipart upload (``image.stream``, :mod:`appliance.steps.s3_checkpoint`) instead of from zero.

Real parts: the moto S3 server (the source bucket read through :class:`~tests.stallproxy.StallingProxy`,
which holds the download at a chosen offset and counts every byte it serves; the image bucket written
directly), the real worker and its task child (killed with SIGKILL by its PID while the worker lives on:
the worker takes the orphaned task over), the confined decoder child, qemu-img (making the images and
comparing the stored object with the source). Settings: 1 MiB ranges, 2 in flight, a checkpoint every
MiB of source, 5 MiB parts. An image part S3 does not answer is held by a second stall proxy in front of
the image target's moto server (the request reaches the server, late, when the test releases it).
"""

from __future__ import annotations

import functools
import json
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
from appliance.targets.chunkdigest import digest_file
from tests import imagefactory as imgs
from tests import processes
from tests.appliance.service.test_import_recovery import Appliance
from tests.appliance.steps.test_image_stream_resume import (
    events,
    kill_task_child,
    sha256_of,
    stream_checkpoint,
)
from tests.euca_upload import random_file
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: the download is held inside the range [40, 41) MiB: the reader hands over 40 MiB, no more
HOLD = 40 * MiB + MiB // 2
PART = 5 * MiB
wait_until = functools.partial(processes.wait_until, timeout=180.0, interval=0.1)
TERMINAL = (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


def _bucket(moto: MotoServer, request: pytest.FixtureRequest, prefix: str) -> str:
    name = prefix + request.node.name.replace("_", "-").replace("[", "-").replace("]", "")[-40:].lower()
    name = name.strip("-")
    moto.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    return _bucket(moto, request, "ss-")


@pytest.fixture
def images(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    return _bucket(moto, request, "si-")


@pytest.fixture
def image_proxy(moto: MotoServer) -> Iterator[StallingProxy]:
    """In front of the image target's S3 (holds the publish's requests for the publish window test)."""
    with StallingProxy(moto.endpoint) as p:
        yield p


@pytest.fixture
def app(
    tmp_path: Path, moto: MotoServer, proxy: StallingProxy, image_proxy: StallingProxy, images: str
) -> Iterator[Appliance]:
    target = {
        "type": "s3",
        "bucket": images,
        "prefix": "images/",
        "endpoint_url": image_proxy.endpoint,  # held only where a test arms it
        "region": REGION,
        "access_key": "testing",
        "secret_key": "testing",
        "addressing_style": "path",
        "part_size": "5MiB",
        "threads": 2,
    }
    made = Appliance(
        tmp_path,
        moto,
        proxy,
        sources={"range_size": "1MiB", "parallel_ranges": 2, "checkpoint_every": MiB},
        targets={"image": target},
    )
    yield made
    made.close()


def uploaded(app: Appliance, task_id: str) -> int:
    """Bytes of the parts the saved checkpoint names (0 before the first)."""
    saved = stream_checkpoint(app, task_id)
    return int(saved["upload"]["count"]) * int(saved["upload"]["part_size"]) if saved else 0


def wait_ended(app: Appliance, task_id: str) -> Task:
    wait_until(lambda: app.task(task_id).state in TERMINAL, what="the task to end")
    return app.task(task_id)


def left_in(moto: MotoServer, bucket: str) -> tuple[list[str], list[str]]:
    """(object keys, keys of incomplete multipart uploads) in ``bucket``, as S3 lists them."""
    s3 = moto.client("s3")
    objects = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    uploads = [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return objects, uploads


def same_disk(moto: MotoServer, reference: Path, fmt: str, bucket: str, key: str, tmp_path: Path) -> None:
    """The stored object is ``qemu-img compare``-identical to the source image."""
    stored = tmp_path / "stored.raw"
    moto.client("s3").download_file(bucket, key, str(stored))
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", fmt, "-F", "raw", str(reference), str(stored)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@pytest.mark.parametrize(("kind", "mib"), [("raw", 96), ("vmdk-stream", 128)])
def test_a_stream_into_s3_killed_mid_stream_resumes_its_multipart_upload_and_fetches_the_object_about_once(
    app: Appliance,
    moto: MotoServer,
    proxy: StallingProxy,
    bucket: str,
    images: str,
    tmp_path: Path,
    kind: str,
    mib: int,
) -> None:
    raw = random_file(tmp_path / "disk.raw", mib * MiB, seed=7)
    if kind == "raw":
        image, claim, fmt = raw, "RAW", "raw"
    else:
        image, claim, fmt = tmp_path / "disk.vmdk", "VMDK", "vmdk"
        imgs.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, image)
    size = image.stat().st_size
    moto.client("s3").put_object(Bucket=bucket, Key=image.name, Body=image.read_bytes())
    proxy.arm(f"/{image.name}", after=HOLD)
    task = app.service.import_snapshot(DiskContainer(format=claim, bucket=bucket, key=image.name))
    app.start_worker()
    # RAW: the 40 MiB handed over fill 8 parts of 5 MiB, all acknowledged, their boundary checkpointed;
    # stream-VMDK: the whole parts before its last boundary (its output is not part-aligned)
    least = 40 * MiB if kind == "raw" else 30 * MiB
    wait_until(
        lambda: proxy.stalled >= 1 and uploaded(app, task.id) >= least,
        what=f"the stream held at {HOLD}, {least} bytes of parts checkpointed",
    )
    before = stream_checkpoint(app, task.id)
    assert before is not None
    kill_task_child(app, task.id)
    proxy.release()
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.attempts == 2

    # it went on from the checkpoint with the same upload, and the object was fetched about once
    [resumed] = events(app, task.id, "stream.resumed")
    assert resumed["offset"] >= int(before["boundary"]["input_offset"])
    assert events(app, task.id, "stream.restarted") == []
    # the step's last checkpoint is its publish intent: the staging object it copied is one multipart
    # upload of every part (the upload the first run began, its parts checked by ListParts and continued)
    parts = -(-mib * MiB // PART)
    intent = stream_checkpoint(app, task.id)
    assert intent is not None and str(intent["staging_etag"]).endswith(f"-{parts}")
    fetched = proxy.served_by_path[f"/{bucket}/{image.name}"]  # the preflight and both runs
    assert size < fetched <= 1.1 * size, (fetched, size)

    # one image object equal to the source's conversion; no staging object, no incomplete upload
    location = outcome(done)["location"]
    assert location["bucket"] == images
    assert left_in(moto, images) == ([location["key"]], [])
    assert done.result["disk"]["streamed"]["stream"]["parts"] == parts
    same_disk(moto, image, fmt, images, location["key"], tmp_path)
    # the sha256-chunked, its state carried across the kill by the checkpoint, is the stored bytes'
    assert location["digest"]["value"] == digest_file(tmp_path / "stored.raw").hexdigest
    source = done.result["provenance"]["source"]
    assert source["size"] == size and "sha256_unknown" not in source


def held_import(
    app: Appliance, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path, *, seed: int
) -> tuple[Path, Task]:
    """A 64 MiB RAW import whose source the proxy holds at 40.5 MiB (8 parts of 5 MiB cut), not started
    (no worker yet): its source and its task."""
    raw = random_file(tmp_path / "disk.raw", 64 * MiB, seed=seed)
    moto.client("s3").put_object(Bucket=bucket, Key="disk.raw", Body=raw.read_bytes())
    proxy.arm("/disk.raw", after=HOLD)
    return raw, app.service.import_snapshot(DiskContainer(format="RAW", bucket=bucket, key="disk.raw"))


def killed_with_parts_uploaded(
    app: Appliance, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path, *, seed: int
) -> tuple[Path, Task, dict[str, Any]]:
    """A 64 MiB RAW import held at 40.5 MiB with at least 20 MiB of parts checkpointed, then its task
    process killed: the source, the task and the checkpoint it left."""
    raw, task = held_import(app, moto, proxy, bucket, tmp_path, seed=seed)
    app.start_worker()
    wait_until(
        lambda: proxy.stalled >= 1 and uploaded(app, task.id) >= 20 * MiB,
        what="the stream held at 40.5 MiB, 20 MiB of parts checkpointed",
    )
    before = stream_checkpoint(app, task.id)
    assert before is not None
    kill_task_child(app, task.id)
    return raw, task, before


def test_a_resumed_stream_whose_upload_is_gone_restarts_from_zero_and_completes(
    app: Appliance, moto: MotoServer, proxy: StallingProxy, bucket: str, images: str, tmp_path: Path
) -> None:
    raw, task, before = killed_with_parts_uploaded(app, moto, proxy, bucket, tmp_path, seed=8)
    up = before["upload"]
    # the upload is aborted behind the task's back (a lifecycle rule, an operator)
    moto.client("s3").abort_multipart_upload(Bucket=images, Key=up["key"], UploadId=up["upload_id"])
    proxy.release()
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    [restarted] = events(app, task.id, "stream.restarted")
    assert restarted["offset"] == 0 and "is gone" in restarted["reason"], restarted
    assert events(app, task.id, "stream.resumed") == []
    location = outcome(done)["location"]
    assert left_in(moto, images) == ([location["key"]], [])
    same_disk(moto, raw, "raw", images, location["key"], tmp_path)


def test_a_run_killed_between_the_publishing_copy_and_its_ledger_entry_is_adopted_by_the_next_run(
    app: Appliance,
    moto: MotoServer,
    proxy: StallingProxy,
    image_proxy: StallingProxy,
    bucket: str,
    images: str,
    tmp_path: Path,
) -> None:
    raw = random_file(tmp_path / "disk.raw", 24 * MiB, seed=9)
    size = raw.stat().st_size
    moto.client("s3").put_object(Bucket=bucket, Key="disk.raw", Body=raw.read_bytes())
    task = app.service.import_snapshot(DiskContainer(format="RAW", bucket=bucket, key="disk.raw"))
    staging = f"/{images}/images/{task.id}.raw.partial"
    app.start_worker()
    # the stream is under way (its entry already removed what an earlier run left at the staging key):
    # from now on the DELETE of the staging object is held — publish sends it right after the copy to
    # the final key and its checks, before the step's ledger entry names the image
    wait_until(lambda: uploaded(app, task.id) > 0, what="a part of the stream checkpointed")
    image_proxy.arm_object_request("DELETE", staging)
    wait_until(lambda: image_proxy.stalled_on(staging) >= 1, what="the publish's staging DELETE held")
    final = f"images/{task.id}.raw"
    assert final in objects_in(moto, images)  # copied, and no ledger entry names it yet
    assert not names_image(app, task.id, final)
    kill_task_child(app, task.id)
    image_proxy.release()
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.attempts == 2

    # the next run adopted the copy: no second stream, one image named by the ledger, nothing left over
    [adopted] = events(app, task.id, "stream.adopted")
    assert adopted["key"] == final
    assert events(app, task.id, "stream.restarted") == [] and events(app, task.id, "stream.resumed") == []
    assert proxy.served_by_path[f"/{bucket}/disk.raw"] <= 1.1 * size
    location = outcome(done)["location"]
    assert location["key"] == final and location["sha256"] == sha256_of(raw)
    assert left_in(moto, images) == ([final], [])
    assert names_image(app, task.id, final)
    same_disk(moto, raw, "raw", images, final, tmp_path)


def objects_in(moto: MotoServer, bucket: str) -> list[str]:
    return left_in(moto, bucket)[0]


def names_image(app: Appliance, task_id: str, key: str) -> bool:
    """Whether the task's ledger names the published image at ``key`` (its location, as JSON)."""
    return any(f'"key": "{key}"' in e.resource and e.action == "created" for e in app.store.ledger(task_id))


def test_a_stream_into_s3_suspended_by_a_worker_shutdown_keeps_its_upload_and_resumes_after_a_restart(
    app: Appliance, moto: MotoServer, proxy: StallingProxy, bucket: str, images: str, tmp_path: Path
) -> None:
    raw, task = held_import(app, moto, proxy, bucket, tmp_path, seed=10)
    size = raw.stat().st_size
    worker = app.start_worker()
    wait_until(
        lambda: proxy.stalled >= 1 and uploaded(app, task.id) >= 40 * MiB,
        what="the stream held at 40.5 MiB, 8 parts checkpointed",
    )
    worker.send_signal(signal.SIGTERM)  # the documented suspend (a reboot): the task is released
    assert worker.wait() == 0
    suspended = app.task(task.id)
    assert suspended.state is TaskState.RUNNING and suspended.owner is None
    staging = f"images/{task.id}.raw.partial"
    assert left_in(moto, images) == ([], [staging])  # the upload is kept for the resume, not aborted
    proxy.release()
    app.start_worker()
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    [resumed] = events(app, task.id, "stream.resumed")
    assert resumed["offset"] >= 40 * MiB - MiB
    assert events(app, task.id, "stream.restarted") == []
    assert proxy.served_by_path[f"/{bucket}/disk.raw"] <= 1.1 * size
    location = outcome(done)["location"]
    assert left_in(moto, images) == ([location["key"]], [])
    same_disk(moto, raw, "raw", images, location["key"], tmp_path)


def test_the_checkpoint_of_a_stream_into_s3_does_not_grow_with_the_parts_it_has_uploaded(
    app: Appliance,
    moto: MotoServer,
    proxy: StallingProxy,
    image_proxy: StallingProxy,
    bucket: str,
    images: str,
    tmp_path: Path,
) -> None:
    raw, task = held_import(app, moto, proxy, bucket, tmp_path, seed=11)  # 8 parts of 5 MiB at most
    image_proxy.arm_request("PUT", "partNumber=3")  # part 3's upload held: the acknowledged run is 1..2
    app.start_worker()
    wait_until(
        lambda: image_proxy.stalled_on("partNumber=3") >= 1 and uploaded(app, task.id) == 2 * PART,
        what="part 3 held, parts 1..2 checkpointed",
    )
    two = stream_checkpoint(app, task.id)
    image_proxy.release("partNumber=3")
    wait_until(
        lambda: proxy.stalled >= 1 and uploaded(app, task.id) == 8 * PART,
        what="the stream held at 40.5 MiB, parts 1..8 checkpointed",
    )
    eight = stream_checkpoint(app, task.id)
    assert two is not None and eight is not None
    assert (two["upload"]["count"], eight["upload"]["count"]) == (2, 8)
    # the parts are not in it (ListParts gives them on resume): the same size, bar the digits of numbers
    # (one part's record in a checkpoint listing every part took about 60 bytes)
    sizes = [len(json.dumps(saved, sort_keys=True)) for saved in (two, eight)]
    assert abs(sizes[1] - sizes[0]) <= 8, sizes
    assert set(eight["upload"]) == set(two["upload"]) and "parts" not in eight["upload"]
    proxy.release()
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    same_disk(moto, raw, "raw", images, outcome(done)["location"]["key"], tmp_path)


def test_a_resumed_stream_whose_upload_has_a_part_uploaded_again_restarts_from_zero(
    app: Appliance, moto: MotoServer, proxy: StallingProxy, bucket: str, images: str, tmp_path: Path
) -> None:
    raw, task, before = killed_with_parts_uploaded(app, moto, proxy, bucket, tmp_path, seed=12)
    up = before["upload"]
    # part 2 uploaded again behind the task's back, with other bytes of the same size: the ETag list
    # S3 now answers is not the recorded one
    moto.client("s3").upload_part(
        Bucket=images, Key=up["key"], UploadId=up["upload_id"], PartNumber=2, Body=os.urandom(PART)
    )
    proxy.release()
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    [restarted] = events(app, task.id, "stream.restarted")
    assert restarted["offset"] == 0 and "uploaded again since" in restarted["reason"], restarted
    assert events(app, task.id, "stream.resumed") == []
    location = outcome(done)["location"]
    assert left_in(moto, images) == ([location["key"]], [])
    same_disk(moto, raw, "raw", images, location["key"], tmp_path)
    # the image's sha256-chunked is that of the bytes stored (the file image target's definition)
    stored = tmp_path / "stored.raw"
    assert location["digest"]["value"] == digest_file(stored).hexdigest


def test_a_stream_into_s3_suspended_while_s3_does_not_answer_a_part_stops_within_the_grace_and_resumes(
    app: Appliance,
    moto: MotoServer,
    proxy: StallingProxy,
    image_proxy: StallingProxy,
    bucket: str,
    images: str,
    tmp_path: Path,
) -> None:
    raw, task = held_import(app, moto, proxy, bucket, tmp_path, seed=13)  # parts 1..8 cut
    held = image_proxy.arm_request("PUT", "partNumber=8")  # S3 does not answer part 8
    worker = app.start_worker()
    wait_until(
        lambda: image_proxy.stalled_on(held) == 1 and uploaded(app, task.id) == 7 * PART,
        what="part 8 held, parts 1..7 checkpointed",
    )
    worker.send_signal(signal.SIGTERM)  # the documented suspend: the upload is kept for the resume
    assert worker.wait() == 0
    log = (app.logs / "worker-0.log").read_text()
    assert "did not stop within" not in log, log  # suspended with part 8 unanswered, not killed
    assert events(app, task.id, "step.abandoned") == []
    suspended = app.task(task.id)
    assert suspended.state is TaskState.RUNNING and suspended.owner is None
    assert image_proxy.stalled_on(held) == 1
    # the next run sends part 8 again while the suspended run's part 8 is still in S3's hands: both
    # land when S3 answers again, in either order (the same bytes: the same part)
    proxy.release()
    app.start_worker()
    wait_until(lambda: image_proxy.stalled_on(held) == 2, what="the next run's part 8 held too")
    image_proxy.release(held)
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    [resumed] = events(app, task.id, "stream.resumed")
    assert resumed["offset"] >= 7 * PART - MiB  # at the checkpoint of parts 1..7
    assert events(app, task.id, "stream.restarted") == []
    location = outcome(done)["location"]
    assert left_in(moto, images) == ([location["key"]], [])
    same_disk(moto, raw, "raw", images, location["key"], tmp_path)
    assert location["sha256"] == sha256_of(raw)


def test_a_resumed_stream_whose_complete_s3_refuses_for_a_part_landed_late_streams_again_from_zero(
    app: Appliance,
    moto: MotoServer,
    proxy: StallingProxy,
    image_proxy: StallingProxy,
    bucket: str,
    images: str,
    tmp_path: Path,
) -> None:
    raw, task, before = killed_with_parts_uploaded(app, moto, proxy, bucket, tmp_path, seed=14)
    up = before["upload"]
    # the next run (the worker takes the task over) resumes that upload; its Complete is held
    complete = image_proxy.arm_request("POST", f"uploadId={up['upload_id']}")
    proxy.release()
    wait_until(lambda: image_proxy.stalled_on(complete) == 1, what="the resumed run's Complete held")
    # part 12, which the resumed run sent, is replaced now: the stand-in for a part of the killed run
    # that lands late with another ETag (under SSE-KMS an ETag is not the MD5: the same bytes differ)
    moto.client("s3").upload_part(
        Bucket=images, Key=up["key"], UploadId=up["upload_id"], PartNumber=12, Body=os.urandom(PART)
    )
    image_proxy.release(complete)
    done = wait_ended(app, task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert len(events(app, task.id, "stream.resumed")) == 1
    [restarted] = events(app, task.id, "stream.restarted")
    assert restarted["offset"] == 0 and "no longer the one this run uploaded" in restarted["reason"]
    location = outcome(done)["location"]
    assert left_in(moto, images) == ([location["key"]], [])
    same_disk(moto, raw, "raw", images, location["key"], tmp_path)
    assert location["sha256"] == sha256_of(raw)
