"""``imaging copy-image`` as a user runs it: a real process copying a snapshot a real import stored
(from a moto server process) to a directory and to a bucket, progress on stderr, the result on stdout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer
from appliance.store import TaskState
from appliance.workflow.engine import Engine
from tests.servers import MotoServer

pytestmark = pytest.mark.slow

MiB = 1 << 20


def imaging(*args: str | Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("IMAGING_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "-c", str(config), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_copy_image_copies_a_snapshot_to_a_directory_and_a_bucket_printing_progress_and_result(
    tmp_path: Path, moto: MotoServer
) -> None:
    s3 = moto.client("s3")
    bucket = "cli-copy-image"
    s3.create_bucket(Bucket=bucket)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"".join(hashlib.sha256(str(i).encode()).digest() * (MiB // 32) for i in range(6)))
    s3.upload_file(str(disk), bucket, "disk.raw")
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "sources": {
            "allowed_endpoints": [moto.endpoint],
            "s3": {
                "endpoint_url": moto.endpoint,
                "region": "us-east-1",
                "access_key": "testing",
                "secret_key": "testing",
            },
        },
    }
    config = tmp_path / "imaging.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = config_mod.load(config)
    imports = ImportService(cfg)
    try:
        task = imports.import_snapshot(DiskContainer(format="RAW", bucket=bucket, key="disk.raw"))
        done = Engine(cfg, imports.store, poll_interval=0.1).run(task.id)
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    finally:
        imports.store.close()
    snapshot_id = "snap-" + done.id[-17:]
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()

    target = tmp_path / "copies"
    r = imaging("copy-image", snapshot_id, "--to", f"file://{target}", "--progress", "json", config=config)
    assert r.returncode == 0, r.stderr
    assert f"{snapshot_id}: copied to {target}/copy-" in r.stdout and f"sha256 {digest}" in r.stdout
    lines = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["phase"] == "copying" and lines[-1]["done"] == disk.stat().st_size
    [copy] = target.iterdir()
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest

    r = imaging(
        "copy-image",
        snapshot_id,
        "--to",
        f"s3://{bucket}/copies/",
        "--json",
        "--progress",
        "none",
        config=config,
    )
    assert r.returncode == 0, r.stderr
    task_doc = json.loads(r.stdout)
    key = f"copies/{task_doc['id']}.raw"
    assert task_doc["state"] == "completed" and task_doc["result"]["copied"]["location"]["key"] == key
    assert hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest() == digest

    r = imaging("copy-image", "snap-0123456789abcdef0", "--to", f"s3://{bucket}", config=config)
    assert r.returncode == 1
    assert r.stderr.startswith("imaging: InvalidSnapshot.NotFound: ")
