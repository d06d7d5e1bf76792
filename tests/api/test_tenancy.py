"""One service, many accounts: every task belongs to an account, and a key sees only its account's.

Through the real stack: boto3, the AWS CLI and raw SigV4 requests → `imaging serve` (gunicorn, two
worker processes) on loopback → the SQLite store. No task worker runs, so tasks stay pending (and
cancel at once). The keys (``api.credentials``): two of account ``acct-a``, one of ``acct-b``, a
cloud's front end (``role: frontend``) that names the account it acts for in the signed
``X-Imaging-Account`` header, an admin, and a key configured before accounts existed (no account).

Another account's task must be indistinguishable from one that does not exist: the tests compare
whole error responses (status, headers, body) with those for an unknown id of the same form.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import falcon
import pytest
import yaml
from botocore.auth import SigV2Auth, SigV4QueryAuth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest
from botocore.config import Config as BotoConfig
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from api.ec2 import model
from appliance import config as config_mod
from appliance.service.imports import ImportService
from appliance.service.importtasks import IMPORT_IMAGE, IMPORT_SNAPSHOT, IMPORT_VOLUME, DiskImage, new_task_id
from tests.api import awscli_account_header
from tests.api.e2e_support import api_server
from tests.api.ec2_support import FORM, HOST, MANIFEST_BASE, Prepared, ec2_app, error_of, parse, send, sign
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
AWS = Path(sys.executable).with_name("aws")
HEADER = "X-Imaging-Account"
GiB = 1 << 30


@dataclass(frozen=True)
class Key:
    access: str
    secret: str
    account: str | None = None
    role: str | None = None

    def entry(self) -> dict[str, str]:
        entry = {"access_key": self.access, "secret_key": self.secret}
        entry |= {"account": self.account} if self.account else {}
        entry |= {"role": self.role} if self.role else {}
        return entry


ALICE = Key("AKIATENANCYALICE0001", "alice-secret-0123456789abcdef", "acct-a")
ALICE2 = Key("AKIATENANCYALICE0002", "alice2-secret-0123456789abcdef", "acct-a")
BOB = Key("AKIATENANCYBOB000001", "bob-secret-0123456789abcdefgh", "acct-b")
FRONT = Key("AKIATENANCYFRONT0001", "front-secret-0123456789abcdef", "cloud-front", "frontend")
ADMIN = Key("AKIATENANCYADMIN0001", "admin-secret-0123456789abcdef", "ops", "admin")
#: configured before accounts existed: no account (its access key names it), role user
LEGACY = Key(TEST_ACCESS_KEY, TEST_SECRET_KEY)
KEYS = (ALICE, ALICE2, BOB, FRONT, ADMIN, LEGACY)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as received."""

    status: int
    headers: dict[str, str]
    body: bytes

    def shape(self, *ids: str) -> tuple[int, dict[str, str], str]:
        """The answer with what differs between two requests (request ids, the date, the task ids
        named) replaced by placeholders: equal shapes are answers no client can tell apart."""
        varying = {"date", "x-amzn-requestid", "x-request-id"}
        headers = {k.lower(): v for k, v in self.headers.items()}
        text = self.body.decode()
        for name in varying - {"date"}:
            if name in headers:
                text = text.replace(headers[name], "<request-id>")
        headers = {k: v for k, v in headers.items() if k not in varying}
        for task_id in ids:
            text = text.replace(task_id, "<task-id>")
        return self.status, headers, text


def fetch(request: urllib.request.Request) -> Answer:
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return Answer(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), exc.read())


