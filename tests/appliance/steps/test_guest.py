"""The ``guest.validate`` step run through the engine, and its dry-run plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.store import TaskState
from appliance.workflow import Engine
from tests import guestfactory as gf

from ..workflow.support import make_config, make_registry, write_workflow

EARLIER = {"code": "UnsafeImage.Test", "severity": "warning", "message": "stored by an earlier step"}


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = Engine(make_config(tmp_path), registry=make_registry(), poll_interval=0.05)
    yield e
    e.store.close()


def _workflow(tmp: Path, args: dict[str, Any]) -> None:
    write_workflow(tmp, "v", {"steps": [{"name": "validate", "action": "guest.validate", "with": args,
                                         "register": "guest"}]})  # fmt: skip


def _run_with_earlier_finding(engine: Engine) -> Any:
    task_id = engine.submit("v")
    engine.store.add_findings(task_id, [EARLIER])
    return engine.run(task_id)


def test_error_findings_fail_the_task_with_the_first_code_and_are_kept(
    engine: Engine, tmp_path: Path
) -> None:
    img = gf.linux_disk(tmp_path, fstab=gf.fstab_by_uuid(root_uuid="deadbeef-0000-4000-8000-000000000000"))
    _workflow(tmp_path, {"source": str(img), "platform": "Windows"})
    task = _run_with_earlier_finding(engine)
    assert task.state is TaskState.FAILED
    assert task.error_code == "Guest.FstabDeviceMissing"  # the image's own errors come first
    stored = [f["code"] for f in task.findings]
    # merged with what was there, each finding once
    assert stored[0] == "UnsafeImage.Test"
    assert sorted(stored[1:]) == ["Guest.FstabDeviceMissing", "Guest.PlatformMismatch"]
    events = [e for e in engine.store.events(task_id=task.id) if e.kind == "guest.validated"]
    assert events and events[0].data["report"]["os"]["distribution"] == "debian"


def test_data_disk_passes_and_registers_the_report(engine: Engine, tmp_path: Path) -> None:
    img = gf.data_disk(tmp_path)
    _workflow(tmp_path, {"source": str(img), "bootable": False})
    task = _run_with_earlier_finding(engine)
    assert task.state is TaskState.COMPLETED
    report = task.result["guest"]
    assert report["layout"] == "disk" and report["ok"] is True
    assert {f["code"]: f["severity"] for f in report["findings"]} == {
        "Guest.NoBootablePartition": "info",
        "Guest.OsUnknown": "info",
    }
    assert [f["code"] for f in task.findings] == [
        "UnsafeImage.Test",
        "Guest.NoBootablePartition",
        "Guest.OsUnknown",
    ]


def test_fail_on_error_false_completes_with_the_errors_recorded(engine: Engine, tmp_path: Path) -> None:
    _workflow(tmp_path, {"source": str(gf.data_disk(tmp_path)), "fail_on_error": False})
    task = engine.run(engine.submit("v"))
    assert task.state is TaskState.COMPLETED and task.result["guest"]["ok"] is False
    assert {f["severity"] for f in task.findings} == {"error"}


def test_plan_validates_a_local_file_and_promises_to_validate_otherwise(
    engine: Engine, tmp_path: Path
) -> None:
    img = gf.uefi_disk(tmp_path, fallback=False)
    _workflow(tmp_path, {"source": str(img)})
    before = sorted(p.name for p in tmp_path.iterdir())
    (step,) = engine.plan("v")["steps"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no task database, no scratch
    assert step["plan"]["would_fail"] is True
    assert step["plan"]["report"]["partition_table"] == "gpt"
    assert [f["code"] for f in step["plan"]["findings"]] == ["Guest.UefiNoFallbackLoader"]

    _workflow(tmp_path, {"source": str(tmp_path / "fetched-later.img")})
    (step,) = engine.plan("v")["steps"]
    assert step["plan"]["will_validate"] is True and "report" not in step["plan"]
