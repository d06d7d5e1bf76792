"""The worker's sweep of the S3 staging uploads (``<key>.partial``) that killed streamed imports left
(:func:`appliance.service.sweeps.sweep_s3_staging`): at start-up it aborts the incomplete uploads and
deletes the staging objects of tasks that are over, and the image a publish copied before its ledger
entry for a task that did not complete — and keeps everything of a task another appliance of the fleet
holds a live lease on, everything of a completed task's image, and every key no ledger names.

Real parts: the moto S3 server, the task store, the worker process (started once the leftovers are in
place; the test waits for the sweep's ledger entries).
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.service.sweeps import sweep_s3_staging
from appliance.store import TaskState
from appliance.targets.s3staged import PUBLISH_KIND, STAGING_ETAG
from tests import processes
from tests.appliance.service.test_import_recovery import Appliance
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

wait_until = functools.partial(processes.wait_until, timeout=60.0, interval=0.1)
OTHER = "other-appliance.example:4242"  # a fleet member's worker: a lease this host cannot check


@pytest.fixture
def images(moto: MotoServer) -> str:
    name = f"sw-{uuid.uuid4().hex[:16]}"  # the moto server lives for the session: a bucket per test
    moto.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def app(tmp_path: Path, moto: MotoServer, images: str) -> Iterator[Appliance]:
    target = {
        "type": "s3",
        "bucket": images,
        "prefix": "images/",
        "endpoint_url": moto.endpoint,
        "region": REGION,
        "access_key": "testing",
        "secret_key": "testing",
        "addressing_style": "path",
    }
    with StallingProxy(moto.endpoint) as proxy:
        made = Appliance(tmp_path, moto, proxy, targets={"image": target})
        yield made
        made.close()


def staging_upload(moto: MotoServer, bucket: str, key: str) -> str:
    """An incomplete multipart upload with one part at ``key`` (what a killed stream leaves)."""
    s3 = moto.client("s3")
    upload_id = str(s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * 1024)
    return upload_id


def uploads(moto: MotoServer, bucket: str) -> set[str]:
    listed = moto.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return {u["Key"] for u in listed}


def objects(moto: MotoServer, bucket: str) -> set[str]:
    return {o["Key"] for o in moto.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])}


def task_with_staging(app: Appliance, moto: MotoServer, bucket: str, *, staging_object: bool = False) -> Any:
    """A task leased by another appliance whose stream step began a staging upload (ledgered)."""
    task = app.store.create_task("import-snapshot")
    claimed = app.store.claim(task.id, OTHER, 300)
    key = f"images/{task.id}.raw.partial"
    app.store.add_ledger(task.id, "created", f"s3://{bucket}/{key}", step="stream")
    staging_upload(moto, bucket, key)
    if staging_object:
        moto.client("s3").put_object(Bucket=bucket, Key=key, Body=b"staged")
    return claimed


def interrupted_publish(app: Appliance, moto: MotoServer, bucket: str, task: Any, *, copied: bool) -> str:
    """The publish checkpoint of ``task``'s stream step and (``copied``) the final object its copy
    made, which no ledger names."""
    key = f"images/{task.id}.raw"
    body = b"published disk"
    sha = "ab" * 32
    app.store.save_checkpoint(
        task.id,
        "3",
        {
            "kind": PUBLISH_KIND,
            "bucket": bucket,
            "key": key,
            "staging_key": key + ".partial",
            "staging_etag": "0123456789abcdef0123456789abcdef",
            "sha256": sha,
            "size": len(body),
            "facts": {},
        },
        owner=task.lease.owner,
        epoch=task.lease.epoch,
    )
    if copied:
        meta = {"sha256": sha, STAGING_ETAG: "0123456789abcdef0123456789abcdef"}
        moto.client("s3").put_object(Bucket=bucket, Key=key, Body=body, Metadata=meta)
    return key


def recovered(app: Appliance, task_id: str) -> list[str]:
    return [e.resource for e in app.store.ledger(task_id) if e.step == "recovery" and e.action == "removed"]


def test_the_worker_start_sweeps_staging_uploads_of_tasks_that_are_over_and_keeps_the_others(
    app: Appliance, moto: MotoServer, images: str
) -> None:
    # over: failed after its publish copied the image (no ledger entry names it), and completed
    failed = task_with_staging(app, moto, images, staging_object=True)
    failed_key = interrupted_publish(app, moto, images, failed, copied=True)
    app.store.set_state(failed.id, TaskState.FAILED, lease=failed.lease, error_code="X", error_message="x")
    done = task_with_staging(app, moto, images)
    done_key = interrupted_publish(app, moto, images, done, copied=True)  # a completed task's image
    app.store.set_state(done.id, TaskState.COMPLETED, lease=done.lease, result={})
    # kept: running under another appliance's live lease; a key no ledger names; another bucket's key
    running = task_with_staging(app, moto, images)
    foreign = "images/users-own.raw.partial"
    staging_upload(moto, images, foreign)
    app.store.add_ledger(running.id, "created", "s3://someone-elses-bucket/images/x.raw.partial", "stream")

    app.start_worker()
    wait_until(lambda: recovered(app, done.id) and recovered(app, failed.id), what="the start-up sweep")

    assert uploads(moto, images) == {f"images/{running.id}.raw.partial", foreign}
    # the failed task's staging object and its unledgered image are gone; the completed one's image stays
    assert objects(moto, images) == {done_key}
    assert sorted(recovered(app, failed.id)) == sorted(
        [f"s3://{images}/{failed_key}", f"s3://{images}/{failed_key}.partial"]
    )
    assert recovered(app, done.id) == [f"s3://{images}/{done_key}.partial"]
    assert recovered(app, running.id) == []


def test_the_sweep_keeps_the_upload_of_a_task_that_may_still_resume_and_takes_it_once_the_task_is_over(
    app: Appliance, moto: MotoServer, images: str
) -> None:
    task = task_with_staging(app, moto, images)
    key = interrupted_publish(app, moto, images, task, copied=True)
    assert sweep_s3_staging(app.config, app.store) == []  # running (another appliance's lease)
    assert uploads(moto, images) == {key + ".partial"} and objects(moto, images) == {key}

    app.store.set_state(task.id, TaskState.CANCELLING, lease=task.lease)
    assert sweep_s3_staging(app.config, app.store) == []  # cancelling: not over yet
    app.store.set_state(task.id, TaskState.CANCELLED, lease=task.lease)
    swept = sweep_s3_staging(app.config, app.store)
    assert sorted(swept) == sorted([f"s3://{images}/{key}", f"s3://{images}/{key}.partial"])
    assert uploads(moto, images) == set() and objects(moto, images) == set()
    assert sweep_s3_staging(app.config, app.store) == []  # settled in the ledger: once


def test_the_sweep_leaves_an_image_the_tasks_ledger_names_to_the_steps_undo(
    app: Appliance, moto: MotoServer, images: str
) -> None:
    task = task_with_staging(app, moto, images)
    key = interrupted_publish(app, moto, images, task, copied=True)
    location = json.dumps({"type": "s3", "bucket": images, "key": key}, sort_keys=True)
    app.store.add_ledger(task.id, "created", location, step="stream")  # the publish finished
    app.store.set_state(task.id, TaskState.FAILED, lease=task.lease, error_code="X", error_message="x")
    assert sweep_s3_staging(app.config, app.store) == [f"s3://{images}/{key}.partial"]
    assert objects(moto, images) == {key} and uploads(moto, images) == set()