@dataclass
class Api:
    endpoint: str
    config: Path

    def ec2(self, key: Key, account: str | None = None, *, signed: bool = True) -> Any:
        """A boto3 EC2 client of ``key``; with ``account``, every request carries the account
        header, added before signing (``signed``: botocore signs every header) or after it."""
        client = boto3.client(
            "ec2",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=key.access,
            aws_secret_access_key=key.secret,
            config=BotoConfig(retries={"max_attempts": 1}),
        )
        if account is not None:

            def before_sign(request: AWSRequest, **kwargs: Any) -> None:
                request.headers[HEADER] = account

            def before_send(request: AWSPreparedRequest, **kwargs: Any) -> None:
                request.headers[HEADER] = account

            if signed:
                client.meta.events.register("before-sign.ec2", before_sign)
            else:
                client.meta.events.register("before-send.ec2", before_send)
        return client

    def call(self, key: Key, params: dict[str, str], *, signed: dict[str, str] | None = None) -> Answer:
        """An EC2 request as sent on the wire, SigV4-signed by botocore (with ``signed`` headers)."""
        req = sign(
            {"Version": model.API_VERSION, **params},
            access_key=key.access,
            secret_key=key.secret,
            host=urlsplit(self.endpoint).netloc,
            extra_headers=signed,
        )
        return fetch(urllib.request.Request(self.endpoint + "/", req.body, req.headers, method="POST"))

    def admin(self, key: Key, path: str, secret: str | None = None, **headers: str) -> Answer:
        token = base64.b64encode(f"{key.access}:{secret or key.secret}".encode()).decode()
        return fetch(
            urllib.request.Request(
                self.endpoint + path, headers={"Authorization": f"Basic {token}", **headers}
            )
        )

    def admin_json(self, key: Key, path: str) -> Any:
        answer = self.admin(key, path)
        assert answer.status == 200, answer.body
        return json.loads(answer.body)

    def accounts(self) -> dict[str, str | None]:
        """Every task's account, as the admin sees it."""
        tasks = self.admin_json(ADMIN, "/v1/tasks?limit=1000")["tasks"]
        return {t["id"]: t["account"] for t in tasks}

    def service(self) -> ImportService:
        """The import service on the appliance's own configuration and store."""
        return ImportService(config_mod.load(self.config))


def write_config(path: Path, port: int, state: Path, **api: Any) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(state),
                "api": {"bind": f"127.0.0.1:{port}", "workers": 2, "credentials": [k.entry() for k in KEYS]}
                | api,
                "sources": {"allowed_endpoints": [MANIFEST_BASE]},
                "tasks": {"max_active": 100},
            }
        )
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One appliance for the module (gunicorn takes seconds to start on a busy machine)."""
    tmp = tmp_path_factory.mktemp("tenancy")
    port = free_port()
    cfg = tmp / "imaging.yaml"
    write_config(cfg, port, tmp / "state")
    endpoint = f"http://127.0.0.1:{port}"
    with api_server(cfg, endpoint):
        yield Api(endpoint, cfg)


@pytest.fixture
def api(served: Api) -> Api:
    """The appliance with no task: each test starts from an empty store (the tasks' steps, events
    and records go with them)."""
    with sqlite3.connect(config_mod.load(served.config).db_path) as db:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("DELETE FROM tasks")
    return served


# -- what each kind of task is created, described and cancelled with -----------------------------

MANIFEST = f"{MANIFEST_BASE}/bucket/disk.raw.manifest.xml"


def new_volume(ec2: Any) -> str:
    return ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": GiB, "ImportManifestUrl": MANIFEST},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]


def new_instance(ec2: Any) -> str:
    return ec2.import_instance(
        Platform="Linux",
        LaunchSpecification={"Architecture": "x86_64"},
        DiskImages=[
            {"Image": {"Format": "RAW", "Bytes": GiB, "ImportManifestUrl": MANIFEST}, "Volume": {"Size": 1}}
        ],
    )["ConversionTask"]["ConversionTaskId"]


def new_image(ec2: Any) -> str:
    return ec2.import_image(DiskContainers=[{"Format": "RAW", "Url": f"{MANIFEST_BASE}/b/disk.raw"}])[
        "ImportTaskId"
    ]


def new_snapshot(ec2: Any, key: str = "disk.raw", **extra: Any) -> str:
    return ec2.import_snapshot(
        DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": "disks", "S3Key": key}}, **extra
    )["ImportTaskId"]


#: (what creates the task, its kind, the wire request that describes or cancels one id)
LOOKUPS: dict[str, tuple[Callable[[Any], str], str, Callable[[str], dict[str, str]]]] = {
    "DescribeConversionTasks": (
        new_volume,
        IMPORT_VOLUME,
        lambda i: {"Action": "DescribeConversionTasks", "ConversionTaskId.1": i},
    ),
    "CancelConversionTask": (
        new_volume,
        IMPORT_VOLUME,
        lambda i: {"Action": "CancelConversionTask", "ConversionTaskId": i},
    ),
    "DescribeImportImageTasks": (
        new_image,
        IMPORT_IMAGE,
        lambda i: {"Action": "DescribeImportImageTasks", "ImportTaskId.1": i},
    ),
    "DescribeImportSnapshotTasks": (
        new_snapshot,
        IMPORT_SNAPSHOT,
        lambda i: {"Action": "DescribeImportSnapshotTasks", "ImportTaskId.1": i},
    ),
    "CancelImportTask(image)": (
        new_image,
        IMPORT_IMAGE,
        lambda i: {"Action": "CancelImportTask", "ImportTaskId": i},
    ),
    "CancelImportTask(snapshot)": (
        new_snapshot,
        IMPORT_SNAPSHOT,
        lambda i: {"Action": "CancelImportTask", "ImportTaskId": i},
    ),
}


def describe_one(ec2: Any, task_id: str) -> dict[str, Any]:
    """The task as its account's Describe* shows it."""
    if task_id.startswith("import-vol-"):
        return ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"][0]
    if task_id.startswith("import-ami-"):
        return ec2.describe_import_image_tasks(ImportTaskIds=[task_id])["ImportImageTasks"][0]
    return ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"][0]


