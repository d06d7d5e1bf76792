"""The ``provenance.record`` step through the engine: the record's shape per disk, the expected
digest, and disks given as the registered results of import-disk includes (a per-disk loop)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.store import TaskState
from appliance.targets.chunkdigest import digest_file
from appliance.targets.offsetdigest import OffsetChunkedSha256
from appliance.workflow import Engine

from ..workflow.support import make_config, make_registry, write_workflow

A, B, C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine(make_config(tmp_path), registry=make_registry(), poll_interval=0.05)
    yield e
    e.store.close()


def fetched(sha: str) -> dict[str, Any]:
    digest = {"location": f"s3://disks/{sha[0]}.raw", "sha256": sha, "size": 3, "checked": []}
    return {"path": "/scratch/source.img", "size": 3, "sha256": sha, "digest": digest}


def record(engine: Engine, tmp_path: Path, with_: dict[str, Any]) -> Any:
    steps = [{"name": "p", "action": "provenance.record", "with": with_, "register": "provenance"}]
    write_workflow(tmp_path, "w", {"steps": steps})
    return engine.run(engine.submit("w"))


def test_disks_of_a_loop_of_includes_follow_the_first_in_order(engine: Engine, tmp_path: Path) -> None:
    stored = {"type": "file", "path": "/images/x.raw", "sha256": C, "size": 3}
    includes = [
        {"fetched": fetched(B), "opened": {"ova": None}, "stored": stored},
        {"fetched": fetched(C), "opened": {"ova": None}, "stored": stored | {"sha256": A}},
    ]
    task = record(
        engine, tmp_path, {"disks": [{"source": fetched(A), "output": stored}], "imported": includes}
    )
    assert task.state is TaskState.COMPLETED, task.error_message
    out = task.result["provenance"]
    assert [s["sha256"] for s in out["sources"]] == [A, B, C]
    assert [o["sha256"] for o in out["outputs"]] == [C, C, A]
    assert out["source"]["location"] == "s3://disks/a.raw" and "path" not in out["source"]
    assert out["outputs"][0]["digest_method"] == "computed while writing"


def test_a_volume_without_a_written_digest_is_hashed_chunked_by_one_read(
    engine: Engine, tmp_path: Path
) -> None:
    volume = tmp_path / "vol.raw"
    volume.write_bytes(b"disk" + bytes(1 << 20))
    task = record(
        engine,
        tmp_path,
        {"disks": [{"source": {"sha256": A, "size": 3}, "volume": {"id": "vol-1", "path": str(volume)}}]},
    )
    output = task.result["provenance"]["output"]
    assert output["digest"] == digest_file(volume).to_dict() and output["sha256"] is None
    assert output["volume_id"] == "vol-1" and output["size"] == volume.stat().st_size
    assert output["digest_method"].startswith("one read of the volume")


def _written(volume: Path, content: bytes) -> dict[str, Any]:
    """The volume step's digest of ``content`` written at offset 0 of ``volume`` (its whole size)."""
    hasher = OffsetChunkedSha256()
    hasher.write(0, content)
    got = hasher.result(volume.stat().st_size)
    assert got is not None
    return got.to_dict()


def test_a_volume_digest_taken_while_writing_is_recorded_without_reading_the_volume(
    engine: Engine, tmp_path: Path
) -> None:
    volume = tmp_path / "vol.raw"
    volume.write_bytes(b"disk" + bytes(1 << 20))
    # the digest of other bytes than the volume holds: the step takes the written digest as it is,
    # which shows it did not read the volume
    written = _written(volume, b"DISK")
    disk = {
        "source": {"sha256": A},
        "volume": {"id": "vol-1", "path": str(volume)},
        "written_digest": written,
    }
    output = record(engine, tmp_path, {"disks": [disk | {"hooks": []}]}).result["provenance"]["output"]
    assert output["digest"] == written and output["sha256"] is None
    assert output["digest_method"].startswith("sha256-chunked computed while writing")


def test_a_volume_a_hook_ran_on_is_read_again(engine: Engine, tmp_path: Path) -> None:
    volume = tmp_path / "vol.raw"
    volume.write_bytes(b"disk" + bytes(1 << 20))
    disk = {
        "source": {"sha256": A},
        "volume": {"id": "vol-1", "path": str(volume)},
        "written_digest": _written(volume, b"DISK"),
        "hooks": ["tweak"],
    }
    output = record(engine, tmp_path, {"disks": [disk]}).result["provenance"]["output"]
    assert output["digest"] == digest_file(volume).to_dict()
    assert "the hooks tweak ran on it" in output["digest_method"]


def test_an_expected_digest_that_differs_fails_the_task_naming_both(engine: Engine, tmp_path: Path) -> None:
    task = record(engine, tmp_path, {"disks": [{"source": fetched(A), "expected_sha256": B.upper()}]})
    assert (task.state, task.error_code) == (TaskState.FAILED, "Source.DigestMismatch")
    assert A in (task.error_message or "") and B in (task.error_message or "")
    assert "s3://disks/a.raw" in (task.error_message or "")
