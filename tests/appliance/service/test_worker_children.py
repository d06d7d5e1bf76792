"""The worker's bookkeeping of its task children where two mechanisms meet: cancel notifications and
reaping, spawn failures and lease renewal, live configuration re-reads and the task database, the
start-up sweeps and a database outage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.errors import StoreUnavailable
from appliance.scratch import ScratchSpace
from appliance.service import children as children_mod
from appliance.service.worker import Worker, cleanup_scratch
from appliance.store import Lease, Store
from tests import processes

# the worker's own bookkeeping: one backend is enough (the outage is simulated at the store's lookup)
pytestmark = pytest.mark.backends("sqlite")


def _config(tmp_path: Path, extra: str = "") -> Path:
    f = tmp_path / "imaging.yaml"
    f.write_text(f"state_dir: {tmp_path / 'state'}\nworker: {{concurrency: 2, poll_interval: 0.2}}\n{extra}")
    return f


def test_a_cancel_for_a_child_that_just_exited_leaves_it_for_the_reaper(tmp_path: Path) -> None:
    worker = Worker(config_mod.load(_config(tmp_path)))
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    worker.children["t-1"] = child
    # the child has exited but nobody collected its status yet (it is a zombie)
    processes.wait_until(lambda: children_mod._exited(child), what="the child to exit")
    worker._pass_cancel("t-1")  # a cancel notification arriving just then
    worker._reap()  # before: poll() in _pass_cancel collected the status and waitid raised here
    assert worker.children == {}
    assert child.returncode == 0


def test_a_failed_spawn_leaves_no_lease_for_the_worker_to_renew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = Worker(config_mod.load(_config(tmp_path)))

    def no_process(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(children_mod.subprocess, "Popen", no_process)
    with pytest.raises(OSError):
        worker._spawn("run", "t-1", Lease("worker-a", 1))
    # a lease renewed with no child running the task would keep it from ever being taken over
    assert worker._handed == {}
    assert worker.children == {}


def test_a_live_reload_that_moves_the_task_database_is_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    worker = Worker(config_mod.load(cfg))
    worker._config_stamp = worker._stamp()
    running = worker.config.store
    other = tmp_path / "elsewhere.db"
    cfg.write_text(cfg.read_text() + f"store: {{url: 'sqlite:///{other}'}}\nworker: {{concurrency: 3}}\n")
    assert worker.reload_config() is False
    # the worker keeps claiming in the database its children use
    assert worker.config.store == running
    assert worker.concurrency == 2


class _UnreachableStore(Store):
    """The real store, whose lookups fail as during a database outage."""

    def get_task(self, task_id: str, account: str | None = None):  # type: ignore[no-untyped-def,override]
        raise StoreUnavailable("the task database cannot be reached")


def test_an_outage_during_the_start_up_sweep_deletes_no_scratch(tmp_path: Path) -> None:
    config = config_mod.load(_config(tmp_path))
    scratch = ScratchSpace.from_config(config)
    kept = scratch.for_task("import-vol-live0001").path
    (kept / "disk.raw").write_bytes(b"x" * 4096)
    store = _UnreachableStore(config.store)
    try:
        # before: the outage counted as "task unknown" and the live task's scratch was removed
        with pytest.raises(StoreUnavailable):
            cleanup_scratch(config, store)
    finally:
        store.close()
    assert (kept / "disk.raw").read_bytes() == b"x" * 4096


def test_a_live_change_of_the_targets_restarts_a_pull_reporter_but_not_a_push_one(tmp_path: Path) -> None:
    # a pull reporter runs the imports it is handed with the configuration it started with
    cert = tmp_path / "cloud.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    controllers = {
        "pull": f"{{mode: pull, url: 'http://127.0.0.1:9', cloud_cert_file: '{cert}'}}",
        "push": "{mode: push, url: 'http://127.0.0.1:9', appliance_id: a1, secret: s3cr3t-s3cr3t-s3cr3t}",
    }
    for mode, restarts in (("pull", True), ("push", False)):
        (tmp_path / mode).mkdir()
        cfg = _config(tmp_path / mode, f"controller: {controllers[mode]}\n")
        worker = Worker(config_mod.load(cfg))
        worker._config_stamp = worker._stamp()
        cfg.write_text(cfg.read_text() + "limits: {max_virtual_size: 2GiB}\n")
        assert worker.reload_config() is True
        assert worker.reporter_stale is restarts, mode
