"""The provenance record names the hook set a task ran with: ``workflow.hooks_sha256`` is the sha256
of the hooks recorded on the task (canonical JSON), so two imports run under different operator hooks
say so. An ImportSnapshot through the service and the engine, the disk in S3 on the moto server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer
from appliance.store import TaskState
from appliance.workflow.engine import Engine
from appliance.workflow.hookpoints import HOOKS_RECORD
from tests import stores
from tests.appliance.service.test_imports import cfg_data
from tests.servers import MotoServer

POLICY = {"hook": "policy", "with": {"allow_formats": ["raw"], "max_virtual_size": "1GiB"}}


def _import(tmp_path: Path, moto: MotoServer, bucket: str, hooks: dict[str, Any] | None) -> dict[str, Any]:
    data = cfg_data(tmp_path, moto)
    if hooks is not None:
        data["hooks"] = {"points": hooks}
    cfg = stores.config(data, base_dir=tmp_path)
    service = ImportService(cfg)
    engine = Engine(cfg, poll_interval=0.1)
    try:
        task = service.import_snapshot(DiskContainer(format="RAW", bucket=bucket, key="disk.raw"))
        done = engine.run(task.id)
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        recorded = service.store.record(task.id, HOOKS_RECORD)
        return {"record": done.result["provenance"]["workflow"], "hooks": recorded}
    finally:
        engine.store.close()
        service.store.close()


def test_an_import_run_under_a_hook_records_the_digest_of_that_hook_set(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"data" * 1024 + bytes(4 << 20))
    moto.client("s3").upload_file(str(disk), bucket, "disk.raw")
    plain = _import(tmp_path / "plain", moto, bucket, None)
    hooked = _import(tmp_path / "hooked", moto, bucket, {"after_convert": [POLICY]})
    none = hashlib.sha256(b"{}").hexdigest()
    assert plain["record"]["hooks_sha256"] == none
    assert hooked["hooks"] and hooked["hooks"]["after_convert"][0]["hook"] == "policy"
    canonical = json.dumps(hooked["hooks"], sort_keys=True).encode()
    assert hooked["record"]["hooks_sha256"] == hashlib.sha256(canonical).hexdigest() != none
    # the workflow file is the same shipped one either way
    assert hooked["record"]["workflow_sha256"] == plain["record"]["workflow_sha256"]
