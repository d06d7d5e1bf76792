"""StagedImage against a moto server process: an image streamed to the staging key, read back in cached
ranged GETs, published by a server-side copy with its sha256; a failure inside leaves no object and no
incomplete upload, and entering removes what a killed earlier run left at the staging key."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from appliance.errors import ImagingError, LeaseLost
from appliance.sources.savedhash import available
from appliance.targets import s3resume, s3stream
from appliance.targets.chunkdigest import digest_file
from appliance.targets.s3 import S3ImageTarget
from appliance.targets.s3staged import StagedImage
from tests.appliance.targets.test_s3 import open_uploads, settings
from tests.processes import wait_until

MiB = 1 << 20


@pytest.fixture
def bucket(moto) -> str:
    name = f"staged-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


def keys(moto, bucket: str) -> list[str]:
    return [o["Key"] for o in moto.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_a_staged_image_is_read_back_then_published_with_its_sha256_and_the_staging_key_is_gone(
    moto, bucket: str
) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    data = os.urandom(3 * MiB) + bytes(5 * MiB) + os.urandom(4 * MiB)
    with StagedImage(target, "import-snap-0123456789abcdef0") as staged:
        assert staged.writer is not None
        for i in range(0, len(data), MiB):
            staged.writer.write(data[i : i + MiB])
        written = staged.complete()
        assert keys(moto, bucket) == ["images/import-snap-0123456789abcdef0.raw.partial"]
        reader = staged.reader()
        assert reader.read_at(3 * MiB - 10, 20) == data[3 * MiB - 10 : 3 * MiB + 10]
        assert reader.read_at(3 * MiB - 5, 10) == data[3 * MiB - 5 : 3 * MiB + 5]  # cached: no GET
        assert reader.read_at(len(data) - 4, 100) == data[-4:]
        assert reader.gets == 3  # blocks 2, 3 and 11
        location = staged.publish({"import-task-id": "import-snap-0123456789abcdef0"})
    sha = hashlib.sha256(data).hexdigest()
    assert written["sha256"] == location["sha256"] == sha and location["size"] == len(data)
    assert keys(moto, bucket) == ["images/import-snap-0123456789abcdef0.raw"]
    head = moto.client("s3").head_object(Bucket=bucket, Key=location["key"])
    assert head["Metadata"] == {
        "sha256": sha,
        "import-task-id": "import-snap-0123456789abcdef0",
        "staging-etag": written["etag"],  # the object it was copied from (an interrupted publish's adoption)
        # the image's sha256-chunked, as the file image target records it (64 MiB chunks: one here)
        "digest-algorithm": "sha256-chunked",
        "digest-chunk-size": str(64 * MiB),
        "digest-chunks": "1",
        "sha256-chunked": hashlib.sha256(hashlib.sha256(data).digest()).hexdigest(),
    }
    assert location["digest"]["value"] == head["Metadata"]["sha256-chunked"]
    assert open_uploads(moto, bucket) == []


def test_a_failure_inside_leaves_nothing_and_entering_removes_a_killed_runs_leftovers(
    moto, bucket: str
) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    s3 = moto.client("s3")
    staging = "images/import-snap-0123456789abcdef1.raw.partial"
    # a killed earlier run: its object and an upload still open at the staging key
    s3.put_object(Bucket=bucket, Key=staging, Body=b"old")
    s3.create_multipart_upload(Bucket=bucket, Key=staging)
    with pytest.raises(ImagingError), StagedImage(target, "import-snap-0123456789abcdef1") as staged:
        assert keys(moto, bucket) == [] and [u["Key"] for u in open_uploads(moto, bucket)] == [staging]
        assert staged.writer is not None
        staged.writer.write(os.urandom(6 * MiB))  # a part is sent
        raise ImagingError("the guest fails validation", code="Guest.NoPartitionTable")
    assert keys(moto, bucket) == [] and open_uploads(moto, bucket) == []


def test_a_run_that_lost_its_task_leaves_the_upload_of_the_run_that_took_it_over(moto, bucket: str) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    task = "import-snap-0123456789abcdef2"
    with pytest.raises(ImagingError), StagedImage(target, task) as old:
        assert old.writer is not None
        old.writer.write(os.urandom(6 * MiB))
        # the task is taken over while this run is stalled: the new run starts its own upload
        new = StagedImage(target, task).__enter__()
        assert new.writer is not None
        mine = new.writer.upload_id
        raise ImagingError("lease lost", code="Cancelled")  # the old run stops
    # the old run's exit aborted only its own upload: the new run's is still open and completes
    assert [u["UploadId"] for u in open_uploads(moto, bucket)] == [mine]
    data = os.urandom(6 * MiB)
    new.writer.write(data)
    assert new.complete()["sha256"] == hashlib.sha256(data).hexdigest()
    new.publish({})
    new.__exit__(None, None, None)
    assert keys(moto, bucket) == [f"images/{task}.raw"] and open_uploads(moto, bucket) == []


def test_publishing_copies_only_the_staging_object_that_was_checked(moto, bucket: str) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket))
    task = "import-snap-0123456789abcdef3"
    sent: list[dict[str, str]] = []

    def capture(request, **_) -> None:  # what the real client sends to the server
        headers = request.headers.items()
        sent.append({k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in headers})

    target.client.meta.events.register("before-send.s3.CopyObject", capture)
    with pytest.raises(ImagingError) as err, StagedImage(target, task) as staged:
        assert staged.writer is not None
        staged.writer.write(os.urandom(6 * MiB))
        checked = staged.complete()["etag"]
        assert staged.reader().read_at(0, 16)  # read back and checked
        # replaced between the check and the publish: those bytes were never inspected
        moto.client("s3").put_object(Bucket=bucket, Key=f"images/{task}.raw.partial", Body=b"other bytes")
        staged.publish({})
    # S3 refuses a copy whose source is no longer the checked one (the moto server ignores the
    # condition; the size check after the copy then catches this replacement)
    assert [h.get("x-amz-copy-source-if-match") for h in sent] == [f'"{checked}"']
    assert err.value.code == "UploadFailed"
    assert keys(moto, bucket) == [] and open_uploads(moto, bucket) == []


@pytest.mark.parametrize(("memory", "bound"), [("48MiB", 48 * MiB), (None, 80 * MiB)])
def test_the_part_buffers_of_a_staged_upload_stay_within_the_memory_budget_while_parts_are_slow(
    moto, bucket: str, memory: str | None, bound: int
) -> None:
    # 64 MiB parts and 4 threads held (4 + 1) x 64 = 320 MiB; the target's parts are 16 MiB by default,
    # and no more go up at once than the budget (default 128 MiB) allows: 2 (48 MiB) or 4
    given = settings(moto, bucket, threads=4) | ({"memory": memory} if memory else {})
    del given["part_size"]  # the default
    target = S3ImageTarget.from_settings(given)
    gate = threading.Event()

    def hold(**_) -> None:  # (a handler's return value would stand for S3's answer)
        gate.wait()

    target.client.meta.events.register("before-call.s3.UploadPart", hold)
    data = bytes(96 * MiB) + os.urandom(MiB)
    with StagedImage(target, "import-snap-0123456789abcdef4", expected_size=len(data)) as staged:
        w = staged.writer
        assert w is not None and w.part_size == 16 * MiB

        def write() -> None:
            for i in range(0, len(data), 4 * MiB):
                w.write(data[i : i + 4 * MiB])

        writer = threading.Thread(target=write)
        writer.start()
        # no part is answered: the writer fills the parts it may have in flight, cuts one more and waits
        wait_until(lambda: w.buffered >= bound, what=f"{bound} bytes of parts buffered")
        assert writer.is_alive() and w.buffered == bound
        gate.set()
        writer.join()
        written = staged.complete()
    assert w.peak_buffered == bound <= target.memory
    assert written["sha256"] == hashlib.sha256(data).hexdigest() and written["parts"] == 7


def test_a_resumable_upload_continues_after_its_last_recorded_part_with_the_sha256_of_every_byte(
    moto, bucket: str, tmp_path: Path
) -> None:
    client = S3ImageTarget.from_settings(settings(moto, bucket)).client
    data = os.urandom(23 * MiB)
    first = s3stream.MultipartWriter(client, bucket, "resumed", part_size=5 * MiB, resumable=True)
    first.write(data[: 17 * MiB])  # parts 1-3 cut, 2 MiB buffered
    wait_until(lambda: getattr(first.uploaded_prefix(), "count", 0) == 3, what="3 parts")
    saved = first.uploaded_prefix()
    assert saved is not None and saved.size == 15 * MiB and saved.parts == ()
    # the process dies here (nothing aborted); the next run lists the parts, checks them against the
    # record and goes on after part 3
    upload, why = s3resume.verify_parts(client, bucket, "resumed", saved)
    assert why is None and upload is not None and [p.number for p in upload.parts] == [1, 2, 3]
    with s3stream.MultipartWriter(client, bucket, "resumed", part_size=5 * MiB, resume=upload) as w:
        w.write(data[saved.size :])
        done = w.close()
    assert done["sha256"] == hashlib.sha256(data).hexdigest() and done["parts"] == 5
    # the sha256-chunked of every byte too (64 MiB chunks, as the file image target's)
    reference = tmp_path / "data"
    reference.write_bytes(data)
    assert done["digest"]["value"] == digest_file(reference).hexdigest
    assert moto.client("s3").get_object(Bucket=bucket, Key="resumed")["Body"].read() == data
    assert open_uploads(moto, bucket) == []


def test_recorded_parts_that_s3_no_longer_holds_as_recorded_are_refused_with_the_reason(
    moto, bucket: str
) -> None:
    client = S3ImageTarget.from_settings(settings(moto, bucket)).client
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    etags = [
        client.upload_part(Bucket=bucket, Key="k", UploadId=upload_id, PartNumber=n, Body=os.urandom(MiB))[
            "ETag"
        ]
        for n in (1, 2)
    ]

    def check(count: int, listed: list[str], size: int = MiB) -> str | None:
        record = s3resume.ResumedUpload(upload_id, size, count, s3resume.etags_digest(listed), "00", {})
        return s3resume.verify_parts(client, bucket, "k", record)[1]

    assert check(2, etags) is None
    assert check(1, etags[:1]) is None  # parts past the record (uploaded after the checkpoint) are fine
    assert "ETags of parts 1..2" in str(check(2, [etags[0], etags[0]]))  # other ETags
    assert "not the one recorded" in str(check(2, etags, MiB - 1))  # other size
    assert "part 3 of the upload" in str(check(3, [*etags, etags[0]]))  # missing
    # part 2 uploaded again behind the task's back (other bytes): its ETag no longer fits the record
    client.upload_part(Bucket=bucket, Key="k", UploadId=upload_id, PartNumber=2, Body=os.urandom(MiB))
    assert "uploaded again since" in str(check(2, etags))
    client.abort_multipart_upload(Bucket=bucket, Key="k", UploadId=upload_id)
    assert "is gone" in str(check(1, etags[:1]))


def test_an_upload_of_more_than_a_thousand_parts_is_checked_across_listpart_pages(moto, bucket: str) -> None:
    client = S3ImageTarget.from_settings(settings(moto, bucket)).client
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="many")["UploadId"]
    count = 1003  # S3 lists 1,000 parts a page at most: parts past the first page are on the second

    def put(n: int) -> str:
        body = n.to_bytes(4, "big") * 256  # small parts: moto checks the 5 MiB minimum only on Complete
        return str(
            client.upload_part(Bucket=bucket, Key="many", UploadId=upload_id, PartNumber=n, Body=body)["ETag"]
        )

    with ThreadPoolExecutor(8) as pool:
        etags = list(pool.map(put, range(1, count + 1)))
    record = s3resume.ResumedUpload(upload_id, 1024, count, s3resume.etags_digest(etags), "00", {})
    calls: list[dict] = []
    listing = client.list_parts

    class Counting:
        def list_parts(self, **kwargs: object) -> dict:
            calls.append(dict(kwargs))
            return listing(**kwargs)

    upload, why = s3resume.verify_parts(Counting(), bucket, "many", record)
    assert why is None and upload is not None and len(upload.parts) == count
    assert [c["PartNumberMarker"] for c in calls] == [0, 1000]
    # the last part (on the second page) replaced: found out
    client.upload_part(Bucket=bucket, Key="many", UploadId=upload_id, PartNumber=count, Body=b"x" * 1024)
    assert "uploaded again since" in str(s3resume.verify_parts(client, bucket, "many", record)[1])
    client.abort_multipart_upload(Bucket=bucket, Key="many", UploadId=upload_id)


class ListingStore:
    """The ``list_parts`` of an S3-compatible store that answers as given: moto always answers well, and
    a buggy store or proxy in front of S3 cannot be made from it. It stands where the boto3 client's
    ``list_parts`` does (the one call :func:`~appliance.targets.s3resume.verify_parts` makes)."""

    def __init__(self, page: dict | None = None, error: Exception | None = None) -> None:
        self.page, self.error, self.calls = page, error, 0

    def list_parts(self, **_kwargs: object) -> dict:
        self.calls += 1
        if self.calls > 50:  # what the code before the fix did: page on forever
            raise AssertionError("ListParts called again and again")
        if self.error is not None:
            raise self.error
        assert self.page is not None
        return self.page


def client_error(code: str, status: int) -> Exception:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "ListParts")  # type: ignore[arg-type]  # what boto3 raises


def test_a_part_listing_refused_or_not_to_trust_is_a_reason_to_start_afresh_not_a_hang() -> None:
    upload = s3resume.ResumedUpload("u", MiB, 2, s3resume.etags_digest(["a" * 32, "b" * 32]), "00", {})

    def check(store: ListingStore) -> str | None:
        return s3resume.verify_parts(store, "b", "k", upload)[1]

    one = {"PartNumber": 1, "Size": MiB, "ETag": '"' + "a" * 32 + '"'}
    stuck = ListingStore({"Parts": [one], "IsTruncated": True, "NextPartNumberMarker": 0})
    assert "does not advance" in str(check(stuck)) and stuck.calls == 1
    sizeless = ListingStore({"Parts": [{"PartNumber": 1, "ETag": "x"}], "IsTruncated": False})
    assert "not a part listing" in str(check(sizeless))
    markerless = ListingStore({"Parts": [one], "IsTruncated": True})
    assert "not a part listing" in str(check(markerless))
    # a policy without s3:ListMultipartUploadParts: the upload cannot be checked, so it is not continued
    denied = ListingStore(error=client_error("AccessDenied", 403))
    assert "cannot be listed to check them (AccessDenied)" in str(check(denied))
    # S3 failing is not a verdict on the upload: a later attempt may check it
    with pytest.raises(ImagingError):
        check(ListingStore(error=client_error("InternalError", 500)))


def answer_after(stopped, gate: threading.Event) -> None:
    try:
        wait_until(stopped, what="the run to stop", timeout=10)
    finally:
        gate.set()


@pytest.mark.skipif(not available(), reason="a resumable upload needs libcrypto's saved hashes")
def test_a_run_that_lost_its_task_keeps_its_upload_and_saves_no_checkpoint_for_parts_answered_after_it(
    moto, bucket: str
) -> None:
    target = S3ImageTarget.from_settings(settings(moto, bucket, part_size="5MiB", threads=2))
    gate = threading.Event()

    def hold(**_) -> None:
        gate.wait()

    target.client.meta.events.register("before-call.s3.UploadPart", hold)
    data = os.urandom(12 * MiB)
    late: list[int] = []
    staging = StagedImage(target, "import-snap-0123456789abcdef5", expected_size=4 * len(data))
    with pytest.raises(LeaseLost), staging as staged:
        w = staged.writer
        assert w is not None and w.resumable
        w.on_part = lambda: late.append(1)  # what saves the step's checkpoint
        w.write(data)  # parts 1 and 2 go up (held), 2 MiB stay buffered
        wait_until(lambda: w.buffered >= 10 * MiB, what="two parts in flight")
        # S3 answers the held parts only once the run stopped: their answers come after it lost its task
        threading.Thread(target=answer_after, args=(lambda: w.closed, gate)).start()
        raise LeaseLost("another worker took the task over")
    # the parts that were running were not waited for (MultipartWriter.detach); they finish in their
    # daemon threads, and no checkpoint is saved for them by this run
    wait_until(
        lambda: not any(t.name.startswith("s3-part") for t in threading.enumerate()),
        what="the parts in flight to finish",
    )
    assert late == []
    # and the upload is still there for the run that took the task over
    assert [u["Key"] for u in open_uploads(moto, bucket)] == [staged.staging_key]
