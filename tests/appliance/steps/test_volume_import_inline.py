"""Which uploads ImportVolume decodes in the task process: a fixed VHD (RAW data and a footer, its size
the manifest's) is passed through here like RAW, a stream-optimized VMDK still goes to the confined
decoder child; both give the disk qemu-img reads from the upload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.service.imports import ImportService
from appliance.steps import volume_import
from appliance.store import TaskState
from tests import imagefactory as imgs
from tests.appliance.steps.test_volume_import_streams import (
    MiB,
    cfg_data,
    convert_raw,
    disk_with_data,
    run,
    same_disk,
    submit,
    volume_path,
)
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy


@pytest.mark.parametrize(
    ("fmt", "qemu_fmt", "options", "children"),
    [
        ("VHD", "vpc", "subformat=fixed,force_size=on", []),
        ("VMDK", "vmdk", "subformat=streamOptimized", ["vmdk-stream"]),
    ],
)
def test_a_fixed_vhd_upload_is_decoded_in_the_task_process_and_a_stream_vmdk_by_the_child(
    moto: MotoServer,
    proxy: StallingProxy,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    qemu_fmt: str,
    options: str,
    children: list[str],
) -> None:
    started: list[str] = []
    child = volume_import.StreamDecode

    def counted(decoder: str, *args: Any, **kwargs: Any) -> Any:
        started.append(decoder)
        return child(decoder, *args, **kwargs)

    monkeypatch.setattr(volume_import, "StreamDecode", counted)
    raw = disk_with_data(tmp_path, mib=24, data_mib=12)
    image = convert_raw(raw, tmp_path / f"disk.{qemu_fmt}", qemu_fmt, options)
    cfg = config_mod.from_dict(cfg_data(tmp_path, moto, proxy), base_dir=tmp_path)
    service = ImportService(cfg)
    try:
        task = submit(service, proxy, bucket, image, fmt, imgs.virtual_size(image), 4 * MiB)
        done = run(cfg, task)
    finally:
        service.store.close()
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.result["written"]["streamed"] is True
    assert started == children
    same_disk(image, qemu_fmt, volume_path(done))
