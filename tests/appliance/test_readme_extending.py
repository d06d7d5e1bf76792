"""The README's "Extending imports" worked example, taken verbatim from README.md and run for real.

If the README's configuration or plugin stops working, these tests fail: the example is a contract.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance.guest.mount import mount_guest
from appliance.store import Task, TaskState
from appliance.workflow import Engine, Registry
from tests import guestfactory
from tests.httpfixtures import TestHTTPServer

from .workflow.support import REPO, config_dict

pytestmark = pytest.mark.slow


def readme_example() -> tuple[dict[str, Any], str]:
    """(the hooks section of the example configuration, the plugin's source) from README.md."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Worked example", 1)[1]
    config_yaml = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    plugin = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return yaml.safe_load(config_yaml)["hooks"], plugin


@pytest.fixture(autouse=True)
def _root_with_loop_devices() -> None:
    guestfactory.require_loop_root()


@pytest.fixture
def server() -> Iterator[TestHTTPServer]:
    with TestHTTPServer() as srv:
        yield srv


def import_with_readme_hooks(tmp_path: Path, server: TestHTTPServer, disk: Path) -> tuple[Engine, Task]:
    hooks, plugin = readme_example()
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "tag.py").write_text(plugin)
    hooks["plugins_dir"] = str(plugins)  # the README says /etc/imaging/plugins
    server.add(f"/{disk.name}", disk.read_bytes())
    data = config_dict(tmp_path)
    data["scratch"]["quota"] = "512MiB"
    data["sources"] = {"allowed_endpoints": [server.endpoint]}
    data["hooks"] = hooks
    engine = Engine(config_mod.from_dict(data, base_dir=tmp_path), registry=Registry(), poll_interval=0.05)
    params = {"disk": {"url": server.url(f"/{disk.name}"), "format": "raw"}}
    return engine, engine.run(engine.submit("import-disk", params))


def guest_text(image: Path, path: str, tmp_path: Path) -> str | None:
    with mount_guest(image, owner="readme-check", state_dir=tmp_path / "check") as gm:
        f = gm.root / path.lstrip("/")
        return f.read_text() if f.is_file() else None


def test_readme_example_imports_a_linux_disk_with_the_marker_the_key_and_the_tag(
    tmp_path: Path, server: TestHTTPServer
) -> None:
    disk = guestfactory.linux_disk(tmp_path, programs=True)
    engine, task = import_with_readme_hooks(tmp_path, server, disk)
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    stored = Path(task.result["stored"]["path"])
    assert guest_text(stored, "/etc/imaging/imported-by", tmp_path) == f"task {task.id}\n"
    assert "ops@example" in guest_text(stored, "/root/.ssh/authorized_keys", tmp_path)
    assert task.result["final_image"]["image"]["label"] == "imported"  # the plugin's hook at before_write
    kinds = [e.kind for e in engine.store.events(task_id=task.id)]
    assert "site.tag" in kinds and "guest.changes" in kinds and "run.output" not in kinds  # the scan is quiet


def test_readme_example_stops_a_guest_the_scan_flags(tmp_path: Path, server: TestHTTPServer) -> None:
    def plant(root: Path) -> None:
        (root / "etc/cron.d").mkdir(parents=True)
        (root / "etc/cron.d/miner").write_text("* * * * * root /tmp/xmrig\n")

    disk = guestfactory.linux_disk(tmp_path, programs=True, tree_hook=plant)
    _engine, task = import_with_readme_hooks(tmp_path, server, disk)
    assert (task.state, task.error_code) == (TaskState.FAILED, "Run.Failed")
    assert guestfactory.mounts_below(tmp_path) == []


def test_readme_example_refuses_an_fstab_with_device_names(tmp_path: Path, server: TestHTTPServer) -> None:
    disk = guestfactory.linux_disk(tmp_path, programs=True, fstab="/dev/sda1 / ext4 defaults 0 1\n")
    _engine, task = import_with_readme_hooks(tmp_path, server, disk)
    assert (task.state, task.error_code) == (TaskState.FAILED, "Policy.FindingDenied")
    assert "Guest.FstabDeviceName" in task.error_message


def test_readme_example_refuses_windows_before_conversion(tmp_path: Path, server: TestHTTPServer) -> None:
    if not Path("/dev/fuse").exists():
        pytest.skip("building the Windows test disk needs /dev/fuse (ntfs-3g)")
    disk = guestfactory.windows_disk(tmp_path)
    engine, task = import_with_readme_hooks(tmp_path, server, disk)
    assert (task.state, task.error_code) == (TaskState.FAILED, "Policy.OsDenied")
    ran = {r.name for r in engine.store.step_results(task.id)}
    assert "validate-guest" in ran and "convert" not in ran
