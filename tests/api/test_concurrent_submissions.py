"""Concurrent submissions through the real stack: boto3 clients in threads → `imaging serve` (gunicorn
with 2 worker processes) on loopback → the store (SQLite, and PostgreSQL). No task worker runs, so
every accepted task stays pending and counts as active.

The active-task limit and ClientToken idempotency are decisions each of the two gunicorn workers
makes for its own requests; only the store can make them atomically for both.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from appliance import config as config_mod
from appliance.database import StoreConfig
from appliance.store import Store, TaskState
from tests import stores
from tests.api.e2e_support import api_server
from tests.api.ec2_support import MANIFEST_BASE
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port

pytestmark = pytest.mark.slow

MAX_ACTIVE = 5
SUBMISSIONS = 50
#: a second API credential: another account, as far as client tokens go
OTHER_ACCESS_KEY = "AKIATESTTESTTEST0002"
OTHER_SECRET_KEY = "other-secret-key-0123456789abcdefghij"
ACTIVE_MESSAGE = re.compile(r"^(\d+) tasks are active")


@dataclass
class Api:
    endpoint: str
    db: StoreConfig

    def client(self, access_key: str = TEST_ACCESS_KEY, secret_key: str = TEST_SECRET_KEY) -> Any:
        return boto3.client(
            "ec2",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            # every answer first-hand (no retry hides an error or repeats a request); a pool as large
            # as the number of threads sharing the client
            config=BotoConfig(retries={"max_attempts": 1}, max_pool_connections=SUBMISSIONS),
        )

    def tasks(self) -> list[Any]:
        with Store(self.db) as store:
            return store.list_tasks(limit=None)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    port = free_port()
    cfg = tmp_path / "imaging.yaml"
    cfg.write_text(
        yaml.safe_dump(
            stores.with_store(
                {
                    "state_dir": str(tmp_path / "state"),
                    "api": {
                        "bind": f"127.0.0.1:{port}",
                        "workers": 2,
                        "credentials": [
                            {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY},
                            {"access_key": OTHER_ACCESS_KEY, "secret_key": OTHER_SECRET_KEY},
                        ],
                    },
                    "sources": {"allowed_endpoints": [MANIFEST_BASE]},
                    "tasks": {"max_active": MAX_ACTIVE},
                }
            )
        )
    )
    endpoint = f"http://127.0.0.1:{port}"
    with api_server(cfg, endpoint):
        yield Api(endpoint, config_mod.load(cfg).store)


def all_at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` in one thread each, released together; each call's result or its ClientError."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        start.wait()
        try:
            return call()
        except ClientError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def snapshot(ec2: Any, key: str, **extra: Any) -> Callable[[], str]:
    return lambda: ec2.import_snapshot(
        DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": "disks", "S3Key": key}}, **extra
    )["ImportTaskId"]


def volume(ec2: Any, key: str) -> Callable[[], str]:
    return lambda: ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": 1 << 20, "ImportManifestUrl": f"{MANIFEST_BASE}/disks/{key}.xml"},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]


def test_fifty_concurrent_submissions_accept_exactly_max_active(api: Api) -> None:
    ec2 = api.client()
    # both task kinds count against the one limit
    calls = [(snapshot if i % 2 else volume)(ec2, f"disk-{i}") for i in range(SUBMISSIONS)]
    results = all_at_once(calls)
    accepted = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if not isinstance(r, str)]
    assert len(accepted) == MAX_ACTIVE, [r.response["Error"] for r in refused][:3]
    assert len(set(accepted)) == MAX_ACTIVE
    assert len(refused) == SUBMISSIONS - MAX_ACTIVE
    for error in refused:
        assert error.response["Error"]["Code"] == "ResourceLimitExceeded"
        counted = ACTIVE_MESSAGE.match(error.response["Error"]["Message"])
        assert counted is not None, error.response["Error"]["Message"]
        assert int(counted[1]) == MAX_ACTIVE
    tasks = api.tasks()
    assert sorted(t.id for t in tasks) == sorted(accepted)
    assert {t.state for t in tasks} == {TaskState.PENDING}


def test_ten_concurrent_calls_with_one_client_token_create_one_task(api: Api) -> None:
    ec2 = api.client()
    ids = all_at_once([snapshot(ec2, "disk.raw", ClientToken="token-concurrent")] * 10)
    assert all(isinstance(i, str) for i in ids), ids
    assert len(set(ids)) == 1
    [task] = ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"]
    assert task["ImportTaskId"] == ids[0]
    assert len(api.tasks()) == 1


def test_sequential_calls_with_one_client_token_answer_the_first_task(api: Api) -> None:
    ec2 = api.client()
    first = ec2.import_snapshot(
        Description="db disk",
        DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": "disks", "S3Key": "db.raw"}},
        ClientToken="token-seq",
    )
    again = ec2.import_snapshot(
        Description="db disk",
        DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": "disks", "S3Key": "db.raw"}},
        ClientToken="token-seq",
    )
    del first["ResponseMetadata"], again["ResponseMetadata"]  # request ids differ
    assert again == first
    assert len(api.tasks()) == 1


def test_client_token_reused_for_a_different_request_is_idempotent_parameter_mismatch(api: Api) -> None:
    ec2 = api.client()
    task_id = snapshot(ec2, "one.raw", ClientToken="token-reused")()
    with pytest.raises(ClientError) as info:
        snapshot(ec2, "two.raw", ClientToken="token-reused")()
    assert info.value.response["Error"]["Code"] == "IdempotentParameterMismatch"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    # the token belongs to ImportSnapshot: the same token on ImportImage is another request
    image = ec2.import_image(
        DiskContainers=[{"Format": "RAW", "UserBucket": {"S3Bucket": "disks", "S3Key": "one.raw"}}],
        ClientToken="token-reused",
    )["ImportTaskId"]
    assert sorted(t.id for t in api.tasks()) == sorted([task_id, image])


def test_client_token_retry_is_answered_when_the_limit_is_reached(api: Api) -> None:
    ec2 = api.client()
    task_id = snapshot(ec2, "first.raw", ClientToken="token-full")()
    for i in range(MAX_ACTIVE - 1):
        snapshot(ec2, f"more-{i}.raw")()
    with pytest.raises(ClientError) as info:
        snapshot(ec2, "one-too-many.raw")()
    assert info.value.response["Error"]["Code"] == "ResourceLimitExceeded"
    assert snapshot(ec2, "first.raw", ClientToken="token-full")() == task_id


def test_client_tokens_are_per_account(api: Api) -> None:
    mine = snapshot(api.client(), "disk.raw", ClientToken="token-shared")()
    theirs = snapshot(
        api.client(OTHER_ACCESS_KEY, OTHER_SECRET_KEY), "disk.raw", ClientToken="token-shared"
    )()
    assert mine != theirs
    assert len(api.tasks()) == 2
