"""No secret reaches any output.

A configuration full of secrets (API secret key, S3 source secret key, controller secret, artifact
store secret key, a password in a hook's ``with``) and tasks full of them (presigned SigV4 manifest
and part URLs with a security token, an EC2 client with a session token, an https URL with user
info, a cancel reason quoting a presigned URL, a plugin hook that logs, emits and fails with its
password and a signed URL) are driven through the real processes: `imaging serve` (gunicorn),
`imaging worker` and its task children, moto S3, the reference controller
(``python -m appliance.report.receiver``). Then every output surface is captured and scanned: the
API's and the worker's logs, events and error messages in the store, the admin API, ``/metrics``,
raw and parsed EC2 Describe* responses and error messages, ``imaging config show``, ``imaging
tasks show``/``list`` and the reports the controller received.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.config
import botocore.exceptions
import pytest
import yaml

from appliance import config as config_mod
from appliance.sources.manifest import parse_manifest
from tests import stores
from tests.api.e2e_support import conversion_task, wait_for
from tests.euca_upload import presign_manifest_url, random_file, upload
from tests.processes import stop_process
from tests.servers import REGION, MotoServer, free_port, wait_for_http

pytestmark = pytest.mark.slow

MiB = 1 << 20
MARKER = "REDACTED"

# Letters and digits only, so that no encoding (URL, JSON, XML) could hide one from the scan.
API_ACCESS_KEY = "AKIAREDACTIONTEST001"
API_SECRET = "ApiSecretKeyRedactionTest0000000000000001"
API_SESSION_TOKEN = "ApiSessionTokenRedactionTest00000000000002"
S3_SECRET = "S3SourceSecretKeyRedactionTest000000003"
CONTROLLER_SECRET = "ControllerSharedSecretRedactionTest0004"
ARTIFACT_SECRET = "ArtifactStoreSecretKeyRedactionTest0005"
HOOK_PASSWORD = "HookPasswordRedactionTest0000006"
USERINFO_PASSWORD = "UserinfoPasswordRedactionTest0007"
#: the uploader's access key: it appears only inside presigned URLs (X-Amz-Credential)
UPLOADER_ACCESS_KEY = "AKIAUPLOADERREDACT08"
UPLOAD_SESSION_TOKEN = "UploadSessionTokenRedactionTest000000009"
#: the task database's password (on PostgreSQL the role really logs in with it)
STORE_PASSWORD = "StorePasswordRedactionTest00000000010"

AUDIT_PLUGIN = '''
import logging

from appliance.errors import ImagingError
from appliance.workflow.step import Step

log = logging.getLogger("site.audit")


class Audit(Step):
    """An operator hook that is careless with its secrets: it logs them, puts them in an event and
    fails with them in its message."""

    schema = {
        "type": "object",
        "required": ["image", "password", "report_url"],
        "properties": {
            "image": {"type": "object"},
            "password": {"type": "string"},
            "report_url": {"type": "string"},
        },
    }

    def run(self, ctx, image, password, report_url):
        log.warning("audit: signing in to %s with password %s", report_url, password)
        ctx.event("site.audit", note=f"signing in to {report_url} as ops/{password}")
        raise ImagingError(
            f"the audit service at {report_url} refused the password {password}", code="Site.AuditRefused"
        )


STEPS = {"site.audit": Audit}
'''


@dataclass
class Secretive:
    """The running appliance whose configuration is full of secrets, and what it writes."""

    endpoint: str
    config: Path
    state: Path
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    api_log: Path
    worker_log: Path
    reports: Path
    ec2: Any
    #: the audit hook's report URL: user info and a signature
    audit_url: str


@pytest.fixture
def secretive(tmp_path: Path, moto: MotoServer) -> Iterator[Secretive]:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "audit.py").write_text(AUDIT_PLUGIN)
    audit_url = (
        f"https://ops:{USERINFO_PASSWORD}@audit.example/in?X-Amz-Signature=feedface{UPLOAD_SESSION_TOKEN}"
    )
    receiver_port, api_port = free_port(), free_port()
    reports = tmp_path / "controller.jsonl"
    receiver = subprocess.Popen(
        [
            *(sys.executable, "-m", "appliance.report.receiver"),
            *("--bind", f"127.0.0.1:{receiver_port}", "--secret", CONTROLLER_SECRET, "--log", str(reports)),
        ],
        stderr=subprocess.DEVNULL,
    )
    state = tmp_path / "state"
    config = tmp_path / "imaging.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(state),
                "log_level": "debug",
                "api": {
                    "bind": f"127.0.0.1:{api_port}",
                    "workers": 1,
                    "credentials": [{"access_key": API_ACCESS_KEY, "secret_key": API_SECRET}],
                },
                "sources": {
                    "allowed_endpoints": [moto.endpoint],
                    "manifest_poll_interval": 0.2,
                    "manifest_poll_max_interval": 0.5,
                    "s3": {
                        "endpoint_url": moto.endpoint,
                        "region": REGION,
                        "access_key": "AKIAS3SOURCE00000001",
                        "secret_key": S3_SECRET,
                    },
                },
                "controller": {
                    "url": f"http://127.0.0.1:{receiver_port}",
                    "secret": CONTROLLER_SECRET,
                    "appliance_id": "redaction-01",
                    "mode": "push",
                    "report_interval": 1,
                    "progress_interval": 0,
                },
                "artifacts": {
                    "bucket": "redaction-artifacts",
                    "endpoint_url": moto.endpoint,
                    "access_key": "AKIAARTIFACTS0000001",
                    "secret_key": ARTIFACT_SECRET,
                },
                "hooks": {
                    "plugins_dir": str(plugins),
                    "points": {
                        "before_write": [
                            {
                                "hook": "site.audit",
                                "with": {"password": HOOK_PASSWORD, "report_url": audit_url},
                            }
                        ]
                    },
                },
                "worker": {"concurrency": 2, "poll_interval": 0.2},
                "tasks": {"lease_seconds": 5},
                "store": stores.with_password(STORE_PASSWORD),
                "targets": {
                    "volume": {"type": "file", "shared": True}
                },  # a fleet's volumes: on one machine here
            }
        )
    )
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    with open(api_log, "wb") as api_err, open(worker_log, "wb") as worker_err:
        api = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "-c", str(config), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=api_err,
        )
        worker = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "-c", str(config), "-v", "worker"],
            stdout=subprocess.DEVNULL,
            stderr=worker_err,
        )
    endpoint = f"http://127.0.0.1:{api_port}"
    try:
        wait_for_http(f"http://127.0.0.1:{receiver_port}/health", proc=receiver)
        wait_for_http(f"{endpoint}/v1/health", proc=api)
        ec2 = boto3.client(
            "ec2",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=API_ACCESS_KEY,
            aws_secret_access_key=API_SECRET,
            aws_session_token=API_SESSION_TOKEN,
        )
        yield Secretive(endpoint, config, state, api, worker, api_log, worker_log, reports, ec2, audit_url)
    finally:
        stop_process(worker)
        stop_process(api)
        stop_process(receiver)


def uploader_s3(moto: MotoServer) -> Any:
    """The uploading client (euca2ools' role): SigV4 presigned URLs carrying a security token."""
    return boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        region_name=REGION,
        aws_access_key_id=UPLOADER_ACCESS_KEY,
        aws_secret_access_key="UploaderSecretNeverGivenToTheAppliance0",
        aws_session_token=UPLOAD_SESSION_TOKEN,
        config=botocore.config.Config(signature_version="s3v4"),
    )


