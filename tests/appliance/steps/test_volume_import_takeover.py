"""An ImportVolume taken over by another appliance resumes from its checkpoint in the task database.

Two appliances (``imaging worker`` processes, each with a state directory and scratch of its own) share
one PostgreSQL database (the session's test server, a fresh schema) and one volume directory
(``targets.volume.shared``). Appliance A writes the upload onto the volume until the proxy in front of
moto holds a part near its end; A is killed with SIGKILL (its worker and the task's process, at one
moment); B takes the task over. The parts A verified, wrote and checkpointed are not fetched again:
the checkpoint was in A's scratch before, which B does not have, so B started from part 0.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance.service.imports import ImportService
from appliance.store import TaskState
from tests import processes
from tests.appliance.steps.test_volume_import_streams import (
    cfg_data,
    convert_raw,
    disk_with_data,
    same_disk,
    submit,
    volume_path,
)
from tests.postgres import Cluster
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: import-volume's write-image step, whose checkpoints these are
WRITE_STEP = "3"
TERMINAL = (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


@pytest.fixture
def schema_url(postgres: Cluster) -> Iterator[str]:
    schema = postgres.create_schema()
    try:
        yield postgres.schema_url(schema)
    finally:
        postgres.drop_schema(schema)


class Appliance:
    """One appliance of two: its configuration file and its worker process."""

    def __init__(self, root: Path, moto: MotoServer, proxy: StallingProxy, store_url: str, volumes: Path):
        root.mkdir()
        self.root = root
        data: dict[str, Any] = cfg_data(
            root, moto, proxy, worker={"concurrency": 1, "poll_interval": 0.2, "lease_seconds": 5}
        )
        data["store"] = {"url": store_url}
        data["targets"] = {"volume": {"type": "file", "directory": str(volumes), "shared": True}}
        self.config_file = root / "imaging.yaml"
        self.config_file.write_text(yaml.safe_dump(data))
        self.config = config_mod.load(self.config_file)
        self.worker: subprocess.Popen[bytes] | None = None

    def start_worker(self) -> None:
        with (self.root / "worker.log").open("wb") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "--config", str(self.config_file), "worker"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            processes.kill_tree(self.worker.pid)
            self.worker.wait()


@pytest.mark.parametrize(
    ("fmt", "qemu_fmt", "options"),
    [("RAW", "raw", None), ("VMDK", "vmdk", "subformat=streamOptimized")],
    ids=["raw", "stream-vmdk"],
)
def test_an_upload_taken_over_by_another_appliance_resumes_from_the_checkpoint_in_the_store(
    moto: MotoServer,
    proxy: StallingProxy,
    bucket: str,
    schema_url: str,
    tmp_path: Path,
    fmt: str,
    qemu_fmt: str,
    options: str | None,
) -> None:
    raw = disk_with_data(tmp_path, mib=16, data_mib=12)
    image = raw if fmt == "RAW" else convert_raw(raw, tmp_path / "disk.vmdk", qemu_fmt, options)
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    a = Appliance(tmp_path / "a", moto, proxy, schema_url, volumes)
    b = Appliance(tmp_path / "b", moto, proxy, schema_url, volumes)
    service = ImportService(a.config)
    try:
        task = submit(service, proxy, bucket, image, fmt, raw.stat().st_size, MiB)
        store = service.store
        parts = -(-image.stat().st_size // MiB)
        held = parts - 2
        proxy.arm(f".part.{held}", after=64 * 1024)  # the upload's end is held
        a.start_worker()
        processes.wait_until(
            lambda: (
                proxy.stalled >= 1 and (store.load_checkpoint(task.id, WRITE_STEP) or {}).get("next", 0) >= 4
            ),
            timeout=120,
            what="appliance A writing the upload, its checkpoint in the store, a part held",
        )
        checkpoint = store.load_checkpoint(task.id, WRITE_STEP) or {}
        owner = store.get_task(task.id).owner
        a.stop()  # kill -9 of A's worker and the task's process, at one moment: nothing cleans up
        # what A checkpointed last (A may have saved one more between the read above and the kill)
        checkpoint = store.load_checkpoint(task.id, WRITE_STEP) or checkpoint
        resume_part = int(checkpoint["next"])
        proxy.release()
        b.start_worker()
        processes.wait_until(
            lambda: store.get_task(task.id).state in TERMINAL, timeout=120, what="appliance B to end the task"
        )
        done = store.get_task(task.id)
        events = store.events(task_id=task.id, limit=100_000)
    finally:
        a.stop()
        b.stop()
        service.store.close()
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert (done.attempts, done.epoch) == (2, 2)
    [takeover] = [e.data for e in events if e.kind == "task.takeover"]
    assert takeover["previous_owner"] == owner
    same_disk(image, qemu_fmt, volume_path(done))
    if fmt == "RAW":
        # B hashed the parts A wrote again from the volume, then the rest as it downloaded them (in
        # the hashing thread): the source's sha256 is that of the whole upload, as if never interrupted
        source = done.result["provenance"]["source"]
        assert (source["sha256"], source["size"]) == (
            hashlib.sha256(image.read_bytes()).hexdigest(),
            image.stat().st_size,
        )
    # Every part before the checkpoint was fetched once, by A. (A VMDK's first two parts and its last
    # are also read by each appliance's preflight: those are left out.)
    preflighted = {0, 1, parts - 1} if fmt == "VMDK" else set()
    served = {
        i: sum(n for path, n in proxy.served_by_path.items() if path.endswith(f".part.{i}"))
        for i in range(parts)
    }
    assert resume_part > 2
    assert {i: served[i] for i in range(resume_part) if i not in preflighted} == {
        i: MiB for i in range(resume_part) if i not in preflighted
    }
