"""An export's source check against S3 through the real step (moto server): a source that fails its check
never shows up as an object, not even for a moment."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from appliance.service.exports import ExportService, object_key
from appliance.steps.export import SourceDigestCheck
from appliance.store import TaskState
from tests.appliance.service.test_exports import buckets, imported, run, tamper
from tests.servers import MotoServer

pytestmark = pytest.mark.slow

__all__ = ["buckets", "imported"]  # fixtures of test_exports, used here by name


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