def state_of(task: dict[str, Any]) -> str:
    return task.get("State") or task.get("Status") or task["SnapshotTaskDetail"]["Status"]


# -- the EC2 API: another account's task is an unknown task -----------------------------------------


@pytest.mark.parametrize("action", sorted(LOOKUPS))
def test_another_accounts_task_is_answered_exactly_like_an_unknown_id(api: Api, action: str) -> None:
    create, kind, request = LOOKUPS[action]
    task_id = create(api.ec2(ALICE))
    unknown = new_task_id(kind)  # the same form and length, never created
    theirs = api.call(BOB, request(task_id))
    nobody = api.call(BOB, request(unknown))
    assert theirs.status == 400, theirs.body
    assert theirs.shape(task_id) == nobody.shape(unknown)
    # what boto3 makes of it: the code EC2 gives an unknown id (waiters retry on it)
    with pytest.raises(ClientError) as info:
        describe_one(api.ec2(BOB), task_id)
    assert info.value.response["Error"]["Code"] == "InvalidConversionTaskId"
    # the task is untouched, and the other key of its account sees it
    assert state_of(describe_one(api.ec2(ALICE2), task_id)) == "active"


def test_each_account_lists_only_its_own_tasks(api: Api) -> None:
    alice, bob = api.ec2(ALICE), api.ec2(BOB)
    mine = {"volume": new_volume(alice), "image": new_image(alice), "snapshot": new_snapshot(alice)}
    theirs = {"volume": new_volume(bob), "image": new_image(bob), "snapshot": new_snapshot(bob)}
    for key, expected in ((ALICE, mine), (ALICE2, mine), (BOB, theirs)):
        ec2 = api.ec2(key)
        listed = {
            "volume": [t["ConversionTaskId"] for t in ec2.describe_conversion_tasks()["ConversionTasks"]],
            "image": [t["ImportTaskId"] for t in ec2.describe_import_image_tasks()["ImportImageTasks"]],
            "snapshot": [
                t["ImportTaskId"] for t in ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"]
            ],
        }
        assert listed == {kind: [task_id] for kind, task_id in expected.items()}, key
    # a page token names a task: one naming another account's task is as invalid as one naming none
    new_image(alice)
    token = alice.describe_import_image_tasks(MaxResults=1)["NextToken"]
    unknown = base64.urlsafe_b64encode(f"after:{new_task_id(IMPORT_IMAGE)}".encode()).decode()
    refused = [
        api.call(BOB, {"Action": "DescribeImportImageTasks", "NextToken": t}) for t in (token, unknown)
    ]
    assert refused[0].status == 400 and b"InvalidPaginationToken" in refused[0].body
    assert refused[0].shape(token) == refused[1].shape(unknown)


