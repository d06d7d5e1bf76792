"""The export's source check (``SourceDigestCheck`` of appliance.steps.export_check) with the real
writers into files: the source is read once, its digest compared with the one its import recorded
before the output is renamed into place; a source that changed since leaves no output."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.config import Config
from appliance.errors import ImagingError
from appliance.steps.export_check import SourceDigestCheck
from appliance.targets.chunkdigest import digest_file
from appliance.targets.diskexport import export_disk
from appliance.targets.exportdest import FileDestination

MiB = 1 << 20


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)


def sparse_disk(path: Path) -> Path:
    rnd = random.Random(5)
    with open(path, "wb") as f:
        f.truncate(150 * MiB)  # three 64 MiB chunks: data in the first two, the third a hole
        for at in (MiB, 40 * MiB, 70 * MiB + 512):
            f.seek(at)
            f.write(rnd.randbytes(3 * MiB))
    return path


def recorded(disk: Path, kind: str) -> dict[str, Any]:
    """A resolved stored image whose import recorded ``kind`` of ``disk``."""
    if kind == "sha256-chunked":
        return {"id": "ami-1", "location": {"path": str(disk), "digest": digest_file(disk).to_dict()}}
    return {
        "id": "ami-1",
        "location": {"path": str(disk), "sha256": hashlib.sha256(disk.read_bytes()).hexdigest()},
    }


@pytest.mark.parametrize("fmt", ["raw", "vhd", "vmdk"])
@pytest.mark.parametrize("kind", ["sha256-chunked", "sha256"])
def test_an_unchanged_source_is_checked_on_the_writers_read_and_exported(
    tmp_path: Path, cfg: Config, fmt: str, kind: str
) -> None:
    disk = sparse_disk(tmp_path / "disk.raw")
    check = SourceDigestCheck(recorded(disk, kind))
    out = tmp_path / f"out.{fmt}"
    try:
        export_disk(disk, fmt, FileDestination(out), config=cfg, workdir=tmp_path, source_check=check)
    finally:
        check.close()
    assert out.exists() and check.verified
    entry = check.entry(disk)
    if kind == "sha256-chunked":
        assert entry["digest"]["value"] == entry["recorded_digest"]["value"] == digest_file(disk).hexdigest
    else:
        assert entry["sha256"] == entry["recorded_sha256"]


@pytest.mark.parametrize("fmt", ["raw", "vhd", "vmdk"])
@pytest.mark.parametrize("kind", ["sha256-chunked", "sha256"])
def test_a_source_changed_since_its_import_leaves_no_output(
    tmp_path: Path, cfg: Config, fmt: str, kind: str
) -> None:
    disk = sparse_disk(tmp_path / "disk.raw")
    source = recorded(disk, kind)
    with open(disk, "r+b") as f:  # a byte of data changed after the import recorded its digest
        f.seek(41 * MiB)
        f.write(b"X")
    check = SourceDigestCheck(source)
    out = tmp_path / f"out.{fmt}"
    try:
        with pytest.raises(ImagingError) as exc:
            export_disk(disk, fmt, FileDestination(out), config=cfg, workdir=tmp_path, source_check=check)
    finally:
        check.close()
    assert exc.value.code == "Source.DigestMismatch"
    assert ("sha256-chunked" in str(exc.value)) == (kind == "sha256-chunked")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_a_hole_filled_with_data_since_the_import_is_caught_without_reading_holes(
    tmp_path: Path, cfg: Config
) -> None:
    disk = sparse_disk(tmp_path / "disk.raw")
    source = recorded(disk, "sha256-chunked")
    with open(disk, "r+b") as f:  # the third chunk was a hole: data there now
        f.seek(140 * MiB)
        f.write(os.urandom(4096))
    check = SourceDigestCheck(source)
    try:
        with pytest.raises(ImagingError) as exc:
            export_disk(
                disk,
                "vmdk",
                FileDestination(tmp_path / "o.vmdk"),
                config=cfg,
                workdir=tmp_path,
                source_check=check,
            )
    finally:
        check.close()
    assert exc.value.code == "Source.DigestMismatch"
