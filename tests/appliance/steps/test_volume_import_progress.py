"""Progress that does not lie: an ImportVolume whose upload is held mid-part by
:class:`~tests.stallproxy.StallingProxy` in front of the moto S3 server, run by the in-process engine
with a file volume. At the hold the task shows what was read and written, a rate of 0 (not the last
rate frozen), no ETA, less than 100 %, and the stall watchdog's retries as ``source.retry`` events;
once released it completes with the source's bytes. Nothing is timed: the test waits for what the
task shows."""

from __future__ import annotations

import random
import subprocess
import threading
from pathlib import Path
from typing import Any

from appliance import config as config_mod
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskImage
from appliance.store import Event, Store, TaskState
from appliance.workflow.engine import Engine
from tests import processes
from tests.euca_upload import presign_manifest_url, upload
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy

MiB = 1 << 20


def _s3_through(proxy: StallingProxy, bucket: str) -> Any:
    """An S3 client whose requests (and so the presigned URLs it makes) go through ``proxy``, and
    its new ``bucket``."""
    import boto3  # heavy optional dependency, as in the other tests

    s3 = boto3.client(
        "s3",
        endpoint_url=proxy.endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=bucket)
    return s3


def _progress(events: list[Event], phase: str) -> list[dict[str, Any]]:
    return [e.data for e in events if e.kind == "step.progress" and e.data.get("phase") == phase]


def test_a_held_download_shows_rate_zero_its_retries_and_no_100_percent(
    moto: MotoServer, proxy: StallingProxy, tmp_path: Path
) -> None:
    s3 = _s3_through(proxy, "held-progress")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(random.Random(4).randbytes(24 * MiB))
    cfg = config_mod.from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "sources": {
                "allowed_endpoints": [proxy.endpoint, moto.endpoint],
                "manifest_poll_interval": 0.2,
                "manifest_poll_max_interval": 0.5,
                # the stall watchdog of a part: no byte for 2 s abandons the attempt (and retries)
                "read_timeout": 2,
                "retries": 50,
            },
        }
    )
    pending = presign_manifest_url(s3, "held-progress", None, disk)
    upload(s3, pending, disk, part_size=4 * MiB)
    service = ImportService(cfg)
    task = service.import_volume(
        DiskImage("RAW", 24 * MiB, pending.url, 1), availability_zone=None, description=None
    )
    proxy.arm(".part.3", after=MiB)  # the fourth part stops after 1 MiB: 12 MiB are written before it
    engine = Engine(cfg, poll_interval=0.1)
    runner = threading.Thread(target=engine.run, args=(task.id,), daemon=True)
    store: Store = service.store
    runner.start()
    try:

        def stalled() -> bool:
            events = store.events(task_id=task.id, limit=100_000)
            shown = _progress(events, "writing")
            retried = [e for e in events if e.kind == "source.retry" and e.data.get("stalled")]
            return bool(retried) and bool(shown) and shown[-1].get("rate") == 0

        processes.wait_until(stalled, timeout=120, interval=0.2, what="the stall to show in the progress")
        events = store.events(task_id=task.id, limit=100_000)
        at_hold = _progress(events, "writing")[-1]
        assert at_hold["written"] == at_hold["done"] == at_hold["converted"] == 12 * MiB
        assert at_hold["read"] == 12 * MiB and at_hold["total"] == 24 * MiB
        assert at_hold["percent"] == 50.0 and at_hold["eta"] is None
        # before the hold it moved: the rate of 0 is news, not a default
        assert any((p.get("rate") or 0) > 0 for p in _progress(events, "writing"))
        retry = next(e for e in events if e.kind == "source.retry")
        assert "part 3" in retry.data["message"] and retry.data["stalled"] is True
        held = store.get_task(task.id)
        assert held.state is TaskState.RUNNING and held.bytes_converted == 12 * MiB
        assert held.percent is not None and held.percent < 100
        proxy.release()
        runner.join(timeout=120)
        assert not runner.is_alive()
        done = store.get_task(task.id)
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        assert done.bytes_converted == 24 * MiB
        written = _progress(store.events(task_id=task.id, limit=100_000), "writing")
        # every report of the stage: never 100 % (the volume is flushed by the next step)
        assert max(p["percent"] or 0 for p in written) <= 99.0
        vol = done.result.get("volume") or done.result["imported"]["volume"]
        with open(vol["path"], "rb") as f:
            assert f.read(24 * MiB) == disk.read_bytes()
    finally:
        proxy.release()
        runner.join(timeout=30)
        engine.store.close()
        store.close()


def test_a_stalled_preflight_get_of_an_upload_is_retried_as_an_event_and_the_import_completes(
    moto: MotoServer, proxy: StallingProxy, tmp_path: Path
) -> None:
    s3 = _s3_through(proxy, "held-preflight")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(random.Random(5).randbytes(8 * MiB))
    vhd = tmp_path / "disk.vhd"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", str(raw), str(vhd)],
        check=True,
    )
    cfg = config_mod.from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "sources": {
                "allowed_endpoints": [proxy.endpoint, moto.endpoint],
                "manifest_poll_interval": 0.2,
                "manifest_poll_max_interval": 0.5,
                "read_timeout": 2,  # no byte for 2 s abandons the GET, which is retried
                "retries": 50,
            },
        }
    )
    pending = presign_manifest_url(s3, "held-preflight", None, vhd)
    upload(s3, pending, vhd, file_format="VHD", part_size=4 * MiB)
    service = ImportService(cfg)
    task = service.import_volume(
        DiskImage("VHD", vhd.stat().st_size, pending.url, 1), availability_zone=None, description=None
    )
    # a VHD is preflighted (its header and footer) before anything is written: the first GET, of the
    # first part's head, stops after 1000 bytes
    proxy.arm(".part.0", after=1000)
    engine = Engine(cfg, poll_interval=0.1)
    runner = threading.Thread(target=engine.run, args=(task.id,), daemon=True)
    store: Store = service.store
    runner.start()
    try:

        def retried() -> bool:
            events = store.events(task_id=task.id, limit=100_000)
            return any(e.kind == "source.retry" and e.data.get("stalled") for e in events)

        processes.wait_until(retried, timeout=120, interval=0.2, what="the stalled preflight GET's retry")
        events = store.events(task_id=task.id, limit=100_000)
        retry = next(e for e in events if e.kind == "source.retry")
        assert "part 0" in retry.data["message"] and "offset 0" in retry.data["message"]
        assert "X-Amz-Signature" not in retry.data["message"]
        # nothing was written before the preflight's verdict
        assert not _progress(events, "writing") and store.get_task(task.id).state is TaskState.RUNNING
        proxy.release()
        runner.join(timeout=120)
        assert not runner.is_alive()
        done = store.get_task(task.id)
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        vol = done.result.get("volume") or done.result["imported"]["volume"]
        with open(vol["path"], "rb") as f:
            assert f.read(8 * MiB) == raw.read_bytes()
    finally:
        proxy.release()
        runner.join(timeout=30)
        engine.store.close()
        store.close()
