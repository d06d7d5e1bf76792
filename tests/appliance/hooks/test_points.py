"""Operator hooks at the insertion points of the shipped import workflows, run for real.

Disks are built with qemu-img, served by a loopback HTTP server and imported by ``import-disk``
(or converted by ``convert-image``) with hooks from the configuration: the shipped ``decompress``
and ``policy`` hooks, a plugin step loaded from ``hooks.plugins_dir``, and ``util.fail``.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.errors import ConfigError, WorkflowInvalid
from appliance.store import StepState, Task, TaskState
from appliance.workflow import Engine, Registry
from tests import guestfactory
from tests import imagefactory as imgs
from tests.httpfixtures import TestHTTPServer

from ..workflow.support import config_dict, make_registry, start_engine_process, wait_until, write_workflow

STAMP_PLUGIN = '''
from pathlib import Path

from appliance.workflow.step import Step


class Stamp(Step):
    """Write ``text`` into the RAW image at ``offset`` and a marker file next to it."""

    schema = {
        "type": "object",
        "required": ["image", "offset", "text"],
        "properties": {
            "image": {"type": "object"},
            "offset": {"type": "integer"},
            "text": {"type": "string"},
        },
    }

    def run(self, ctx, image, offset, text):
        with open(image["path"], "r+b") as f:
            f.seek(offset)
            f.write(text.encode())
        marker = Path(image["path"] + ".stamped")
        marker.write_text(text)
        ctx.ledger_created(marker)
        return {"image": {**image, "stamped": text}, "marker": str(marker)}

    def undo(self, ctx, args, result):
        marker = Path(result["marker"])
        if marker.exists():
            marker.unlink()
            ctx.ledger_removed(marker)


STEPS = {"test.stamp": Stamp}
'''


@pytest.fixture
def server() -> Iterator[TestHTTPServer]:
    with TestHTTPServer() as srv:
        yield srv


def make_cfg(tmp_path: Path, server: TestHTTPServer | None, points: dict[str, Any], **hooks: Any) -> Any:
    data = config_dict(tmp_path)
    data["scratch"]["quota"] = "512MiB"
    if server is not None:
        data["sources"] = {"allowed_endpoints": [server.endpoint]}
    data["hooks"] = {"points": points, **hooks}
    return config_mod.from_dict(data, base_dir=tmp_path)


def run_task(cfg: Any, workflow: str, params: dict[str, Any]) -> tuple[Engine, Task]:
    engine = Engine(cfg, registry=Registry(), poll_interval=0.05)
    task_id = engine.submit(workflow, params)
    return engine, engine.run(task_id)


def steps(engine: Engine, task: Task) -> dict[str, Any]:
    return {r.idx: r for r in engine.store.step_results(task.id)}


def ledger(engine: Engine, task: Task) -> list[tuple[str, str]]:
    return [(e.action, e.resource) for e in engine.store.ledger(task.id)]


def same_content(a: Path, a_fmt: str, b: Path) -> bool:
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", a_fmt, "-F", "raw", str(a), str(b)], capture_output=True
    )
    return cmp.returncode == 0


@pytest.fixture
def gz_qcow2(tmp_path: Path, server: TestHTTPServer) -> tuple[Path, str]:
    """A bootable Linux disk as qcow2 (import-disk validates the guest), gzip-compressed and served over
    HTTP: (the qcow2, its URL)."""
    src = guestfactory.qcow2_of(guestfactory.linux_disk(tmp_path), tmp_path / "linux.qcow2")
    server.add("/disk.qcow2.gz", imgs.compress(src, "gzip").read_bytes())
    return src, server.url("/disk.qcow2.gz")


def test_a_local_run_hook_runs_on_the_appliance_with_the_image_path_in_its_command(
    tmp_path: Path, server: TestHTTPServer, gz_qcow2: tuple[Path, str]
) -> None:
    # A run hook without `where: chroot` runs on the appliance: the engine does not hand it the image as
    # the guest to chroot into, and its command reaches the image through {{ image.path }}.
    src, url = gz_qcow2
    copy = tmp_path / "copy.raw"
    hook = {"hook": "run", "with": {"command": ["cp", "--sparse=always", "{{ image.path }}", str(copy)]}}
    cfg = make_cfg(tmp_path, server, {"after_convert": [hook]})
    engine, task = run_task(cfg, "import-disk", {"disk": {"url": url, "format": "qcow2"}})
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    assert steps(engine, task)["10/hook/1"].args["command"][2] == task.result["converted"]["dst"]
    assert same_content(src, "qcow2", copy)


def test_decompress_hook_after_fetch_hands_the_decompressed_disk_to_inspection(
    tmp_path: Path, server: TestHTTPServer, gz_qcow2: tuple[Path, str]
) -> None:
    src, url = gz_qcow2
    cfg = make_cfg(tmp_path, server, {"after_fetch": [{"hook": "decompress"}]})
    engine, task = run_task(cfg, "import-disk", {"disk": {"url": url, "format": "qcow2"}})
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    records = steps(engine, task)
    hook = records["3/hook/1"]
    assert (hook.action, hook.state) == ("hook.decompress", StepState.COMPLETED)
    assert hook.result["compression"] == "gzip"
    decompressed = hook.result["image"]["path"]
    assert decompressed != task.result["fetched"]["path"]
    # inspection got the hook's output: an uncompressed qcow2 (it decompressed nothing itself)
    assert task.result["source_image"]["source"] == decompressed
    assert task.result["source_image"]["compression"] is None
    assert task.result["fetched_image"] == {
        "image": {"path": decompressed, "format": "qcow2"},
        "hooks": ["decompress"],
    }
    assert ("created", decompressed) in ledger(engine, task)
    assert same_content(src, "qcow2", Path(task.result["stored"]["path"]))


def test_without_hooks_the_import_is_unchanged_and_points_pass_the_image_through(
    tmp_path: Path, server: TestHTTPServer, gz_qcow2: tuple[Path, str]
) -> None:
    src, url = gz_qcow2
    cfg = make_cfg(tmp_path, server, {})
    engine, task = run_task(cfg, "import-disk", {"disk": {"url": url, "format": "qcow2"}})
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    records = steps(engine, task)
    assert not [idx for idx in records if "/hook/" in idx]
    assert [records[i].action for i in ("3", "7", "10", "11")] == [
        "hooks:after_fetch",
        "hooks:after_inspect",
        "hooks:after_convert",
        "hooks:before_write",
    ]
    fetched = task.result["fetched"]["path"]
    assert task.result["fetched_image"] == {"image": {"path": fetched, "format": "qcow2"}, "hooks": []}
    assert task.result["source_image"]["compression"] == "gzip"  # inspection decompressed, as before
    assert task.result["final_image"]["image"]["path"] == task.result["converted"]["dst"]
    assert same_content(src, "qcow2", Path(task.result["stored"]["path"]))


def test_plugin_hook_after_convert_changes_the_stored_image(
    tmp_path: Path, server: TestHTTPServer, gz_qcow2: tuple[Path, str]
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "stamp.py").write_text(STAMP_PLUGIN)
    _src, url = gz_qcow2
    cfg = make_cfg(
        tmp_path,
        server,
        {
            "after_convert": [
                {"hook": "test.stamp", "with": {"offset": 4096, "text": "stamp-{{ task.id }}"}}
            ],
            "before_write": [
                {"hook": "policy", "with": {"allow_formats": ["raw"], "max_virtual_size": "1GiB"}}
            ],
        },
        plugins_dir=str(plugins),
    )
    engine, task = run_task(cfg, "import-disk", {"disk": {"url": url, "format": "qcow2"}})
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    text = f"stamp-{task.id}"
    stored = Path(task.result["stored"]["path"])
    with open(stored, "rb") as f:
        f.seek(4096)
        assert f.read(len(text)) == text.encode()  # the hook's change reached the image target
    # facts a hook adds travel on: the policy at before_write saw the stamped image
    assert task.result["final_image"]["image"]["stamped"] == text
    assert task.result["final_image"]["hooks"] == ["policy"]
    assert steps(engine, task)["11/hook/1"].result["passed"] == ["allow_formats", "max_virtual_size"]


def test_failing_hook_fails_the_task_with_its_code_and_undoes_earlier_steps(
    tmp_path: Path, server: TestHTTPServer, gz_qcow2: tuple[Path, str]
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "stamp.py").write_text(STAMP_PLUGIN)
    _src, url = gz_qcow2
    cfg = make_cfg(
        tmp_path,
        server,
        {
            "after_convert": [
                {"hook": "test.stamp", "with": {"offset": 0, "text": "x"}},
                {
                    "hook": "util.fail",
                    "name": "virus-scan",
                    "with": {"code": "Scan.VirusFound", "message": "EICAR test signature found"},
                },
            ]
        },
        plugins_dir=str(plugins),
    )
    engine, task = run_task(cfg, "import-disk", {"disk": {"url": url, "format": "qcow2"}})
    assert (task.state, task.error_code) == (TaskState.FAILED, "Scan.VirusFound")
    assert "virus-scan" in task.error_message and "EICAR test signature found" in task.error_message
    records = steps(engine, task)
    assert records["10/hook/2"].state is StepState.FAILED
    assert records["10"].state is StepState.FAILED  # the point itself
    assert records["10/hook/1"].state is StepState.UNDONE
    assert records["9"].state is StepState.UNDONE  # convert
    assert records["2"].state is StepState.UNDONE  # fetch
    assert "12" not in records  # nothing was stored
    entries = ledger(engine, task)
    fetched = records["2"].result["path"]
    raw = records["9"].result["dst"]
    marker = records["10/hook/1"].result["marker"]
    for resource in (fetched, raw, marker):
        assert ("created", resource) in entries and ("removed", resource) in entries
    assert (
        entries.index(("removed", marker))
        < entries.index(("removed", raw))
        < entries.index(("removed", fetched))
    )
    assert not any(action == "leaked" for action, _ in entries)
    images = cfg.targets["image"]["directory"]
    assert not Path(images).exists() or not any(Path(images).iterdir())


def test_policy_denial_fails_convert_image_before_anything_is_written(tmp_path: Path) -> None:
    src = imgs.compress(imgs.qcow2_with_data(tmp_path), "gzip")
    target = tmp_path / "out.raw"
    cfg = make_cfg(
        tmp_path, None, {"after_inspect": [{"hook": "policy", "with": {"deny_formats": ["qcow2"]}}]}
    )
    engine, task = run_task(cfg, "convert-image", {"source": str(src), "target": str(target)})
    assert (task.state, task.error_code) == (TaskState.FAILED, "Policy.FormatDenied")
    assert "policy rule deny_formats" in task.error_message and "'qcow2'" in task.error_message
    assert any(f["code"] == "Policy.FormatDenied" for f in task.findings)  # shown with the other findings
    assert not target.exists()
    records = steps(engine, task)
    decompressed = records["2"].result["path"]  # inspection decompressed the input into scratch
    assert records["2"].state is StepState.UNDONE
    assert ("removed", decompressed) in ledger(engine, task)


def test_dry_run_plan_lists_the_configured_hooks_of_every_point(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        None,
        {
            "after_fetch": [{"hook": "decompress"}],
            "after_inspect": [
                {"hook": "policy", "name": "formats", "with": {"allow_formats": ["raw", "qcow2"]}}
            ],
            "before_write": [{"hook": "util.echo", "with": {"message": "writing {{ image.path }}"}}],
        },
    )
    engine = Engine(cfg, registry=Registry())
    plan = engine.plan(
        "import-image", {"disk_containers": [{"url": "https://example.com/d.qcow2", "format": "qcow2"}]}
    )
    by_idx = {s["idx"]: s for s in plan["steps"]}
    hooks = {i: (s["name"], s["action"]) for i, s in by_idx.items() if "/hook/" in i}
    assert hooks == {
        "1/include/3/hook/1": ("decompress", "hook.decompress"),
        "1/include/7/hook/1": ("formats", "hook.policy"),
        "1/include/11/hook/1": ("util.echo", "util.echo"),
        # an OVA's data disks: an after_fetch hook may hand the disk on claimed as an OVA
        "3.loop*/include/4/hook/1": ("formats", "hook.policy"),
        "3.loop*/include/8/hook/1": ("util.echo", "util.echo"),
    }
    assert by_idx["3.loop*"]["status"] == "conditional"
    assert by_idx["1/include/7"]["hooks"] == "after_inspect"
    assert by_idx["1/include/7"]["plan"] == {"runs": ["formats"]}
    assert by_idx["1/include/10"]["plan"] == {"runs": []}  # after_convert: nothing configured
    assert by_idx["1/include/7/hook/1"]["args"]["allow_formats"] == ["raw", "qcow2"]
    assert not (tmp_path / "state" / "imaging.db").exists()


def test_hooks_chain_the_image_and_register_it_with_their_names(tmp_path: Path) -> None:
    image = imgs.compress(imgs.raw_mbr(tmp_path), "xz")
    write_workflow(
        tmp_path,
        "hooked",
        {
            "steps": [
                {
                    "name": "point",
                    "hooks": "after_convert",
                    "with": {"image": {"path": str(image), "format": "raw.xz", "owner": "me"}},
                    "register": "hooked",
                },
                {
                    "name": "after",
                    "action": "util.echo",
                    "with": {"path": "{{ hooked.image.path }}"},
                    "register": "out",
                },
            ]
        },
    )
    cfg = make_cfg(
        tmp_path,
        None,
        {
            "after_convert": [
                {"hook": "decompress", "name": "first"},
                # util.echo returns its arguments, `image` among them: the image passes on unchanged
                {"hook": "util.echo", "name": "second", "with": {"seen": "{{ image.path }}"}},
            ]
        },
    )
    engine, task = run_task(cfg, "hooked", {})
    assert task.state is TaskState.COMPLETED, task.error_message
    records = steps(engine, task)
    decompressed = records["1/hook/1"].result["image"]["path"]
    assert decompressed != str(image)
    assert Path(decompressed).name.startswith("hook-1-hook-1")  # in the task's scratch directory
    assert records["1/hook/2"].args["seen"] == decompressed  # the second hook got the first one's image
    assert task.result["hooked"] == {
        "image": {"path": decompressed, "format": "raw", "owner": "me"},
        "hooks": ["first", "second"],
    }
    assert task.result["out"] == {"path": decompressed}


def test_a_task_runs_with_the_hooks_recorded_when_it_was_submitted(tmp_path: Path) -> None:
    src = imgs.qcow2_with_data(tmp_path)
    allow = make_cfg(
        tmp_path, None, {"after_inspect": [{"hook": "policy", "with": {"allow_formats": ["qcow2"]}}]}
    )
    deny = make_cfg(
        tmp_path, None, {"after_inspect": [{"hook": "policy", "with": {"deny_formats": ["qcow2"]}}]}
    )
    submitter = Engine(allow, registry=Registry())
    task_id = submitter.submit("convert-image", {"source": str(src), "target": str(tmp_path / "o.raw")})
    recorded = [e.data for e in submitter.store.events(task_id=task_id) if e.kind == "task.hooks"]
    assert recorded == [
        {
            "points": {
                "after_inspect": [{"hook": "policy", "name": "policy", "with": {"allow_formats": ["qcow2"]}}]
            }
        }
    ]
    # the configuration changed before a worker picked the task up: the recorded hooks still apply
    task = Engine(deny, registry=Registry()).run(task_id)
    assert task.state is TaskState.COMPLETED, task.error_message
    assert (tmp_path / "o.raw").exists()


@pytest.mark.slow
def test_resumed_task_keeps_its_hooks_and_does_not_rerun_completed_ones(tmp_path: Path) -> None:
    log, go, appended = tmp_path / "wait.log", tmp_path / "go", tmp_path / "appended"
    write_workflow(
        tmp_path,
        "hooked",
        {
            "steps": [
                {
                    "name": "point",
                    "hooks": "after_inspect",
                    "with": {"image": {"path": str(tmp_path / "x.img"), "format": "raw"}},
                    "register": "hooked",
                }
            ]
        },
    )
    submitted = make_cfg(
        tmp_path,
        None,
        {
            "after_inspect": [
                {"hook": "test.append", "name": "append", "with": {"path": str(appended), "text": "once"}},
                {"hook": "test.wait_for_file", "name": "wait", "with": {"path": str(go), "log": str(log)}},
            ]
        },
    )
    engine = Engine(submitted, registry=make_registry(), poll_interval=0.05)
    task_id = engine.submit("hooked")
    # The worker process has no hooks in its configuration: it runs the recorded ones.
    proc = start_engine_process(tmp_path, task_id)
    try:
        wait_until(log.exists, 30, "the engine process to reach the 'wait' hook")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    go.touch()
    changed = make_cfg(
        tmp_path, None, {"after_inspect": [{"hook": "util.fail", "with": {"code": "Test.Changed"}}]}
    )
    ended = Engine(changed, store=engine.store, registry=make_registry(), poll_interval=0.05).resume(task_id)
    assert ended.state is TaskState.COMPLETED, ended.error_message
    assert appended.read_text() == "once\n"  # the completed hook was not run again
    assert log.read_text() == "started\nstarted\n"  # the interrupted one was
    assert ended.result["hooked"]["hooks"] == ["append", "wait"]


def test_unknown_insertion_point_in_the_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        make_cfg(tmp_path, None, {"after_fecth": [{"hook": "decompress"}]})
    assert "hooks.points" in exc.value.message and "'after_fecth' is not one of" in exc.value.message


def test_unknown_hook_name_is_refused_naming_the_config_field(tmp_path: Path) -> None:
    cfg_file = tmp_path / "imaging.yaml"
    cfg_file.write_text(
        "hooks:\n  points:\n    after_inspect:\n      - hook: policy\n      - hook: scan-for-viruses\n"
        "    before_write:\n      - hook: policy\n        with: {max_virtual_size: lots}\n"
    )
    cfg = config_mod.load(cfg_file)
    engine = Engine(cfg, registry=Registry())
    with pytest.raises(WorkflowInvalid) as exc:
        engine.submit("convert-image", {"source": "/nonexistent", "target": str(tmp_path / "o")})
    message = exc.value.message
    assert (
        f"{cfg_file}: step 'after-inspect' (#3): hooks.points.after_inspect[1].hook: unknown hook" in message
    )
    assert "'hook.scan-for-viruses'" in message and "decompress" in message  # the shipped hooks are listed
    with pytest.raises(WorkflowInvalid) as exc:
        engine.plan("import-disk", {"disk": {"url": "https://example.com/d.raw"}})
    assert "hooks.points.before_write[0].with.max_virtual_size" in exc.value.message


def test_config_validate_reports_hook_problems(tmp_path: Path) -> None:
    from appliance.cli.config import _validate_hooks

    cfg = make_cfg(
        tmp_path, None, {"after_convert": [{"hook": "decompress", "with": {"image": {"path": "/x"}}}]}
    )
    with pytest.raises(ConfigError) as exc:
        _validate_hooks(cfg)
    assert "hooks.points.after_convert[0].with.image: 'image' is given by the engine" in exc.value.message
