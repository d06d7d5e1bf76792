"""Guest-modifying hooks configured by an operator change what a real import does.

A bootable Linux disk is built, served as qcow2 over loopback HTTP and imported by ``import-disk``;
the hooks come only from the configuration. The result is checked by mounting it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.guest.mount import mount_guest
from appliance.store import Task, TaskState
from appliance.workflow import Engine, Registry
from tests import guestfactory
from tests.httpfixtures import TestHTTPServer

from ..workflow.support import config_dict

pytestmark = pytest.mark.slow

MARKER = "/etc/imaging/imported-by"


@pytest.fixture(autouse=True)
def _root_with_loop_devices() -> None:
    guestfactory.require_loop_root()


@pytest.fixture
def server() -> Iterator[TestHTTPServer]:
    with TestHTTPServer() as srv:
        yield srv


@pytest.fixture
def linux_qcow2_url(tmp_path: Path, server: TestHTTPServer) -> str:
    raw = guestfactory.linux_disk(tmp_path)
    qcow2 = guestfactory.qcow2_of(raw, tmp_path / "linux.qcow2")
    server.add("/linux.qcow2", qcow2.read_bytes())
    return server.url("/linux.qcow2")


def import_with_hooks(
    tmp_path: Path, server: TestHTTPServer, url: str, points: dict[str, Any]
) -> tuple[Engine, Task]:
    data = config_dict(tmp_path)
    data["scratch"]["quota"] = "512MiB"
    data["sources"] = {"allowed_endpoints": [server.endpoint]}
    data["hooks"] = {"points": points}
    cfg = config_mod.from_dict(data, base_dir=tmp_path)
    engine = Engine(cfg, registry=Registry(), poll_interval=0.05)
    task_id = engine.submit("import-disk", {"disk": {"url": url, "format": "qcow2"}, "platform": "Linux"})
    return engine, engine.run(task_id)


def read_guest_file(image: Path, guest_path: str, tmp_path: Path) -> str | None:
    with mount_guest(image, owner="test-reader", state_dir=tmp_path / "reader") as gm:
        target = gm.root / guest_path.lstrip("/")
        return target.read_text() if target.is_file() else None


def test_inject_metadata_hook_after_convert_puts_a_marker_into_the_imported_guest(
    tmp_path: Path, server: TestHTTPServer, linux_qcow2_url: str
) -> None:
    points = {
        "after_convert": [
            {
                "hook": "inject-metadata",
                "with": {
                    "files": [{"path": MARKER, "content": "imaging task {{ task.id }}\n", "mode": "0644"}],
                    "cloud_init_seed": {
                        "meta_data": "instance-id: imported\n",
                        "user_data": "#cloud-config\n",
                    },
                },
            }
        ]
    }
    engine, task = import_with_hooks(tmp_path, server, linux_qcow2_url, points)
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    stored = Path(task.result["stored"]["path"])
    assert read_guest_file(stored, MARKER, tmp_path) == f"imaging task {task.id}\n"
    assert (
        read_guest_file(stored, "/var/lib/cloud/seed/nocloud/meta-data", tmp_path)
        == "instance-id: imported\n"
    )
    # the guest was validated before conversion and the hook saw the report
    assert task.result["guest"]["os"]["distribution"] == "debian"
    # every mount and loop device the hook made is in the ledger as created and removed
    entries = [(e.action, e.resource) for e in engine.store.ledger(task.id)]
    created = {r for a, r in entries if a == "created" and r.startswith(("loop:", "mount:"))}
    removed = {r for a, r in entries if a == "removed" and r.startswith(("loop:", "mount:"))}
    assert created and created == removed


def test_without_the_hook_the_imported_guest_has_no_marker(
    tmp_path: Path, server: TestHTTPServer, linux_qcow2_url: str
) -> None:
    _engine, task = import_with_hooks(tmp_path, server, linux_qcow2_url, {})
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    assert read_guest_file(Path(task.result["stored"]["path"]), MARKER, tmp_path) is None


def test_a_failing_guest_hook_fails_the_import_with_its_code_and_leaves_nothing_mounted(
    tmp_path: Path, server: TestHTTPServer, linux_qcow2_url: str
) -> None:
    # "..": the path escapes the guest root, which the hook refuses before writing anything
    points = {
        "after_convert": [{"hook": "inject-metadata", "with": {"files": [{"path": "/../x", "content": "x"}]}}]
    }
    engine, task = import_with_hooks(tmp_path, server, linux_qcow2_url, points)
    assert task.state is TaskState.FAILED
    assert task.error_code == "Guest.UnsafePath"
    assert not (tmp_path / "x").exists()
    assert guestfactory.mounts_below(tmp_path) == []
    # the converted disk in scratch was undone (removed) by the failure
    entries = [(e.action, e.resource) for e in engine.store.ledger(task.id)]
    assert any(a == "removed" and r.endswith("disk.raw") for a, r in entries)