def test_bob_cannot_cancel_alices_task_and_alices_other_key_can(api: Api) -> None:
    task_id = new_snapshot(api.ec2(ALICE))
    with pytest.raises(ClientError) as info:
        api.ec2(BOB).cancel_import_task(ImportTaskId=task_id)
    assert info.value.response["Error"]["Code"] == "InvalidConversionTaskId"
    assert state_of(describe_one(api.ec2(ALICE), task_id)) == "active"
    cancelled = api.ec2(ALICE2).cancel_import_task(ImportTaskId=task_id)
    assert (cancelled["PreviousState"], cancelled["State"]) == ("active", "deleted")


def test_a_second_appliance_on_the_same_store_answers_for_the_first_ones_tasks(
    api: Api, tmp_path: Path
) -> None:
    port = free_port()
    cfg = tmp_path / "second.yaml"
    write_config(cfg, port, config_mod.load(api.config).state_dir)
    with api_server(cfg, f"http://127.0.0.1:{port}"):
        second = Api(f"http://127.0.0.1:{port}", cfg)
        task_id = new_snapshot(api.ec2(ALICE), ClientToken="across-appliances")
        assert new_snapshot(second.ec2(ALICE2), ClientToken="across-appliances") == task_id
        assert state_of(describe_one(second.ec2(ALICE2), task_id)) == "active"
        with pytest.raises(ClientError) as info:
            second.ec2(BOB).cancel_import_task(ImportTaskId=task_id)
        assert info.value.response["Error"]["Code"] == "InvalidConversionTaskId"
        assert second.ec2(ALICE).cancel_import_task(ImportTaskId=task_id)["State"] == "deleted"
        assert state_of(describe_one(api.ec2(ALICE), task_id)) == "deleted"
        assert second.admin_json(ADMIN, f"/v1/tasks/{task_id}")["account"] == "acct-a"


# -- ClientToken: unique within an account ----------------------------------------------------------


def test_the_same_client_token_in_two_accounts_creates_two_tasks(api: Api) -> None:
    first = new_snapshot(api.ec2(ALICE), "disk.raw", ClientToken="shared-token")
    # another account, the same token and request: a task of its own
    other = new_snapshot(api.ec2(BOB), "disk.raw", ClientToken="shared-token")
    assert other != first
    # another account, the same token for another request: not a mismatch (that would tell bob
    # the token is taken), just another task
    other_request = new_snapshot(api.ec2(BOB), "else.raw", ClientToken="token-of-alice")
    assert other_request not in (first, other)
    assert new_snapshot(api.ec2(ALICE), "x.raw", ClientToken="token-of-alice") != other_request
    # within an account the token holds across its keys and for a front end acting for it
    assert new_snapshot(api.ec2(ALICE2), "disk.raw", ClientToken="shared-token") == first
    assert new_snapshot(api.ec2(FRONT, "acct-a"), "disk.raw", ClientToken="shared-token") == first
    with pytest.raises(ClientError) as info:
        new_snapshot(api.ec2(ALICE2), "changed.raw", ClientToken="shared-token")
    assert info.value.response["Error"]["Code"] == "IdempotentParameterMismatch"
    accounts = api.accounts()
    assert (accounts[first], accounts[other], accounts[other_request]) == ("acct-a", "acct-b", "acct-b")
    assert len(accounts) == 4


# -- the front end's account header -------------------------------------------------------------------


def test_front_end_acts_for_the_account_in_its_signed_header(api: Api) -> None:
    for_alice = api.ec2(FRONT, "acct-a")
    task_id = new_snapshot(for_alice)
    volume = new_volume(for_alice)
    instance, image = new_instance(for_alice), new_image(for_alice)
    assert api.accounts() == {task_id: "acct-a", volume: "acct-a", instance: "acct-a", image: "acct-a"}
    # the account sees it through its own keys; nobody else does, the front end's own account neither
    assert state_of(describe_one(api.ec2(ALICE), task_id)) == "active"
    listed = api.ec2(ALICE).describe_conversion_tasks()["ConversionTasks"]
    assert [t["ConversionTaskId"] for t in listed] == [instance, volume]
    for ec2 in (api.ec2(BOB), api.ec2(FRONT), api.ec2(FRONT, "acct-b")):
        assert ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"] == []
        with pytest.raises(ClientError) as info:
            ec2.cancel_import_task(ImportTaskId=task_id)
        assert info.value.response["Error"]["Code"] == "InvalidConversionTaskId"
    assert for_alice.describe_import_snapshot_tasks()["ImportSnapshotTasks"][0]["ImportTaskId"] == task_id
    assert for_alice.cancel_import_task(ImportTaskId=task_id)["State"] == "deleted"
    # any account may be named, configured or not
    new = new_snapshot(api.ec2(FRONT, "tenant-0042"))
    assert api.accounts()[new] == "tenant-0042"
    # without the header the front end is its own account
    own = new_image(api.ec2(FRONT))
    assert api.accounts()[own] == "cloud-front"
    assert [t["ImportTaskId"] for t in api.ec2(FRONT).describe_import_image_tasks()["ImportImageTasks"]] == [
        own
    ]


