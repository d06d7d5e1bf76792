"""How a finished task reads, through the real path: `imaging serve` and `imaging worker` as processes,
boto3 for the EC2 actions, the admin API and `imaging tasks list` for the views. A completed task's
phase says it completed; a cancelled export whose export step had written every byte shows the
percent it reached, never 100, and its phase says it was cancelled."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import appliance
from tests import guestfactory
from tests.api.e2e_support import Appliance, admin_task, running_appliance, wait_for
from tests.httpfixtures import TestHTTPServer
from tests.servers import MotoServer

pytestmark = pytest.mark.slow


@pytest.fixture
def lingering(tmp_path: Path, moto: MotoServer, parts_server: TestHTTPServer) -> Iterator[Appliance]:
    """The appliance with an operator's export-image workflow (``workflows.extra_dirs``, searched before
    the shipped ones): the shipped steps, then a step that waits — the export step has reported all
    its bytes (100 %) while the task still runs, so a cancel lands after it."""
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    shipped = Path(appliance.__file__).parent / "workflows" / "export-image.yaml"
    workflow = yaml.safe_load(shipped.read_text())
    workflow["steps"].append({"name": "linger", "action": "util.sleep", "with": {"seconds": 600}})
    (workflows / "export-image.yaml").write_text(yaml.safe_dump(workflow))
    extra = {"workflows": {"extra_dirs": [str(workflows)]}}
    with running_appliance(tmp_path, moto, parts_server, extra=extra) as app:
        yield app


def _import(app: Appliance, moto: MotoServer, bucket: str, tmp_path: Path) -> tuple[str, str]:
    """ImportImage of a bootable RAW disk from the user's bucket; (task id, ami id)."""
    moto.client("s3").upload_file(str(guestfactory.linux_disk(tmp_path)), bucket, "disk.raw")
    task_id = app.ec2.import_image(
        DiskContainers=[{"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": "disk.raw"}}]
    )["ImportTaskId"]

    def status() -> dict[str, Any]:
        return app.ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]

    wait_for(lambda: status()["Status"] in ("completed", "deleted"), what="the image import")
    assert status()["Status"] == "completed", status()
    return task_id, status()["ImageId"]


def tasks_list(app: Appliance) -> str:
    """`imaging tasks list` on the appliance's configuration."""
    out = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "-c", str(app.config), "tasks", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_completed_and_cancelled_tasks_say_how_they_ended_and_a_cancel_never_shows_100_percent(
    lingering: Appliance, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    app = lingering
    import_id, image_id = _import(app, moto, bucket, tmp_path)
    done = admin_task(app, import_id)
    assert (done["task"]["state"], done["task"]["phase"], done["progress"]["phase"]) == (
        "completed",
        "completed",
        "completed",
    )
    assert done["progress"]["percent"] == 100

    export_id = app.ec2.export_image(
        ImageId=image_id, DiskImageFormat="RAW", S3ExportLocation={"S3Bucket": bucket, "S3Prefix": "out/"}
    )["ExportImageTaskId"]
    # the export step wrote every byte (its progress is the task's: 100) and the next step runs
    wait_for(lambda: admin_task(app, export_id)["progress"]["phase"] == "sleep", what="the step after export")
    assert admin_task(app, export_id)["progress"]["percent"] == 100
    app.ec2.cancel_export_task(ExportTaskId=export_id)
    wait_for(lambda: admin_task(app, export_id)["task"]["state"] == "cancelled", what="the cancel")

    cancelled = admin_task(app, export_id)
    assert cancelled["task"]["phase"] == cancelled["progress"]["phase"] == "cancelled"
    percent = cancelled["progress"]["percent"]
    assert percent is not None and 50 <= percent < 100, cancelled["progress"]
    (row,) = [line for line in tasks_list(app).splitlines() if line.startswith(export_id)]
    assert "cancelled" in row and "100%" not in row and f"{percent:.0f}%" in row, row
