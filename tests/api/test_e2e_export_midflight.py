"""An export seen mid-upload through the wire: `imaging serve` (gunicorn) and `imaging worker` as real
processes, S3 on the moto server behind a proxy that holds the upload's second part, boto3 and the AWS
CLI as clients. While the part is held the task is provably mid-upload: DescribeExportImageTasks shows
it active with its phase and a string ``Progress`` past zero, and CancelExportTask then leaves no object
and no incomplete multipart upload (listed through the moto server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import guestfactory
from tests.api.awscli_support import aws_ec2
from tests.api.e2e_support import Appliance, running_appliance, wait_for
from tests.httpfixtures import TestHTTPServer
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[StallingProxy]:
    with StallingProxy(moto.endpoint) as p:
        yield p


@pytest.fixture
def proxied_appliance(
    tmp_path: Path, moto: MotoServer, parts_server: TestHTTPServer, proxy: StallingProxy
) -> Iterator[Appliance]:
    """The appliance reaching S3 through ``proxy``, in 5 MiB parts sent one at a time."""
    s3 = {
        "endpoint_url": proxy.endpoint,
        "region": REGION,
        "access_key": "testing",
        "secret_key": "testing",
        "part_size": "5MiB",
        "threads": 1,
    }
    sources = {"allowed_endpoints": [proxy.endpoint, parts_server.endpoint], "s3": s3}
    with running_appliance(tmp_path, moto, parts_server, sources=sources) as app:
        yield app


def _imported_image(appliance: Appliance, moto: MotoServer, bucket: str, tmp_path: Path) -> str:
    disk = guestfactory.linux_disk(tmp_path)  # 25 MiB: a RAW export of it is five parts
    moto.client("s3").upload_file(str(disk), bucket, "disk.raw")
    task_id = appliance.ec2.import_image(
        DiskContainers=[{"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": "disk.raw"}}]
    )["ImportTaskId"]

    def status() -> dict[str, Any]:
        return appliance.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]

    wait_for(lambda: status()["Status"] in ("completed", "deleted"), what="the image import")
    assert status()["Status"] == "completed", status()
    return str(status()["ImageId"])


def test_an_export_held_mid_upload_shows_its_progress_and_cancel_export_task_leaves_nothing(
    proxied_appliance: Appliance, proxy: StallingProxy, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    appliance = proxied_appliance
    image_id = _imported_image(appliance, moto, bucket, tmp_path)
    out_bucket = f"{bucket[:50]}-out"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=out_bucket)
    proxy.arm_request("PUT", "partNumber=2")
    try:
        export_id = appliance.ec2.export_image(
            ImageId=image_id,
            DiskImageFormat="RAW",
            S3ExportLocation={"S3Bucket": out_bucket, "S3Prefix": "x/"},
        )["ExportImageTaskId"]
        wait_for(lambda: proxy.stalled_on("partNumber=2") >= 1, what="the second part to be held")
        assert len(s3.list_multipart_uploads(Bucket=out_bucket).get("Uploads", [])) == 1

        # mid-upload as boto3 and the AWS CLI see it: active, the phase, a percentage string past 0
        def described() -> dict[str, Any]:
            r = aws_ec2(
                appliance.endpoint,
                "describe-export-image-tasks",
                "--export-image-task-ids",
                export_id,
                check=True,
            )
            return dict(json.loads(r.stdout)["ExportImageTasks"][0])

        wait_for(lambda: int(described().get("Progress", "0")) > 0, what="the export's progress to move")
        task = described()
        assert task["Status"] == "active" and task["StatusMessage"] == "exporting", task
        assert isinstance(task["Progress"], str) and 0 < int(task["Progress"]) < 100
        [seen] = appliance.ec2.describe_export_image_tasks(ExportImageTaskIds=[export_id])["ExportImageTasks"]
        assert seen["Status"] == "active" and 0 < int(seen["Progress"]) < 100

        cancelled = aws_ec2(appliance.endpoint, "cancel-export-task", "--export-task-id", export_id)
        assert cancelled.returncode == 0 and cancelled.stdout.strip() == "", cancelled.stderr
    finally:
        proxy.release()

    def status() -> str:
        tasks = appliance.ec2.describe_export_image_tasks(ExportImageTaskIds=[export_id])["ExportImageTasks"]
        return str(tasks[0]["Status"])

    wait_for(lambda: status() == "deleted", what="the cancelled export to end")
    [final] = appliance.ec2.describe_export_image_tasks(ExportImageTaskIds=[export_id])["ExportImageTasks"]
    assert final["StatusMessage"] == "Cancelled by user" and "Progress" not in final
    assert s3.list_multipart_uploads(Bucket=out_bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=out_bucket).get("KeyCount") == 0
