"""An OVA import's unpacked package counts against the task's scratch quota: ``ova.open`` reserves every disk
member before writing it (and a gzip ``File``'s cap before decompressing it), so a package that does not
fit fails with ``InsufficientScratch`` at that step, before its bytes are written, and leaves nothing.
Real parts: the moto server for the OVA's bucket, the engine, an ova-compose layout of a streamOptimized
VMDK made by qemu-img."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from appliance.config import Config
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer
from appliance.store import Task, TaskState
from tests import guestfactory, stores
from tests import ovaproducers as producers
from tests.appliance.service.test_imports import bucket, cfg_data
from tests.servers import MotoServer
from tests.taskrun import run

__all__ = ["bucket"]  # a fixture, used by name


def _ova(tmp_path: Path) -> Path:
    """An OVA of a Linux guest's disk as a streamOptimized VMDK (qemu-img), in ova-compose's layout."""
    disks = tmp_path / "disks"
    disks.mkdir()
    raw = guestfactory.linux_disk(disks)
    vmdk = disks / "vm-disk1.vmdk"
    stream = ["-O", "vmdk", "-o", "subformat=streamOptimized"]
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", *stream, raw, vmdk], check=True)
    raw.unlink()
    return producers.ova_compose(tmp_path / "vm.ova", [vmdk], firmware="bios")


def _import(
    tmp_path: Path, moto: MotoServer, bucket: str, quota: Callable[[int], int]
) -> tuple[ImportService, Config, Task, int]:
    """The import of :func:`_ova` from ``bucket`` with a scratch quota of ``quota(the OVA's size)``."""
    ova = _ova(tmp_path)
    size = ova.stat().st_size
    moto.client("s3").upload_file(str(ova), bucket, "vm.ova")
    data = cfg_data(tmp_path, moto) | {"scratch": {"quota": quota(size), "min_free": 0}}
    cfg = stores.config(data, base_dir=tmp_path)
    service = ImportService(cfg)
    task = service.import_image([DiskContainer(format="OVA", bucket=bucket, key="vm.ova")])
    return service, cfg, task, size


def test_an_ova_whose_package_does_not_fit_the_scratch_quota_fails_at_ova_open_and_leaves_nothing(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    # the download of the OVA fits, the unpacked disk beside it does not
    service, cfg, task, _size = _import(tmp_path, moto, bucket, lambda size: size + size // 2)
    try:
        done = run(cfg, task)
        assert (done.state, done.error_code) == (TaskState.FAILED, "InsufficientScratch"), done.error_message
        assert "unpacking the OVA" in (done.error_message or "")
        [failed] = [s for s in service.store.step_results(task.id) if s.state == "failed"]
        assert failed.action == "ova.open"
        assert not (cfg.scratch.root / task.id).exists()
    finally:
        service.store.close()
