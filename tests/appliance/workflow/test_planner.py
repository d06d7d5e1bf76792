"""Dry run: the plan of a workflow, with no side effects at all; the shipped import-image's plan lists an
OVA's data disks as run, conditional or skipped as the request decides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.errors import UsageError
from appliance.workflow import Engine, Registry

from .support import config_dict, make_config, make_registry, write_workflow

MiB = 1024 * 1024


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def planned(tmp_path: Path) -> tuple[Engine, Path]:
    src = tmp_path / "input.img"
    src.write_bytes(b"\0" * 3000)
    out = tmp_path / "out"
    out.mkdir()
    write_workflow(
        tmp_path,
        "part",
        {
            "params": {"n": {"type": "integer", "required": True}},
            "steps": [{"name": "part-reserve", "action": "scratch.reserve", "with": {"bytes": "{{ n }}"}}],
        },
    )
    write_workflow(
        tmp_path,
        "import",
        {
            "params": {
                "src": {"type": "string", "required": True},
                "size": {"type": "integer", "default": 2 * MiB},
                "verify": {"type": "boolean", "default": False},
            },
            "steps": [
                {"name": "reserve", "action": "scratch.reserve", "with": {"bytes": "{{ size }}"}},
                {
                    "name": "fetch",
                    "action": "file.copy",
                    "with": {"src": "{{ src }}", "dst": "{{ task.workdir }}/disk.img"},
                    "register": "fetched",
                },
                {"name": "inspect", "action": "util.echo", "with": {"format": "raw"}, "register": "info"},
                {
                    "name": "convert-room",
                    "action": "scratch.reserve",
                    "when": "info.format != 'qcow2'",
                    "with": {"bytes": 5 * MiB},
                },
                {"name": "verify", "action": "util.sleep", "when": "verify", "with": {"seconds": 1}},
                {
                    "name": "export",
                    "action": "file.copy",
                    "with": {"src": "{{ fetched.path }}", "dst": str(out / "{{ info.format }}.img")},
                },
                {"name": "parts", "include": "part", "loop": [100, 200], "with": {"n": "{{ item }}"}},
                {
                    "name": "each-file",
                    "action": "util.echo",
                    "loop": "{{ info.files }}",
                    "with": {"f": "{{ item }}"},
                },
            ],
        },
    )
    return Engine(make_config(tmp_path), registry=make_registry()), tmp_path


def test_plan_lists_steps_args_skips_and_scratch_without_side_effects(planned: tuple[Engine, Path]) -> None:
    engine, tmp = planned
    before = _tree(tmp)
    plan = engine.plan("import", {"src": str(tmp / "input.img")})

    assert _tree(tmp) == before  # no database, no scratch dir, no copied files
    assert engine._store is None and not (tmp / "scratch").exists()  # the task database was never opened

    by_idx = {s["idx"]: s for s in plan["steps"]}
    assert list(by_idx) == ["1", "2", "3", "4", "5", "6", "7.loop1", "7.loop1/include/1", "7.loop2",
                            "7.loop2/include/1", "8.loop*"]  # fmt: skip
    assert by_idx["1"]["args"] == {"bytes": 2 * MiB} and by_idx["1"]["scratch_bytes"] == 2 * MiB
    # The copy into the task's scratch dir needs the source's size in scratch.
    assert by_idx["2"]["args"]["dst"] == "<scratch dir>/disk.img"
    assert by_idx["2"]["plan"]["bytes"] == 3000 and by_idx["2"]["scratch_bytes"] == 3000
    # A condition on an earlier step's result cannot be known: conditional, counted in the maximum only.
    assert by_idx["4"]["status"] == "conditional"
    assert "<result of step 'inspect'.format != 'qcow2'>" in by_idx["4"]["reason"]
    assert by_idx["5"]["status"] == "skip" and by_idx["5"]["reason"] == "when: verify is false"
    # Arguments built from results are placeholders, and plan() is not asked about them.
    assert by_idx["6"]["args"] == {
        "src": "<result of step 'fetch'.path>",
        "dst": str(tmp / "out" / "<result of step 'inspect'.format>.img"),
    }
    assert by_idx["6"]["args_known"] is False and by_idx["6"]["plan"] is None
    assert [by_idx[f"7.loop{i}/include/1"]["scratch_bytes"] for i in (1, 2)] == [100, 200]
    assert by_idx["8.loop*"]["reason"] == "once per item of <result of step 'inspect'.files>"

    assert plan["scratch_bytes"] == 2 * MiB + 3000 + 300
    assert plan["scratch_bytes_max"] == plan["scratch_bytes"] + 5 * MiB
    assert plan["params"] == {"src": str(tmp / "input.img"), "size": 2 * MiB, "verify": False}


def test_plan_follows_params(planned: tuple[Engine, Path]) -> None:
    engine, tmp = planned
    plan = engine.plan("import", {"src": str(tmp / "input.img"), "verify": "true"}, coerce_strings=True)
    verify = next(s for s in plan["steps"] if s["name"] == "verify")
    planned_sleep = {"seconds": 1}
    assert verify["status"] == "run" and verify["plan"] == planned_sleep


def test_plan_validates_params(planned: tuple[Engine, Path]) -> None:
    engine, _tmp = planned
    with pytest.raises(UsageError, match="missing required parameter 'src'"):
        engine.plan("import", {})
    assert engine._store is None


def test_plan_reports_a_missing_source_without_failing(planned: tuple[Engine, Path]) -> None:
    engine, tmp = planned
    plan = engine.plan("import", {"src": str(tmp / "nope.img")})
    fetch = next(s for s in plan["steps"] if s["name"] == "fetch")
    assert fetch["plan"]["src_exists"] is False and fetch["scratch_bytes"] is None
    assert not os.path.exists(tmp / "scratch")


@pytest.mark.parametrize(
    ("formats", "after_fetch", "status"),
    [
        (["qcow2"], [], "skip"),
        (["", ""], [], "skip"),  # several DiskContainers: never an OVA's data disks
        (["OVA"], [], "run"),
        ([""], [], "conditional"),  # opened as an OVA when it is one
        (["qcow2"], [{"hook": "decompress"}], "conditional"),  # a hook may hand on a claim of its own
    ],
    ids=["qcow2", "two-given-no-format", "ova", "one-given-no-format", "qcow2-after-a-hook"],
)
def test_a_plan_of_import_image_runs_an_ovas_data_disks_only_where_an_ova_may_be(
    formats: list[str], after_fetch: list[dict[str, str]], status: str, tmp_path: Path
) -> None:
    data = config_dict(tmp_path) | {"hooks": {"points": {"after_fetch": after_fetch}}}
    engine = Engine(config_mod.from_dict(data, base_dir=tmp_path), registry=Registry())
    containers = [{"format": f, "url": f"https://example.com/d{n}"} for n, f in enumerate(formats)]
    plan = engine.plan("import-image", {"disk_containers": containers})
    [ova_disks] = [s for s in plan["steps"] if s["name"] == "import-ova-data-disks"]
    assert ova_disks["status"] == status, ova_disks["reason"]
