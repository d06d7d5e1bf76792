"""Operator extensions: step modules in ``hooks.plugins_dir`` and workflows in ``workflows.extra_dirs``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.store import StepState, TaskState
from appliance.workflow import Engine, Registry, StepUnavailable
from appliance.workflow.plugins import load_plugins
from tests import imagefactory as imgs

from .support import config_dict, write_workflow

CHECKSUM_PLUGIN = '''
import hashlib

from appliance.workflow.step import Step


class Checksum(Step):
    """sha256 of a file."""

    schema = {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}}

    def run(self, ctx, path):
        with open(path, "rb") as f:
            return {"sha256": hashlib.file_digest(f, "sha256").hexdigest()}


STEPS = {"site.checksum": Checksum}
'''


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    """A plugins directory with one good plugin and three broken ones."""
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "checksum.py").write_text(CHECKSUM_PLUGIN)
    (d / "broken.py").write_text("def oops(:\n")
    (d / "empty.py").write_text("X = 1\n")
    (d / "shadow.py").write_text(
        "from appliance.steps.util import EchoStep\n\n"
        "STEPS = {'util.echo': EchoStep, 'site.echo': EchoStep}\n"
    )
    (d / "_private.py").write_text("raise SystemExit('never imported')\n")
    return d


def test_broken_plugin_files_are_reported_and_the_others_load(plugins: Path) -> None:
    registry = Registry()
    report = load_plugins(plugins, registry)
    assert report.loaded == {
        "site.checksum": str(plugins / "checksum.py"),
        "site.echo": str(plugins / "shadow.py"),
    }
    assert sorted(Path(f).name for f in report.errors) == ["broken.py", "empty.py", "shadow.py"]
    assert report.errors[str(plugins / "broken.py")].startswith(
        f"plugin {plugins / 'broken.py'} cannot be loaded: SyntaxError"
    )
    assert "defines no STEPS mapping" in report.errors[str(plugins / "empty.py")]
    assert "action 'util.echo' is already registered" in report.errors[str(plugins / "shadow.py")]
    assert registry.get("util.echo").__module__ == "appliance.steps.util"  # the built-in stays
    assert registry.plugin_errors == report.errors
    # what `imaging steps`-style listings and unknown-action errors show
    broken = [i for i in registry.describe() if not i.ok]
    assert [i.name for i in broken] == ["<plugin broken.py>", "<plugin empty.py>", "<plugin shadow.py>"]
    with pytest.raises(StepUnavailable) as exc:
        registry.get("site.scan")
    assert "plugin not loaded" in exc.value.message and "broken.py" in exc.value.message


def test_plugin_step_runs_in_a_workflow_of_an_extra_dir(tmp_path: Path, plugins: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"operator data\n")
    write_workflow(
        tmp_path,
        "sum",
        {
            "steps": [
                {"name": "sum", "action": "site.checksum", "with": {"path": str(data)}, "register": "sum"}
            ]
        },
    )
    cfg = config_mod.from_dict(
        {**config_dict(tmp_path), "hooks": {"plugins_dir": str(plugins)}}, base_dir=tmp_path
    )
    registry = Registry()
    engine = Engine(cfg, registry=registry)
    Engine(cfg, registry=registry)  # a second engine in the process does not load the plugins again
    task = engine.run(engine.submit("sum"))
    assert task.state is TaskState.COMPLETED, task.error_message
    assert task.result["sum"]["sha256"] == hashlib.sha256(b"operator data\n").hexdigest()


def test_operator_workflow_includes_a_shipped_one_and_adds_a_step(tmp_path: Path, plugins: Path) -> None:
    src = imgs.qcow2_with_data(tmp_path)
    target = tmp_path / "out.raw"
    write_workflow(
        tmp_path,
        "convert-and-sum",
        {
            "params": {
                "source": {"type": "string", "required": True},
                "target": {"type": "string", "required": True},
            },
            "steps": [
                {
                    "name": "convert",
                    "include": "convert-image",
                    "with": {"source": "{{ source }}", "target": "{{ target }}"},
                    "register": "conversion",
                },
                {
                    "name": "checksum",
                    "action": "site.checksum",
                    "with": {"path": "{{ conversion.converted.dst }}"},
                    "register": "sum",
                },
            ],
        },
    )
    cfg = config_mod.from_dict(
        {**config_dict(tmp_path), "hooks": {"plugins_dir": str(plugins)}}, base_dir=tmp_path
    )
    engine = Engine(cfg, registry=Registry())
    task = engine.run(engine.submit("convert-and-sum", {"source": str(src), "target": str(target)}))
    assert task.state is TaskState.COMPLETED, task.error_message
    assert task.result["sum"]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    records = {r.idx: r for r in engine.store.step_results(task.id)}
    assert records["1/include/5"].action == "image.convert"  # convert-image's own steps ran inside
    assert records["2"].state is StepState.COMPLETED


def test_config_validate_names_a_broken_plugin(tmp_path: Path, plugins: Path) -> None:
    cfg = tmp_path / "imaging.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\nhooks:\n  plugins_dir: {plugins}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    r = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "--config", str(cfg), "config", "validate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode != 0
    assert "broken.py cannot be loaded: SyntaxError" in r.stderr
    assert "empty.py defines no STEPS" in r.stderr
