"""`imaging reconfigure --watch` (the image's imaging-reconfigure.service) ends at once, saying why,
when the configuration names no controller to ask for new versions; a watcher whose configuration a
live update switched to pull mode ends too."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.boot import live
from tests.processes import wait_until
from tests.servers import free_port


def write_config(path: Path, controller: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"state_dir": str(path.parent / "state"), "controller": controller}))
    return path


def watch(config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("IMAGING_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "-c", str(config), "reconfigure", "--watch", "--interval",
         "1", "--owner", "", "--unit-dir", ""],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("controller", "why"),
    [
        ({"appliance_id": "a-1", "mode": "off"}, "no controller is configured"),
        (
            {"appliance_id": "a-1", "mode": "pull", "url": "http://127.0.0.1:9"},
            "the controller is in pull mode",
        ),
    ],
)
def test_watch_without_a_controller_to_ask_exits_0_saying_why(
    tmp_path: Path, controller: dict[str, Any], why: str
) -> None:
    done = watch(write_config(tmp_path / "imaging.yaml", controller))
    assert done.returncode == 0, done.stderr
    assert f"imaging: no configuration updates to watch for: {why}" in done.stdout


def test_a_watcher_ends_when_its_configuration_switches_to_pull_mode(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens: every poll is "unreachable"
    push = {"appliance_id": "a-1", "mode": "push", "url": url, "secret": "s" * 32}
    config = write_config(tmp_path / "imaging.yaml", push)
    opts = live.Options(config=config, owner=None, timeout=2.0, unit_dir=None, reload_units=None)
    outcomes: list[live.Outcome] = []
    stop = threading.Event()
    watcher = threading.Thread(target=live.watch, args=(opts, 0.2, stop, outcomes.append), daemon=True)
    watcher.start()
    try:
        wait_until(lambda: any(o.status == "unreachable" for o in outcomes), what="an unreachable poll")
        assert watcher.is_alive()
        write_config(config, {**push, "mode": "pull"})
        watcher.join(60)  # only keeps a watcher that never stops from hanging the test
        assert not watcher.is_alive(), "the watcher kept polling a configuration in pull mode"
    finally:
        stop.set()