def test_account_header_from_a_key_that_is_not_a_front_end_is_ignored(api: Api) -> None:
    alices = new_snapshot(api.ec2(ALICE))
    for key, account in ((BOB, "acct-b"), (ADMIN, "ops"), (LEGACY, LEGACY.access)):
        for signed in (True, False):
            ec2 = api.ec2(key, "acct-a", signed=signed)
            created = new_snapshot(ec2, f"{account}-{signed}.raw")
            assert api.accounts()[created] == account, (key, signed)
            assert alices not in {
                t["ImportTaskId"] for t in ec2.describe_import_snapshot_tasks()["ImportSnapshotTasks"]
            }
            with pytest.raises(ClientError) as info:
                ec2.cancel_import_task(ImportTaskId=alices)
            assert info.value.response["Error"]["Code"] == "InvalidConversionTaskId"
    assert state_of(describe_one(api.ec2(ALICE), alices)) == "active"


def test_unsigned_account_header_from_a_front_end_is_refused(api: Api) -> None:
    ec2 = api.ec2(FRONT, "acct-a", signed=False)
    for call in (lambda: new_snapshot(ec2), ec2.describe_import_snapshot_tasks, lambda: new_volume(ec2)):
        with pytest.raises(ClientError) as info:
            call()
        error = info.value.response["Error"]
        assert error["Code"] == "IncompleteSignature"
        assert "X-Imaging-Account" in error["Message"] and "SignedHeaders" in error["Message"]
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert api.accounts() == {}  # nothing was created, under any account


def test_presigned_request_honours_the_account_header_only_when_it_is_signed(api: Api) -> None:
    alices = new_snapshot(api.ec2(ALICE))
    describe = {"Action": "DescribeImportSnapshotTasks", "Version": model.API_VERSION}

    def presigned(headers: dict[str, str]) -> str:
        request = AWSRequest(
            method="GET",
            url=f"{api.endpoint}/",
            params=describe,
            headers={"Host": urlsplit(api.endpoint).netloc} | headers,
        )
        signer = SigV4QueryAuth(Credentials(FRONT.access, FRONT.secret), "ec2", REGION, expires=60)
        signer.add_auth(request)
        return request.url

    with_header = presigned({HEADER: "acct-a"})
    assert "x-imaging-account" in with_header  # in X-Amz-SignedHeaders
    answer = fetch(urllib.request.Request(with_header, headers={HEADER: "acct-a"}))
    assert answer.status == 200, answer.body
    assert alices.encode() in answer.body
    without = presigned({})
    refused = fetch(urllib.request.Request(without, headers={HEADER: "acct-a"}))
    assert refused.status == 400 and b"IncompleteSignature" in refused.body, refused.body
    # the same URL without the header: the front end's own account, which has no task
    own = fetch(urllib.request.Request(without))
    assert own.status == 200 and b"import-snap-" not in own.body


@pytest.mark.parametrize("value", ["acct a", "acct/a", "-acct", "a" * 129, "ac\u00e7t"])
def test_account_header_that_is_no_account_name_is_refused(api: Api, value: str) -> None:
    answer = api.call(FRONT, {"Action": "DescribeImportSnapshotTasks"}, signed={HEADER: value})
    assert answer.status == 400, answer.body
    assert b"<Code>InvalidParameterValue</Code>" in answer.body
    assert b"X-Imaging-Account" in answer.body
    # the same header from a user key is ignored, whatever it holds
    assert api.call(BOB, {"Action": "DescribeImportSnapshotTasks"}, signed={HEADER: value}).status == 200


