"""A server-side copy (``UploadPartCopy``) cancelled while S3 is still copying one of its parts: the copy
stops and aborts its upload without waiting for that part, and when S3 finishes the part after all (its
documentation says a part in flight may still be stored after the abort, its bytes kept until the upload is
aborted again; moto refuses such a part, so the client below plays S3 there) the upload is aborted once
more. Everything else is the moto server."""

from __future__ import annotations

import threading
import types
import uuid
from typing import Any

from appliance.errors import Cancelled
from appliance.progress import ProgressTracker
from appliance.targets.copy_server import _PartCopy
from tests.processes import wait_until
from tests.servers import MotoServer

MiB = 1 << 20


class LateCopyingS3:
    """The moto server's client, but ``UploadPartCopy`` is held until ``land`` and then answered as S3
    answers a part it copied; every AbortMultipartUpload is recorded (upload id, whether the part had
    landed) and passed on."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.held, self.land = threading.Event(), threading.Event()
        self.landed = False
        self.aborts: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def upload_part_copy(self, **kw: Any) -> dict[str, Any]:
        self.held.set()
        self.land.wait(60)
        self.landed = True
        return {"CopyPartResult": {"ETag": '"0123456789abcdef0123456789abcdef"'}}

    def abort_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.aborts.append((kw["UploadId"], self.landed))
        return self.client.abort_multipart_upload(**kw)


def test_a_part_copy_that_lands_after_the_cancel_makes_the_upload_abort_again(moto: MotoServer) -> None:
    s3 = moto.client("s3")
    bucket = f"copy-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="src.raw", Body=b"s" * (5 * MiB))
    cancel = threading.Event()
    job = types.SimpleNamespace(
        bucket=bucket,
        key="copy.raw",
        location={"bucket": bucket, "key": "src.raw"},
        cancel=cancel,
        fence=None,
    )
    client = LateCopyingS3(s3)
    copy = _PartCopy(job, client, None, 5 * MiB, "0" * 64, ProgressTracker("copying", 5 * MiB, None))  # type: ignore[arg-type]
    copy.start({})
    upload_id = copy.upload_id
    failed: list[BaseException] = []

    def send() -> None:
        try:
            copy.send((1, 0, 5 * MiB - 1))
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    assert client.held.wait(60)
    cancel.set()
    wait_until(lambda: not thread.is_alive(), timeout=30, what="the cancelled part copy to stop")
    assert [type(e) for e in failed] == [Cancelled]
    copy.discard()  # what the copy does on a cancel: the upload aborted, the part not waited for
    assert client.aborts == [(upload_id, False)]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    client.land.set()
    wait_until(lambda: len(client.aborts) == 2, what="a second abort once the part has landed")
    assert client.aborts[1] == (upload_id, True)
