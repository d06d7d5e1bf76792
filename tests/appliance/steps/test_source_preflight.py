"""ImportImage/ImportSnapshot fail fast: ``source.fetch`` reads the object's first and last bytes (two ranged
GETs) and runs the header-only preflight before downloading it; the dry-run plan shows the verdict and the
scratch the download needs.

Real parts: the moto S3 server behind :class:`~tests.stallproxy.StallingProxy` (which counts the bytes it
serves), qemu-img for the images, the in-process engine.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer
from appliance.store import TaskState
from appliance.workflow.engine import Engine
from tests import imagefactory as imgs
from tests import processes
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy

MiB = 1 << 20


@pytest.fixture
def cfg(tmp_path: Path, moto: MotoServer, proxy: StallingProxy) -> config_mod.Config:
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "sources": {
            "allowed_endpoints": [proxy.endpoint, moto.endpoint],
            "retries": 2,
            "s3": {
                "endpoint_url": proxy.endpoint,  # S3 reads counted by the proxy too
                "region": REGION,
                "access_key": "testing",
                "secret_key": "testing",
            },
        },
    }
    return config_mod.from_dict(data, base_dir=tmp_path)


def vhdx_of_random_data(directory: Path, mib: int = 24) -> Path:
    return _of_random_data(directory, mib, "vhdx")


def qcow2_of_random_data(directory: Path, mib: int = 24) -> Path:
    return _of_random_data(directory, mib, "qcow2")


def _of_random_data(directory: Path, mib: int, fmt: str) -> Path:
    raw = directory / "data.raw"
    rng = random.Random(1)
    with open(raw, "wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(MiB))
    out = directory / f"data.{fmt}"
    imgs.qemu_img("convert", "-f", "raw", "-O", fmt, raw, out)
    return out


def presigned_url(moto: MotoServer, proxy: StallingProxy, bucket: str, key: str) -> str:
    url = moto.client("s3").generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600
    )
    return url.replace(moto.endpoint, proxy.endpoint)


def test_a_vmdk_claim_for_a_qcow2_url_is_refused_before_the_download(
    cfg: config_mod.Config, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    image = qcow2_of_random_data(tmp_path)
    moto.client("s3").upload_file(str(image), bucket, "disk.vmdk")
    service = ImportService(cfg)
    engine = Engine(cfg, poll_interval=0.1)
    try:
        task = service.import_image(
            [DiskContainer(format="VMDK", url=presigned_url(moto, proxy, bucket, "disk.vmdk"))]
        )
        done = engine.run(task.id)
    finally:
        engine.store.close()
        service.store.close()
    # the code a full inspection gives (FormatMismatch), after 2 MiB and 1536 bytes of a 24 MiB object
    assert (done.state, done.error_code) == (TaskState.FAILED, "FormatMismatch"), done.error_message
    assert proxy.served <= 2 * MiB + 1536 < image.stat().st_size // 8
    assert not (cfg.scratch.root / task.id).exists()


def test_a_vhdx_snapshot_from_a_bucket_is_preflighted_then_downloaded_once_and_imported(
    cfg: config_mod.Config, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    image = vhdx_of_random_data(tmp_path, mib=8)
    moto.client("s3").upload_file(str(image), bucket, "disk.vhdx")
    service = ImportService(cfg)
    engine = Engine(cfg, poll_interval=0.1)
    try:
        task = service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key="disk.vhdx"))
        done = engine.run(task.id)
    finally:
        engine.store.close()
        service.store.close()
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    # the object once, and the preflight's head and tail
    assert image.stat().st_size < proxy.served <= image.stat().st_size + 2 * MiB + 1536


def test_the_dry_run_plan_shows_the_preflight_verdict_and_the_scratch_the_download_needs(
    cfg: config_mod.Config, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    image = vhdx_of_random_data(tmp_path, mib=8)
    moto.client("s3").upload_file(str(image), bucket, "disk.img")
    engine = Engine(cfg, poll_interval=0.1)
    try:
        good = engine.plan("import-disk", {"disk": {"format": "VHDX", "bucket": bucket, "key": "disk.img"}})
        bad = engine.plan("import-disk", {"disk": {"format": "VMDK", "bucket": bucket, "key": "disk.img"}})
    finally:
        engine.store.close()
    # the route step runs the preflight (source.fetch takes its verdict): it shows the verdict and, for a
    # disk that does not stream, the scratch the download needs
    [route] = [s for s in good["steps"] if s.get("name") == "route"]
    assert route["scratch_bytes"] == image.stat().st_size and route["plan"]["streams"] is False
    verdict = route["plan"]["preflight"]
    assert verdict["format"] == "vhdx" and verdict["safe"] is True
    [route] = [s for s in bad["steps"] if s.get("name") == "route"]
    verdict = route["plan"]["preflight"]
    assert verdict["safe"] is False
    assert [f["code"] for f in verdict["findings"]] == ["FormatMismatch"]
    assert proxy.served <= 2 * (2 * MiB + 1536)  # two preflights, no download


# -- compressed sources: the decompressed head is preflighted ------------------------------------------


def qcow2_with_backing_file(directory: Path, mib: int = 24) -> Path:
    """A qcow2 of ``mib`` MiB of random data (nothing in it compresses) that names a host file as its
    backing file: the head of its decompressed stream is what tells."""
    image = qcow2_of_random_data(directory, mib)
    imgs.qemu_img("rebase", "-u", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", image)
    return image


def run_import_disk(cfg: config_mod.Config, disk: dict[str, Any]) -> tuple[Any, list[str]]:
    """The import-disk workflow of ``disk`` run to its end in this process: the task, and the steps
    that ran (by name)."""
    engine = Engine(cfg, poll_interval=0.1)
    try:
        task_id = engine.submit("import-disk", {"disk": disk, "bootable": False})
        done = engine.run(task_id)
        steps = [r.name for r in engine.store.step_results(task_id)]
    finally:
        engine.store.close()
    return done, steps


@pytest.mark.parametrize("kind", ["gzip", "xz", "bzip2", "zstd"])
def test_a_compressed_qcow2_with_a_backing_file_is_refused_by_the_preflight_of_its_decompressed_head(
    kind: str, cfg: config_mod.Config, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    image = imgs.compress(qcow2_with_backing_file(tmp_path), kind)
    moto.client("s3").upload_file(str(image), bucket, "disk.img")
    done, steps = run_import_disk(cfg, {"format": "QCOW2", "bucket": bucket, "key": "disk.img"})
    # the code the full inspection of the decompressed file gives, from the fetch step's preflight
    assert (done.state, done.error_code) == (TaskState.FAILED, "UnsafeImage.BackingFile"), done.error_message
    assert steps == ["route"]  # the route step's preflight, before any download
    # the compressed head (2 MiB), at most one more ranged GET (to 8 MiB), and the tail: not the object
    assert proxy.served <= 8 * MiB + 1536 < image.stat().st_size
    assert not (cfg.scratch.root / done.id).exists()


def test_a_compressed_qcow2_over_the_virtual_size_limit_is_refused_before_the_download(
    cfg: config_mod.Config, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    image = imgs.compress(imgs.qcow2_huge(tmp_path, virtual_size="3T"), "xz")
    moto.client("s3").upload_file(str(image), bucket, "huge.img")
    url = presigned_url(moto, proxy, bucket, "huge.img")
    done, steps = run_import_disk(cfg, {"format": "QCOW2", "url": url})
    assert (done.state, done.error_code) == (TaskState.FAILED, "SizeLimitExceeded"), done.error_message
    assert steps == ["route"]  # refused by the preflight, not by the inspection of a download


def test_a_compressed_raw_disk_is_preflighted_then_downloaded_and_imported(
    cfg: config_mod.Config, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    raw = imgs.raw_mbr(tmp_path, size=8 * MiB)
    image = imgs.compress(raw, "gzip")
    moto.client("s3").upload_file(str(image), bucket, "disk.raw.gz")
    engine = Engine(cfg, poll_interval=0.1)
    try:
        plan = engine.plan("import-disk", {"disk": {"format": "RAW", "bucket": bucket, "key": "disk.raw.gz"}})
    finally:
        engine.store.close()
    [route] = [s for s in plan["steps"] if s.get("name") == "route"]
    verdict = route["plan"]["preflight"]
    assert (verdict["format"], verdict["compression"], verdict["safe"]) == ("raw", "gzip", True)
    assert (route["plan"]["streams"], route["plan"]["decoder"], route["scratch_bytes"]) == (True, "gzip", 0)
    assert verdict["details"]["decompressed_head_bytes"] > 0
    done, _ = run_import_disk(cfg, {"format": "RAW", "bucket": bucket, "key": "disk.raw.gz"})
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)


# -- a preflight GET that stalls is retried ---------------------------------------------------------


def test_a_stalled_first_preflight_get_is_retried_shows_as_an_event_and_the_import_completes(
    tmp_path: Path, moto: MotoServer, proxy: StallingProxy, bucket: str
) -> None:
    cfg = config_mod.from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "sources": {
                "allowed_endpoints": [proxy.endpoint],
                # the stall watchdog: no byte for 1 s abandons the attempt, which is retried
                "stall_seconds": 1,
                "retries": 50,
                "s3": {
                    "endpoint_url": proxy.endpoint,
                    "region": REGION,
                    "access_key": "testing",
                    "secret_key": "testing",
                },
            },
        },
        base_dir=tmp_path,
    )
    image = vhdx_of_random_data(tmp_path, mib=4)
    moto.client("s3").upload_file(str(image), bucket, "held.vhdx")
    proxy.arm("held.vhdx", after=1000)  # the preflight's first GET (bytes 0-2 MiB) stops after 1000 bytes
    engine = Engine(cfg, poll_interval=0.1)
    disk = {"format": "VHDX", "bucket": bucket, "key": "held.vhdx"}
    task_id = engine.submit("import-disk", {"disk": disk, "bootable": False})
    runner = threading.Thread(target=engine.run, args=(task_id,), daemon=True)
    runner.start()
    try:

        def retried() -> bool:
            events = engine.store.events(task_id=task_id, limit=10_000)
            return any(e.kind == "source.retry" and e.data.get("stalled") for e in events)

        processes.wait_until(retried, timeout=120, interval=0.2, what="the stalled preflight GET's retry")
        assert proxy.stalled_on("held.vhdx") >= 1
        running = engine.store.get_task(task_id)
        assert running.state is TaskState.RUNNING
        proxy.release()
        runner.join(timeout=120)
        assert not runner.is_alive()
        done = engine.store.get_task(task_id)
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        retry = next(
            e for e in engine.store.events(task_id=task_id, limit=10_000) if e.kind == "source.retry"
        )
        assert "offset 0" in retry.data["message"] and "testing" not in retry.data["message"]
    finally:
        proxy.release()
        runner.join(timeout=30)
        engine.store.close()