# -- keys from before accounts ------------------------------------------------------------------------


def test_a_key_without_an_account_keeps_seeing_the_tasks_from_before_accounts(api: Api) -> None:
    # a conversion task as the API recorded it before accounts existed: no account
    service = api.service()
    try:
        old = service.import_volume(
            DiskImage(format="RAW", bytes=GiB, manifest_url=MANIFEST, volume_size=1),
            availability_zone="us-east-1a",
            description="from before accounts",
        ).id
    finally:
        service.store.close()
    new = new_snapshot(api.ec2(LEGACY))
    assert api.accounts() == {old: None, new: LEGACY.access}
    legacy = api.ec2(LEGACY)
    assert [t["ConversionTaskId"] for t in legacy.describe_conversion_tasks()["ConversionTasks"]] == [old]
    # a key with an account does not see it; the admin does, as a task without an account
    for key in (ALICE, FRONT):
        assert api.ec2(key).describe_conversion_tasks()["ConversionTasks"] == []
    assert api.admin_json(LEGACY, f"/v1/tasks/{old}")["account"] is None
    assert {t["id"] for t in api.admin_json(LEGACY, "/v1/tasks")["tasks"]} == {old, new}
    assert api.admin(ALICE, f"/v1/tasks/{old}").status == 404
    legacy.cancel_conversion_task(ConversionTaskId=old)
    assert legacy.describe_conversion_tasks()["ConversionTasks"][0]["State"] == "cancelled"


# -- the admin API -----------------------------------------------------------------------------------


def test_admin_api_shows_every_account_to_admins_and_only_their_own_to_others(api: Api) -> None:
    alices = new_snapshot(api.ec2(ALICE))
    bobs = new_volume(api.ec2(BOB))
    fronts = new_image(api.ec2(FRONT, "acct-a"))
    everything = api.admin_json(ADMIN, "/v1/tasks")["tasks"]
    assert {t["id"]: t["account"] for t in everything} == {alices: "acct-a", bobs: "acct-b", fronts: "acct-a"}
    assert api.admin_json(ADMIN, f"/v1/tasks/{bobs}")["account"] == "acct-b"
    assert {t["id"] for t in api.admin_json(ALICE, "/v1/tasks")["tasks"]} == {alices, fronts}
    assert {t["id"] for t in api.admin_json(BOB, "/v1/tasks")["tasks"]} == {bobs}
    assert api.admin_json(ALICE2, f"/v1/tasks/{fronts}")["account"] == "acct-a"
    # the front end is its own account here: Basic auth signs no header, so none is honoured
    assert api.admin_json(FRONT, "/v1/tasks")["tasks"] == []
    assert api.admin(FRONT, f"/v1/tasks/{alices}", **{HEADER: "acct-a"}).status == 404
    assert api.admin_json(FRONT, f"/v1/tasks?kind={IMPORT_SNAPSHOT}")["tasks"] == []
    # another account's task, as a task and as a page marker: exactly an unknown one
    unknown = new_task_id(IMPORT_VOLUME)
    theirs, nobody = api.admin(ALICE, f"/v1/tasks/{bobs}"), api.admin(ALICE, f"/v1/tasks/{unknown}")
    assert theirs.status == 404
    assert theirs.shape(bobs) == nobody.shape(unknown)
    theirs = api.admin(ALICE, f"/v1/tasks?marker={bobs}")
    nobody = api.admin(ALICE, f"/v1/tasks?marker={unknown}")
    assert theirs.status == 400 and json.loads(theirs.body)["error"]["code"] == "InvalidMarker"
    assert theirs.shape(bobs) == nobody.shape(unknown)
    # aggregate routes answer every key alike
    for key in (ALICE, BOB, FRONT, ADMIN):
        assert api.admin(key, "/metrics").status == 200
        assert api.admin(key, "/v1/info").status == 200


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.access)
def test_admin_api_refuses_a_wrong_secret_whatever_the_role(api: Api, key: Key) -> None:
    for path in ("/v1/tasks", f"/v1/tasks/{new_task_id(IMPORT_IMAGE)}", "/metrics"):
        for secret in ("wrong-secret-0123456789abcdef", ADMIN.secret if key is not ADMIN else ALICE.secret):
            answer = api.admin(key, path, secret=secret)
            assert answer.status == 401, (path, answer.body)
            assert json.loads(answer.body)["error"]["code"] == "AuthFailure"
            assert "www-authenticate" in {name.lower() for name in answer.headers}


