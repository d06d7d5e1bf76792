"""A resumable staged upload (:class:`appliance.targets.s3staged.StagedImage`) suspended while S3 does not
answer one of its parts: the run keeps its upload for the task's next run without waiting for that part,
and the next run completes the object, whether the suspended run's part lands before, after or never.

The moto server process is S3. Its silence is stood in, as in the cancel tests, behind the client
interface: by :class:`~tests.stallproxy.StallingProxy` in front of it (the part's request held before it
reaches the server, forwarded when the test releases it), or by :class:`LateLandingS3`, the moto server's
client holding one part and sending it, as S3 would store it, only when the test says so.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import uuid
from typing import Any

import pytest

from appliance.errors import Cancelled
from appliance.sources.savedhash import available
from appliance.targets.s3 import S3ImageTarget
from appliance.targets.s3resume import PartReplaced, ResumedUpload, verify_parts
from appliance.targets.s3staged import StagedImage
from tests.appliance.targets.test_s3 import open_uploads, settings
from tests.processes import wait_until
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.skipif(not available(), reason="a resumable upload needs libcrypto's saved hashes")

MiB = 1 << 20
TASK = "import-snap-0123456789abcdef7"
#: 23 MiB: parts 1-4 of 5 MiB and a last one of 3 MiB
DATA_SIZE = 23 * MiB


@pytest.fixture
def bucket(moto) -> str:
    name = f"kept-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


def suspended_run(
    target: S3ImageTarget, data: bytes, is_held: Any
) -> tuple[threading.Thread, list[BaseException], ResumedUpload, threading.Event]:
    """A run writing ``data`` into its staging upload in a thread of its own, up to the point where part 3
    is held (``is_held``) and parts 1-2 are acknowledged: the thread, the errors it ends with, the
    checkpoint its step would have saved (parts 1-2) and the cancel that suspends it."""
    cancel = threading.Event()
    staging = StagedImage(target, TASK, expected_size=len(data), cancel=cancel, keep_on_cancel=lambda: True)
    errors: list[BaseException] = []
    entered = threading.Event()

    def run() -> None:
        try:
            with staging as staged:
                entered.set()
                assert staged.writer is not None
                staged.writer.write(data)
                staged.complete()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert entered.wait(60)
    writer = staging.writer
    assert writer is not None and writer.resumable
    wait_until(
        lambda: is_held() and getattr(writer.uploaded_prefix(), "count", 0) == 2,
        what="part 3 held, parts 1-2 acknowledged",
    )
    saved = writer.uploaded_prefix()
    assert saved is not None and saved.size == 10 * MiB
    return thread, errors, saved, cancel


def suspend(thread: threading.Thread, errors: list[BaseException], cancel: threading.Event) -> None:
    """Suspend the run (what the worker's SIGTERM does to the task): it must stop at once."""
    cancel.set()
    wait_until(lambda: not thread.is_alive(), timeout=30, what="the suspended run to stop")
    assert [type(e) for e in errors] == [Cancelled]


def test_a_suspend_while_s3_does_not_answer_a_part_keeps_the_upload_at_once_and_the_next_run_completes_it(
    moto, bucket: str
) -> None:
    data = os.urandom(DATA_SIZE)
    with StallingProxy(moto.endpoint) as proxy:
        held = proxy.arm_request("PUT", "partNumber=3")
        silent = S3ImageTarget.from_settings(settings(moto, bucket, endpoint_url=proxy.endpoint))
        thread, errors, saved, cancel = suspended_run(silent, data, lambda: proxy.stalled_on(held) == 1)
        suspend(thread, errors, cancel)
        # stopped while part 3 is still unanswered, its upload kept for the next run
        assert proxy.stalled_on(held) == 1
        staging_key = silent.key_for(TASK, "raw") + ".partial"
        assert [u["Key"] for u in open_uploads(moto, bucket)] == [staging_key]

        part_threads = [t for t in threading.enumerate() if t.name.startswith("s3-part")]
        assert part_threads and all(t.daemon for t in part_threads)  # they do not hold the process
        # the task's next run (S3 answering again) continues from the checkpoint: parts 3-5 and Complete
        target = S3ImageTarget.from_settings(settings(moto, bucket))
        upload, why = verify_parts(target.client, bucket, staging_key, saved)
        assert why is None and upload is not None
        with StagedImage(target, TASK, expected_size=len(data), resume=upload) as staged:
            assert staged.writer is not None
            staged.writer.write(data[saved.size :])
            written = staged.complete()
        assert written["sha256"] == hashlib.sha256(data).hexdigest() and written["parts"] == 5
        # the suspended run's part 3 reaches S3 only now: the upload is complete, nothing changes
        proxy.release(held)
        wait_until(
            lambda: not any(t.is_alive() for t in part_threads), what="the suspended run's part to end"
        )
    assert moto.client("s3").get_object(Bucket=bucket, Key=staging_key)["Body"].read() == data
    assert open_uploads(moto, bucket) == []


class LateLandingS3:
    """The moto server's client, but part 3 is held until ``land`` is set and then sent to the server,
    as S3 stores a part whose request it received before the run that sent it stopped (``other``: with
    other bytes, the stand-in for a part whose ETag is not the one the next run recorded, as under
    SSE-KMS, where S3's ETag of a part is not its MD5); ``landed`` once the server stored it."""

    def __init__(self, client: Any, *, other: bool) -> None:
        self.client, self.other = client, other
        self.held, self.land, self.landed = threading.Event(), threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def upload_part(self, **kw: Any) -> dict[str, Any]:
        if kw["PartNumber"] != 3:
            return self.client.upload_part(**kw)
        self.held.set()
        self.land.wait(120)
        if self.other:
            kw["Body"] = os.urandom(len(kw["Body"]))
            kw["ContentMD5"] = base64.b64encode(hashlib.md5(kw["Body"]).digest()).decode()
        try:
            return self.client.upload_part(**kw)
        finally:
            self.landed.set()


@pytest.mark.parametrize("late", ["the same part", "another etag"])
def test_a_part_of_the_suspended_run_landing_after_the_next_run_sent_it_again_never_corrupts_the_object(
    moto, bucket: str, late: str
) -> None:
    data = os.urandom(DATA_SIZE)
    suspended = S3ImageTarget.from_settings(settings(moto, bucket))
    client = LateLandingS3(suspended.client, other=late == "another etag")
    suspended._client = client  # the run's S3 as the target's client (created on first use otherwise)
    thread, errors, saved, cancel = suspended_run(suspended, data, client.held.is_set)
    suspend(thread, errors, cancel)
    assert not client.landed.is_set()

    target = S3ImageTarget.from_settings(settings(moto, bucket))
    staging_key = target.key_for(TASK, "raw") + ".partial"
    upload, why = verify_parts(target.client, bucket, staging_key, saved)
    assert why is None and upload is not None
    staging = StagedImage(target, TASK, expected_size=len(data), resume=upload)
    if late == "the same part":
        with staging as staged:
            w = staged.writer
            assert w is not None
            w.write(data[saved.size :])
            wait_until(lambda: getattr(w.uploaded_prefix(), "count", 0) >= 3, what="part 3 sent again")
            client.land.set()  # the suspended run's part 3 lands over the one this run sent
            assert client.landed.wait(60)
            written = staged.complete()
        # the same bytes, so the same ETag: S3 completes the upload with the object's own bytes
        assert written["sha256"] == hashlib.sha256(data).hexdigest()
        assert moto.client("s3").get_object(Bucket=bucket, Key=staging_key)["Body"].read() == data
    else:
        with pytest.raises(PartReplaced) as refused, staging as staged:
            w = staged.writer
            assert w is not None
            w.write(data[saved.size :])
            wait_until(lambda: getattr(w.uploaded_prefix(), "count", 0) >= 3, what="part 3 sent again")
            client.land.set()
            assert client.landed.wait(60)
            staged.complete()
        # S3 refuses to complete with a part whose ETag is not the recorded one: a coded error, and the
        # upload is aborted (the step streams again into a new one), no object ever made
        assert refused.value.code == "UploadFailed" and "no longer the one" in refused.value.message
        assert moto.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert open_uploads(moto, bucket) == []
