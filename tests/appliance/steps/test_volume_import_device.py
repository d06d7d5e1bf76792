"""ImportVolume onto a block device that holds stale data (a real loop device over a file of 0xFF patches):
the volume must read as the image followed by zeros, and the ``sha256-chunked`` the volume step records while
writing must be the digest of what the device holds, recomputed by ``imaging digest`` from the device itself.

A device is not known to read as zeros (``zeroed: false``), so the writers zero what the image leaves as holes
and what lies past it; a digest that took a skipped range for zeros without writing them would disagree with
the device here, where the file-volume tests cannot tell (a new file reads as zeros anyway).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.service.imports import ImportService
from appliance.store import TaskState
from tests.loopdevs import attached
from tests.servers import MotoServer
from tests.stallproxy import StallingProxy

from .test_volume_import_streams import (
    GiB,
    MiB,
    cfg_data,
    convert_raw,
    disk_with_data,
    imaging_digest,
    recorded_volume_digest,
    run,
    submit,
)

#: where the backing file holds 0xFF before the import: over the image (its holes included) and past it
STALE = [(0, 80 * MiB), (300 * MiB, MiB), (GiB - MiB, MiB)]


@contextlib.contextmanager
def stale_loop_device(backing: Path, size: int) -> Iterator[Path]:
    """A loop device over a sparse ``size``-byte file, 0xFF in the ``STALE`` ranges; detached after."""
    with open(backing, "wb") as f:
        f.truncate(size)
        for start, length in STALE:
            f.seek(start)
            f.write(b"\xff" * length)
    with attached(backing) as dev:
        yield dev


def reads_as_zeros_after(dev: Path, offset: int) -> bool:
    zero = bytes(4 * MiB)
    with open(dev, "rb") as f:
        f.seek(offset)
        while piece := f.read(len(zero)):
            if piece != zero[: len(piece)]:
                return False
    return True


@pytest.mark.parametrize(
    ("fmt", "qemu_fmt", "options"),
    [("RAW", "raw", None), ("VMDK", "vmdk", "subformat=streamOptimized"), ("VHD", "vpc", "subformat=fixed")],
)
def test_an_import_onto_a_device_with_stale_data_records_the_digest_of_what_the_device_holds(
    moto: MotoServer,
    proxy: StallingProxy,
    bucket: str,
    tmp_path: Path,
    fmt: str,
    qemu_fmt: str,
    options: str | None,
) -> None:
    # 80 MiB: random data from 1 MiB to 25 MiB, then zeros the stale 0xFF under them must not show through
    raw = disk_with_data(tmp_path, mib=80, data_mib=24)
    image = raw if fmt == "RAW" else convert_raw(raw, tmp_path / f"disk.{qemu_fmt}", qemu_fmt, options)
    with stale_loop_device(tmp_path / "device.img", GiB) as dev:
        cfg = config_mod.from_dict(
            cfg_data(tmp_path, moto, proxy, targets={"volume": {"type": "device", "path": str(dev)}}),
            base_dir=tmp_path,
        )
        service = ImportService(cfg)
        try:
            task = submit(service, proxy, bucket, image, fmt, raw.stat().st_size, 4 * MiB)
            done = run(cfg, task)
        finally:
            service.store.close()
        assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
        assert done.result["written"]["streamed"] is True
        with open(dev, "rb") as f, open(raw, "rb") as r:
            assert f.read(raw.stat().st_size) == r.read()  # the image's holes were zeroed on the device
        assert reads_as_zeros_after(dev, raw.stat().st_size)  # and so was the stale data past the image
        recorded, computed = recorded_volume_digest(done), imaging_digest(dev)
        assert (recorded["value"], recorded["chunks"]) == (computed["value"], computed["chunks"])
        assert recorded["chunks"] == GiB // recorded["chunk_size"]  # the whole device, not only the image