# -- the AWS CLI as a front end ------------------------------------------------------------------------


def aws(api: Api, key: Key, config: Path, *args: str, account: str | None = None) -> Any:
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=key.access,
        AWS_SECRET_ACCESS_KEY=key.secret,
        AWS_CONFIG_FILE=str(config),
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_MAX_ATTEMPTS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    env.pop("AWS_PROFILE", None)
    env.pop(awscli_account_header.ENV, None)
    if account is not None:
        env[awscli_account_header.ENV] = account
    proc = subprocess.run(
        [str(AWS), "ec2", *args, "--endpoint-url", api.endpoint, "--region", REGION, "--output", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(not AWS.exists(), reason="the AWS CLI is not installed in this environment")
def test_aws_cli_front_end_names_the_account_with_a_plugin(api: Api, tmp_path: Path) -> None:
    config = tmp_path / "aws-config"
    config.write_text(f"[plugins]\nimaging_account = {awscli_account_header.__name__}\n")
    container = "Format=RAW,UserBucket={S3Bucket=disks,S3Key=cli.raw}"
    created = aws(api, FRONT, config, "import-snapshot", "--disk-container", container, account="acct-a")
    task_id = created["ImportTaskId"]
    assert api.accounts() == {task_id: "acct-a"}
    listed = aws(api, FRONT, config, "describe-import-snapshot-tasks", account="acct-a")
    assert [t["ImportTaskId"] for t in listed["ImportSnapshotTasks"]] == [task_id]
    assert state_of(describe_one(api.ec2(ALICE), task_id)) == "active"
    # the same CLI without the account: the front end's own account, which has no task
    assert aws(api, FRONT, config, "describe-import-snapshot-tasks")["ImportSnapshotTasks"] == []
    # the plugin's header from a user key changes nothing
    assert (
        aws(api, BOB, config, "describe-import-snapshot-tasks", account="acct-a")["ImportSnapshotTasks"] == []
    )


# -- Signature Version 2 signs no header ----------------------------------------------------------------


def test_sigv2_request_of_a_front_end_cannot_name_an_account(tmp_path: Path) -> None:
    config = config_mod.from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "api": {"credentials": [k.entry() for k in KEYS], "sigv2": True},
            "sources": {"allowed_endpoints": [MANIFEST_BASE]},
        }
    )
    app: falcon.App = ec2_app(config, ImportService(config))

    def sigv2(key: Key, headers: dict[str, str]) -> Prepared:
        params = {"Action": "DescribeConversionTasks", "Version": model.API_VERSION}
        params["Timestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        request = AWSRequest(method="POST", url=f"http://{HOST}/", data=params)
        SigV2Auth(Credentials(key.access, key.secret)).add_auth(request)
        body = request.prepare().body
        data = body.encode() if isinstance(body, str) else body
        return Prepared("POST", "", {"Host": HOST, "Content-Type": FORM} | headers, data)

    assert parse("DescribeConversionTasks", send(app, sigv2(FRONT, {})))["ConversionTasks"] == []
    status, code, message = error_of(send(app, sigv2(FRONT, {HEADER: "acct-a"})))
    assert (status, code) == (400, "IncompleteSignature") and "X-Imaging-Account" in message
    # from a user key the header is ignored
    assert send(app, sigv2(BOB, {HEADER: "acct-a"})).status_code == 200
    # SigV4 from the same front end, the header signed: honoured
    req = sign(
        {"Action": "DescribeConversionTasks", "Version": model.API_VERSION},
        access_key=FRONT.access,
        secret_key=FRONT.secret,
        extra_headers={HEADER: "acct-a"},
    )
    assert "x-imaging-account" in req.headers["Authorization"]
    assert send(app, req).status_code == 200
