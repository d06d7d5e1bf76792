"""`imaging serve` with its tasks in PostgreSQL while the server goes away (a real ``pg_ctl stop``)
and comes back: EC2 calls answer ``ServiceUnavailable`` (503) without saying where the database is,
the admin API ``StateStoreUnavailable``, health ``degraded`` (not out of rotation), nothing is
half-written, and everything works again once the database is back, in the same gunicorn workers.

The server here is the module's own (the tests stop it), with synchronous commits.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from tests.api.e2e_support import api_server
from tests.api.ec2_support import MANIFEST_BASE
from tests.postgres import Cluster, postgres_cluster
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port

pytestmark = [pytest.mark.slow, pytest.mark.backends("postgresql")]

GiB = 1 << 30
MANIFEST = f"{MANIFEST_BASE}/bucket/disk.manifest.xml?X-Amz-Signature=abc"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with postgres_cluster(synchronous_commit=True) as c:
        yield c


@pytest.fixture
def config_file(tmp_path: Path, cluster: Cluster) -> Iterator[Path]:
    schema = cluster.create_schema()
    path = tmp_path / "imaging.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "state"),
                "api": {
                    "bind": f"127.0.0.1:{free_port()}",
                    "workers": 2,
                    "credentials": [{"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}],
                },
                "sources": {"allowed_endpoints": [MANIFEST_BASE]},
                "store": {"url": cluster.schema_url(schema), "connect_timeout": 2},
                "targets": {
                    "volume": {"type": "file", "shared": True}
                },  # a fleet's volumes: on one machine here
            }
        )
    )
    try:
        yield path
    finally:
        if not cluster.running():
            cluster.start()
        cluster.drop_schema(schema)


def endpoint_of(config_file: Path) -> str:
    return "http://" + yaml.safe_load(config_file.read_text())["api"]["bind"]


def ec2_client(endpoint: str) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=TEST_SECRET_KEY,
        config=BotoConfig(retries={"max_attempts": 1}),  # every answer first-hand
    )


def import_volume(ec2: Any) -> str:
    return ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": GiB, "ImportManifestUrl": MANIFEST},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]


def admin_get(endpoint: str, path: str) -> tuple[int, dict[str, Any]]:
    token = base64.b64encode(f"{TEST_ACCESS_KEY}:{TEST_SECRET_KEY}".encode()).decode()
    req = urllib.request.Request(endpoint + path, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_unavailable(call: Any, cluster: Cluster) -> None:
    with pytest.raises(ClientError) as info:
        call()
    error = info.value.response["Error"]
    status = info.value.response["ResponseMetadata"]["HTTPStatusCode"]
    assert (status, error["Code"]) == (503, "ServiceUnavailable")
    assert "task database" in error["Message"] and "Retry" in error["Message"]
    # where the database is, and why it failed, is for the log, not for clients
    assert str(cluster.socket_dir) not in error["Message"] and "postgresql" not in error["Message"]


def test_during_an_outage_calls_answer_service_unavailable_and_all_works_after_it(
    cluster: Cluster, config_file: Path
) -> None:
    endpoint = endpoint_of(config_file)
    with api_server(config_file, endpoint):
        ec2 = ec2_client(endpoint)
        before = import_volume(ec2)

        cluster.stop()
        assert_unavailable(lambda: import_volume(ec2), cluster)  # a write
        assert_unavailable(lambda: ec2.describe_conversion_tasks(), cluster)  # a read needs it too
        assert_unavailable(lambda: ec2.cancel_conversion_task(ConversionTaskId=before), cluster)
        status, health = admin_get(endpoint, "/v1/health")
        assert status == 200 and health["status"] == "degraded"  # an outage: still in rotation
        store = health["checks"]["store"]
        assert store["status"] == "failed" and store["transient"] is True
        assert "unreachable" in store["reason"]
        status, body = admin_get(endpoint, "/v1/tasks")
        assert (status, body["error"]["code"]) == (503, "StateStoreUnavailable")

        cluster.start()
        # the same gunicorn workers, their connections broken by the restart
        listed = [t["ConversionTaskId"] for t in ec2.describe_conversion_tasks()["ConversionTasks"]]
        assert listed == [before]  # nothing half-made by the refused calls
        after = import_volume(ec2)
        assert admin_get(endpoint, "/v1/health")[1]["checks"]["store"]["status"] == "ok"
        status, body = admin_get(endpoint, "/v1/tasks")
        assert status == 200 and {t["id"] for t in body["tasks"]} == {before, after}


def test_an_api_started_while_the_database_is_down_serves_once_it_is_up(
    cluster: Cluster, config_file: Path
) -> None:
    endpoint = endpoint_of(config_file)
    cluster.stop()
    with api_server(config_file, endpoint):  # it starts: health answers
        status, health = admin_get(endpoint, "/v1/health")
        assert status == 200 and health["checks"]["store"]["transient"] is True
        ec2 = ec2_client(endpoint)
        assert_unavailable(lambda: import_volume(ec2), cluster)
        cluster.start()
        task_id = import_volume(ec2)
        listed = ec2.describe_conversion_tasks()["ConversionTasks"]
        assert [t["ConversionTaskId"] for t in listed] == [task_id]