def signatures(*urls: str) -> set[str]:
    """The signature values of presigned URLs."""
    found = set()
    for url in urls:
        query = parse_qs(urlsplit(url).query)
        found.update(query.get("X-Amz-Signature", []) + query.get("Signature", []))
    assert found and all(len(s) >= 16 for s in found), urls
    return found


def admin_get(app: Secretive, path: str) -> str:
    token = base64.b64encode(f"{API_ACCESS_KEY}:{API_SECRET}".encode()).decode()
    req = urllib.request.Request(f"{app.endpoint}{path}", headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read().decode()


def cli(app: Secretive, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "-c", str(app.config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def store_text(config: Path) -> tuple[str, str]:
    """(what the store keeps for people and the controller: events, status and error messages, step
    errors, cancel reasons; what it keeps to run tasks: params, step arguments and task records)."""
    db = config_mod.load(config).store

    def rows(statement: str) -> list[Any]:
        return stores.sql(db, statement)

    shown = [
        *(r[0] for r in rows("SELECT data FROM events")),
        *(
            json.dumps([r[0], r[1], r[2]])
            for r in rows("SELECT status_message, error_message, cancel_reason FROM tasks")
        ),
        *(r[0] or "" for r in rows("SELECT error FROM steps")),
    ]
    kept = [
        *(r[0] for r in rows("SELECT params FROM tasks")),
        *(r[0] for r in rows("SELECT args FROM steps")),
        *(r[0] for r in rows("SELECT data FROM task_records")),
    ]
    return "\n".join(shown), "\n".join(kept)


def reports_received(app: Secretive) -> list[dict[str, Any]]:
    if not app.reports.exists():
        return []
    return [json.loads(line)["message"] for line in app.reports.read_text().splitlines()]


def reported_state(app: Secretive, task_id: str, state: str) -> bool:
    return any(
        m.get("event") == "state" and m["task"]["id"] == task_id and m["task"]["state"] == state
        for m in reports_received(app)
    )


def test_no_secret_reaches_any_log_view_report_or_cli_output(
    secretive: Secretive, moto: MotoServer, tmp_path: Path
) -> None:
    app = secretive
    bucket = "redaction-uploads"
    moto.client("s3").create_bucket(Bucket=bucket)
    s3 = uploader_s3(moto)
    disk = random_file(tmp_path / "disk.raw", 3 * MiB)

    # A: euca2ools-style ImportVolume, created before the upload; the audit hook fails it at before_write
    pending = presign_manifest_url(s3, bucket, "euca", disk)
    assert UPLOAD_SESSION_TOKEN in pending.url and "X-Amz-Signature=" in pending.url
    failing = app.ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": disk.stat().st_size, "ImportManifestUrl": pending.url},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]
    wait_for(
        lambda: conversion_task(app.ec2, failing)["StatusMessage"] == "Pending import-image upload",
        what="task A waiting for its upload",
    )
    manifest = parse_manifest(upload(s3, pending, disk, part_size=MiB))
    part_urls = [u for p in manifest.parts for u in (p.head_url, p.get_url, p.delete_url) if u]

    # D: an upload that never comes, cancelled with a reason that quotes a presigned URL
    never = presign_manifest_url(s3, bucket, "never", disk)
    elsewhere = s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "other"}, ExpiresIn=600
    )
    cancelled = app.ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": disk.stat().st_size, "ImportManifestUrl": never.url},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]
    wait_for(
        lambda: conversion_task(app.ec2, cancelled)["StatusMessage"] == "Pending import-image upload",
        what="task D waiting for its upload",
    )
    app.ec2.cancel_conversion_task(
        ConversionTaskId=cancelled, ReasonMessage=f"uploaded to {elsewhere} instead"
    )

    # an import URL with user info is refused at the API
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        app.ec2.import_image(
            DiskContainers=[
                {"Format": "RAW", "Url": f"https://ops:{USERINFO_PASSWORD}@objects.example/d.raw"}
            ]
        )
    assert refused.value.response["Error"]["Code"] == "InvalidParameterValue"

    wait_for(lambda: conversion_task(app.ec2, failing)["State"] == "cancelled", what="task A to fail")
    wait_for(lambda: conversion_task(app.ec2, cancelled)["State"] == "cancelled", what="task D to cancel")
    wait_for(lambda: reported_state(app, failing, "failed"), what="the controller to hear that A failed")
    wait_for(lambda: reported_state(app, cancelled, "cancelled"), what="the controller to hear of D")
    status = conversion_task(app.ec2, failing)["StatusMessage"]
    # the failure is the hook's, with its message: the path carried the secrets all the way
    assert status.startswith("ClientError: Site.AuditRefused: ")
    said = "audit service at https://REDACTED@audit.example/in?X-Amz-Signature=REDACTED refused the password"
    assert f"{said} REDACTED" in status

    # -- capture every surface ------------------------------------------------------------------
    presigned_describe = app.ec2.generate_presigned_url(
        "describe_conversion_tasks", Params={}, ExpiresIn=300, HttpMethod="GET"
    )
    with urllib.request.urlopen(presigned_describe, timeout=30) as resp:
        raw_describe = resp.read().decode()
    surfaces: dict[str, str] = {
        "ec2 DescribeConversionTasks (presigned GET, raw XML)": raw_describe,
        "ec2 DescribeConversionTasks": json.dumps(app.ec2.describe_conversion_tasks(), default=str),
        "ec2 DescribeImportImageTasks": json.dumps(app.ec2.describe_import_image_tasks(), default=str),
        "ec2 DescribeImportSnapshotTasks": json.dumps(app.ec2.describe_import_snapshot_tasks(), default=str),
        "ec2 error message": json.dumps(refused.value.response["Error"]),
        "GET /v1/tasks": admin_get(app, "/v1/tasks"),
        "GET /v1/tasks/A": admin_get(app, f"/v1/tasks/{failing}"),
        "GET /v1/tasks/D": admin_get(app, f"/v1/tasks/{cancelled}"),
        "GET /v1/info": admin_get(app, "/v1/info"),
        "GET /v1/health": admin_get(app, "/v1/health"),
        "GET /metrics": admin_get(app, "/metrics"),
        "imaging config show": cli(app, "config", "show"),
        "imaging tasks show A": cli(app, "tasks", "show", failing),
        "imaging tasks show A --json": cli(app, "tasks", "show", failing, "--json"),
        "imaging tasks show D --json": cli(app, "tasks", "show", cancelled, "--json"),
        "imaging tasks list": cli(app, "tasks", "list"),
        "imaging tasks list --json": cli(app, "tasks", "list", "--json"),
    }
    # the processes stop (by PID) so that their last words are in the logs and the reports
    stop_process(app.worker)
    stop_process(app.api)
    shown, kept = store_text(app.config)
    surfaces.update(
        {
            "api log": app.api_log.read_text(),
            "worker and task logs": app.worker_log.read_text(),
            "store: events, messages, step errors": shown,
            "reports received by the controller": app.reports.read_text(),
        }
    )

    secrets = {
        "api secret key": API_SECRET,
        "api session token": API_SESSION_TOKEN,
        "s3 source secret key": S3_SECRET,
        "controller secret": CONTROLLER_SECRET,
        "artifact store secret key": ARTIFACT_SECRET,
        "hook password": HOOK_PASSWORD,
        "url user info password": USERINFO_PASSWORD,
        "uploader access key (X-Amz-Credential)": UPLOADER_ACCESS_KEY,
        "upload security token": UPLOAD_SESSION_TOKEN,
        "task database password": STORE_PASSWORD,
    }
    for n, sig in enumerate(sorted(signatures(pending.url, never.url, elsewhere, *part_urls))):
        secrets[f"presigned S3 signature {n}"] = sig
    for sig in signatures(presigned_describe):
        secrets["presigned EC2 request signature"] = sig

    # The secrets were really in play: the tasks kept them to run (params, step arguments, records),
    # and the hook ran with its real password, not with the marker.
    for secret in (HOOK_PASSWORD, UPLOAD_SESSION_TOKEN, UPLOADER_ACCESS_KEY, *signatures(pending.url)):
        assert secret in kept
    [(hook_args,)] = stores.sql(
        config_mod.load(app.config).store,
        "SELECT args FROM steps WHERE task_id = ? AND action = ?",
        (failing, "site.audit"),
    )
    assert json.loads(hook_args)["password"] == HOOK_PASSWORD

    # Every capture holds something, and where a secret went through, the marker stands in its place.
    for name, text in surfaces.items():
        assert text.strip(), f"{name}: nothing captured"
    marked = [
        "ec2 DescribeConversionTasks (presigned GET, raw XML)",
        "ec2 DescribeConversionTasks",
        "GET /v1/tasks/A",
        "GET /v1/tasks/D",
        "imaging config show",
        "imaging tasks show A",
        "imaging tasks show A --json",
        "imaging tasks show D --json",
        "api log",
        "worker and task logs",
        "store: events, messages, step errors",
        "reports received by the controller",
    ]
    unmarked = [name for name in marked if MARKER not in surfaces[name]]
    assert unmarked == [], f"no {MARKER} where a secret passed: {unmarked}"

    leaks = [
        f"{what} in {name}"
        for name, text in surfaces.items()
        for what, secret in secrets.items()
        if secret in text
    ]
    assert leaks == []
