"""``image.stream`` starts its guest probe with the stream (its start and imports overlap the download)
and leaves no probe process behind, whether the stream succeeds or fails.

Real parts: the moto S3 server, the confined decoder child and guest probe, the in-process engine.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.image.streamed import StreamDecode
from appliance.service.imports import DiskContainer
from appliance.steps import image_stream
from appliance.store import TaskState
from tests import confinement
from tests import streamfactory as sf
from tests.appliance.steps.test_image_stream import raw_disk, run_import
from tests.servers import REGION, MotoServer

MiB = 1 << 20


@pytest.fixture
def bucket(moto: MotoServer, request: pytest.FixtureRequest) -> str:
    name = "probe-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    moto.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def cfg(tmp_path: Path, moto: MotoServer) -> config_mod.Config:
    s3 = {"endpoint_url": moto.endpoint, "region": REGION, "access_key": "testing", "secret_key": "testing"}
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "sources": {"allowed_endpoints": [moto.endpoint], "retries": 2, "s3": s3},
    }
    return config_mod.from_dict(data, base_dir=tmp_path)


def _waiting_probes() -> list[int]:
    """This process's descendants that are a probe started with ``--wait`` (the launcher chain's
    argv holds the probe's too)."""
    return [
        pid
        for pid in confinement.descendants()
        if "--wait" in (argv := confinement.cmdline(pid)) and any("appliance.guest.probe" in a for a in argv)
    ]


@pytest.fixture
def probes_while_decoding(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The waiting probes seen when the decoder is first fed (the stream has started)."""
    seen: list[int] = []

    class Watched(StreamDecode):
        def feed(self, data: bytes | memoryview) -> None:
            if not seen:
                seen.extend(_waiting_probes() or [0])
            super().feed(data)

    monkeypatch.setattr(image_stream, "StreamDecode", Watched)
    return seen


def _reaped(pids: list[int]) -> bool:
    return all(not Path(f"/proc/{pid}").exists() for pid in pids)


def test_the_guest_probe_waits_while_a_gzip_disk_streams_and_is_reaped_after_reading_it(
    cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path, probes_while_decoding: list[int]
) -> None:
    raw = raw_disk(tmp_path)
    gz = tmp_path / "disk.raw.gz"
    gz.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=1))
    moto.client("s3").upload_file(str(gz), bucket, gz.name)
    done = run_import(cfg, DiskContainer(format="RAW", bucket=bucket, key=gz.name), snapshot=True)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert len(probes_while_decoding) == 1 and probes_while_decoding[0] > 0, "no probe ran during the stream"
    assert _reaped(probes_while_decoding), "the probe child is still there (running or a zombie)"
    # the guest was read on the written disk: random bytes and zeros, no partition table
    assert "Guest.NoFilesystem" in {f["code"] for f in done.result["disk"]["streamed"]["guest"]["findings"]}


def test_a_hostile_stream_kills_and_reaps_the_waiting_probe(
    cfg: config_mod.Config, moto: MotoServer, bucket: str, tmp_path: Path, probes_while_decoding: list[int]
) -> None:
    image = sf.grain_beyond_capacity(tmp_path / "hostile.vmdk")
    moto.client("s3").upload_file(str(image), bucket, image.name)
    done = run_import(cfg, DiskContainer(format="VMDK", bucket=bucket, key=image.name), snapshot=True)
    assert (done.state, done.error_code) == (TaskState.FAILED, "CorruptImage"), done.error_message
    assert len(probes_while_decoding) == 1 and probes_while_decoding[0] > 0, "no probe ran during the stream"
    assert _reaped(probes_while_decoding), "the probe child is still there (running or a zombie)"
    assert _waiting_probes() == []
