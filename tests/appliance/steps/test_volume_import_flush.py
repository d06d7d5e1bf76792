"""The flush of a RAW ImportVolume's volume runs while the guest is validated, and the hand-over waits
for it: a flush error, reported after the validation started, still fails the task with its code and
removes the volume.

Real parts: the moto S3 server behind :class:`~tests.stallproxy.StallingProxy`, a file volume, the
in-process engine and its confined guest probe. The volume's ``fsync`` is the one thing observed (and,
for the error, failed with ``EIO``: a disk that fails its writeback is not something a test can
borrow): every call on a descriptor of the volume goes through :func:`_watch_volume_fsync`.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.service.imports import ImportService
from appliance.steps import guest as guest_step
from appliance.store import Store, TaskState
from appliance.targets.file import FileVolumeTarget
from tests.appliance.steps.test_volume_import_streams import (
    cfg_data,
    disk_with_data,
    run,
    submit,
    volume_path,
)
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy

MiB = 1 << 20
#: how long a held flush waits for what it waits for before it gives up (and the test fails)
HOLD_SECONDS = 120.0


class Guest:
    """Whether the real guest validation of the task has started and ended (it still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        real = guest_step.validate_image

        def validate(*args: Any, **kwargs: Any) -> Any:
            self.started.set()
            try:
                return real(*args, **kwargs)
            finally:
                self.ended.set()

        monkeypatch.setattr(guest_step, "validate_image", validate)


def _watch_volume_fsync(
    monkeypatch: pytest.MonkeyPatch, volumes: Path, on_volume: Callable[[int], None]
) -> None:
    """``on_volume(fd)`` before every ``fsync`` of a file in ``volumes``; other fsyncs as they are."""
    real = os.fsync
    where = str(volumes.resolve())

    def fsync(fd: Any) -> None:
        if isinstance(fd, int):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.startswith(where + os.sep):
                on_volume(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _config(tmp_path: Path, moto: MotoServer, proxy: StallingProxy) -> config_mod.Config:
    data = cfg_data(tmp_path, moto, proxy)
    # no checkpoint (and so no flush) while the parts stream: the volume's only flushes are the one
    # after the write and the hand-over's
    data["sources"]["checkpoint_every"] = 1 << 40
    data["targets"] = {"volume": {"type": "file", "directory": str(tmp_path / "volumes")}}
    return config_mod.from_dict(data, base_dir=tmp_path)


def _finalizing(cfg: config_mod.Config, task_id: str) -> bool:
    with Store(cfg.store) as store:
        return any(
            e.kind == "step.progress" and e.data.get("phase") == "finalizing"
            for e in store.events(task_id=task_id, limit=10000)
        )


def test_the_volumes_flush_runs_while_the_guest_is_validated_and_the_hand_over_waits_for_it(
    moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = disk_with_data(tmp_path, mib=24, data_mib=8)
    cfg = _config(tmp_path, moto, proxy)
    guest = Guest(monkeypatch)
    order: list[str] = []
    task_ids: list[str] = []

    def on_volume(_fd: int) -> None:
        if order or guest.ended.is_set():
            order.append("fsync")
            return
        # the first flush of the volume, before the guest was validated: held until the hand-over has
        # begun, so the hand-over can only complete by waiting for it
        order.append("flush began before the guest was validated")
        for _ in range(int(HOLD_SECONDS / 0.05)):
            if task_ids and guest.ended.is_set() and _finalizing(cfg, task_ids[0]):
                break
            threading.Event().wait(0.05)
        order.append("flush ended")

    _watch_volume_fsync(monkeypatch, tmp_path / "volumes", on_volume)
    real_finalize = FileVolumeTarget.finalize

    def finalize(self: FileVolumeTarget, volume: Any) -> dict[str, Any]:
        order.append("hand-over")
        return real_finalize(self, volume)

    monkeypatch.setattr(FileVolumeTarget, "finalize", finalize)
    service = ImportService(cfg)
    try:
        task = submit(service, proxy, bucket, raw, "RAW", raw.stat().st_size, 4 * MiB)
        task_ids.append(task.id)
        done = run(cfg, task)
    finally:
        service.store.close()
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert order[:3] == ["flush began before the guest was validated", "flush ended", "hand-over"], order
    assert volume_path(done).read_bytes()[: raw.stat().st_size] == raw.read_bytes()


def test_a_flush_error_reported_after_the_validation_started_fails_the_task_and_removes_the_volume(
    moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = disk_with_data(tmp_path, mib=24, data_mib=8)
    cfg = _config(tmp_path, moto, proxy)
    guest = Guest(monkeypatch)
    failed: list[bool] = []

    def on_volume(_fd: int) -> None:
        if failed or guest.ended.is_set():
            return
        # the flush started when the disk was written fails once the guest validation is under way
        guest.started.wait(HOLD_SECONDS)
        failed.append(guest.started.is_set())
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    _watch_volume_fsync(monkeypatch, tmp_path / "volumes", on_volume)
    service = ImportService(cfg)
    try:
        task = submit(service, proxy, bucket, raw, "RAW", raw.stat().st_size, 4 * MiB)
        done = run(cfg, task)
    finally:
        service.store.close()
    assert failed == [True]
    assert guest.ended.is_set()  # the validation ran to its end
    assert done.state is TaskState.FAILED
    assert done.error_code == "TargetWriteFailed", done.error_message
    assert "Input/output error" in (done.error_message or "")
    # the volume is removed as any failed import's is, and nothing of the task is left in scratch
    assert list((tmp_path / "volumes").iterdir()) == []
    assert not (cfg.scratch.root / task.id).exists()
