"""The admin API's image routes (:mod:`api.images`): ``POST /v1/images/{id}/copies`` queues the
task, ``GET /v1/tasks/{id}`` shows it, ``POST /v1/tasks/{id}/cancel`` stops it, ``GET /v1/images/{id}``
lists the image's locations — over a real import (ImportSnapshot from a moto server process) and the
real copy-image workflow; every answer checked against the OpenAPI document."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from api.app import create_app
from appliance import config as config_mod
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer
from appliance.store import Store, TaskState
from appliance.workflow.engine import Engine
from tests import stores
from tests.api.openapi_support import assert_documented
from tests.api.test_admin import AUTH, assert_error, basic
from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer

MiB = 1 << 20
USER_KEY, USER_SECRET = "AKIDUSERUSERUSER0001", "user-secret-0123456789"
USER = basic(USER_KEY, USER_SECRET)
COPIES = "/v1/images/{image_id}/copies"


def make_config(tmp_path: Path, endpoint: str | None = None) -> config_mod.Config:
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "api": {
            "credentials": [
                {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY, "role": "admin"},
                {"access_key": USER_KEY, "secret_key": USER_SECRET, "account": "111122223333"},
            ]
        },
    }
    if endpoint is not None:
        data["sources"] = {
            "allowed_endpoints": [endpoint],
            "s3": {
                "endpoint_url": endpoint,
                "region": "us-east-1",
                "access_key": "testing",
                "secret_key": "testing",
            },
        }
    return stores.config(data, base_dir=tmp_path)


def post_copy(
    client: testing.TestClient, image_id: str, body: Any, headers: dict[str, str]
) -> testing.Result:
    return client.simulate_post(
        f"/v1/images/{image_id}/copies",
        body=json.dumps(body),
        headers={**headers, "Content-Type": "application/json"},
    )


def test_an_unknown_image_id_is_a_404_with_its_ec2_code_and_queues_nothing(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    with Store(cfg.store) as store:
        client = testing.TestClient(create_app(cfg, store=store))
        result = post_copy(client, "ami-0123456789abcdef0", {"to": "s3://somewhere"}, AUTH)
        assert_error(result, 404, "InvalidAMIID.NotFound")
        assert_documented(COPIES, "POST", result)
        result = client.simulate_get("/v1/images/snap-0123456789abcdef0", headers=AUTH)
        assert_error(result, 404, "InvalidSnapshot.NotFound")
        assert_documented("/v1/images/{image_id}", "GET", result)
        assert_error(post_copy(client, "ami-nothex", {"to": "s3://x1"}, AUTH), 400, "InvalidAMIID.Malformed")
        assert_error(
            post_copy(client, "ami-0123456789abcdef0", {"to": "s3://x1", "extra": 1}, AUTH),
            400,
            "InvalidParameterValue",
        )
        assert_error(
            client.simulate_post("/v1/tasks/t-000000000000/cancel", headers=AUTH), 404, "TaskNotFound"
        )
        assert client.simulate_post("/v1/images/ami-0123456789abcdef0/copies").status_code == 401
        assert store.list_tasks(kind=["copy-image"]) == []


@pytest.fixture
def imported(tmp_path: Path, moto: MotoServer, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A snapshot of the user's account, imported to the file image target."""
    bucket = "adm-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=bucket)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"".join(hashlib.sha256(str(i).encode()).digest() * (MiB // 32) for i in range(6)))
    s3.upload_file(str(disk), bucket, "disk.raw")
    cfg = make_config(tmp_path, moto.endpoint)
    imports = ImportService(cfg)
    try:
        task = imports.import_snapshot(
            DiskContainer(format="RAW", bucket=bucket, key="disk.raw"), account="111122223333"
        )
        done = Engine(cfg, imports.store, poll_interval=0.1).run(task.id)
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        yield {
            "cfg": cfg,
            "store": imports.store,
            "client": testing.TestClient(create_app(cfg, store=imports.store)),
            "snapshot_id": "snap-" + done.id[-17:],
            "bucket": bucket,
            "disk": disk,
        }
    finally:
        imports.store.close()


@pytest.mark.slow
def test_a_copy_is_queued_shown_run_and_listed_and_a_queued_one_cancelled(
    imported: dict[str, Any], moto: MotoServer
) -> None:
    client, snapshot_id, bucket = imported["client"], imported["snapshot_id"], imported["bucket"]
    result = post_copy(client, snapshot_id, {"to": f"s3://{bucket}/copies/"}, USER)
    assert result.status_code == 202, result.text
    assert_documented(COPIES, "POST", result)
    task_id = result.json["id"]
    assert result.json["kind"] == "copy-image" and result.headers["location"] == f"/v1/tasks/{task_id}"
    assert result.json["account"] == "111122223333"

    done = Engine(imported["cfg"], imported["store"], poll_interval=0.1).run(task_id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    shown = client.simulate_get(f"/v1/tasks/{task_id}", headers=USER)
    assert shown.status_code == 200
    assert_documented("/v1/tasks/{task_id}", "GET", shown)
    digest = hashlib.sha256(imported["disk"].read_bytes()).hexdigest()
    assert shown.json["provenance"]["output"]["sha256"] == digest
    assert shown.json["progress"]["stages"][-1]["written"] == imported["disk"].stat().st_size
    body = moto.client("s3").get_object(Bucket=bucket, Key=f"copies/{task_id}.raw")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == digest

    image = client.simulate_get(f"/v1/images/{snapshot_id}", headers=USER)
    assert image.status_code == 200
    assert_documented("/v1/images/{image_id}", "GET", image)
    assert [(loc["type"], loc.get("copy_task_id")) for loc in image.json["locations"]] == [
        ("file", None),
        ("s3", task_id),
    ]

    # a queued copy (no worker here) cancelled through the task-cancel route; again: 409
    queued = post_copy(client, snapshot_id, {"to": f"s3://{bucket}/more/"}, USER).json["id"]
    cancelled = client.simulate_post(f"/v1/tasks/{queued}/cancel", headers=USER)
    assert cancelled.status_code == 202 and cancelled.json["state"] == "cancelled"
    assert_documented("/v1/tasks/{task_id}/cancel", "POST", cancelled)
    again = client.simulate_post(f"/v1/tasks/{queued}/cancel", headers=USER)
    assert_error(again, 409, "IncorrectState")
    # a file destination is a path on the appliance: the admin's only; a second copy where the
    # image already has one is a conflict (the admin key sees every account's images)
    denied = post_copy(client, snapshot_id, {"to": "file:///tmp/x"}, USER)
    assert_error(denied, 403, "Copy.FileDestinationDenied")
    assert_documented(COPIES, "POST", denied)
    there = post_copy(client, snapshot_id, {"to": f"s3://{bucket}/copies/"}, AUTH)
    assert_error(there, 409, "Copy.AlreadyThere")
