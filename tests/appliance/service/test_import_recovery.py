"""Import tasks run by the real worker and its task children, S3 on the moto server process: a kill -9
or a SIGTERM suspend mid-download, overlapping downloads against the scratch quota, and kills while a
partial output is open (qemu-img onto a file volume, the file image target's copy).

The moments are made exact, not timed: downloads go through :class:`~tests.stallproxy.StallingProxy`,
which holds a GET after its first MiB; partial outputs are held as they are opened by
:class:`~tests.fangate.OpenGate` (fanotify, root only).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance.image.inspect import PREFLIGHT_HEAD
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer, DiskImage
from appliance.service.importviews import outcome
from appliance.store import Store, Task, TaskState
from tests import imagefactory as imgs
from tests import processes, stores
from tests.euca_upload import presign_manifest_url, random_file, upload
from tests.fangate import OpenGate, comm
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: downloads are held here: past the preflight's ranged GET of the first PREFLIGHT_HEAD bytes, which
#: reads the object before the download (and whose GET the proxy would otherwise hold instead)
PAST_PREFLIGHT = PREFLIGHT_HEAD + MiB
# this module's waits are bounded at 90 s (two conversions on a shared 2-core machine)
wait_until = functools.partial(processes.wait_until, timeout=90.0, interval=0.1)
TERMINAL = (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


class Appliance:
    """The configuration, the store and the worker processes of one test."""

    def __init__(self, tmp_path: Path, moto: MotoServer, proxy: StallingProxy, **settings: Any) -> None:
        self.state = tmp_path / "state"
        self.logs = tmp_path
        data: dict[str, Any] = {
            "state_dir": str(self.state),
            "sources": {
                "allowed_endpoints": [proxy.endpoint, moto.endpoint],
                "manifest_poll_interval": 0.2,
                "manifest_poll_max_interval": 0.5,
                "retries": 10,
                "s3": {
                    "endpoint_url": proxy.endpoint,  # every S3 read of the appliance can be held
                    "region": REGION,
                    "access_key": "testing",
                    "secret_key": "testing",
                },
            },
            "worker": {"concurrency": 2, "poll_interval": 0.2},
            "tasks": {"lease_seconds": 5},
        }
        for key, value in settings.items():
            data[key] = {**data.get(key, {}), **value}
        self.config_file = tmp_path / "imaging.yaml"
        self.config_file.write_text(yaml.safe_dump(stores.with_store(data)))
        self.config = config_mod.load(self.config_file)
        self.service = ImportService(self.config)
        self.store: Store = self.service.store
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "--config", str(self.config_file), "worker"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.workers.append(proc)
        return proc

    def kill_worker_and_task(self, task_id: str, *others: int) -> None:
        """kill -9 the worker first (so it cannot resume the task), then the task's child process and
        ``others`` (e.g. its qemu-img): nothing gets to clean up."""
        worker = self.workers[-1]
        worker.kill()
        worker.wait()
        owner = self.store.get_task(task_id).owner
        assert owner is not None and owner.startswith(socket.gethostname() + ":")
        for pid in (int(owner.rpartition(":")[2]), *others):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert self.store.get_task(task_id).state is TaskState.RUNNING

    def reserved(self, task_id: str) -> int:
        """Bytes the task has reserved in scratch (read from its scratch directory, not adopting it)."""
        try:
            meta = json.loads((self.config.scratch.root / task_id / ".scratch.json").read_text())
        except (OSError, ValueError):
            return 0
        return sum(r["nbytes"] for r in meta.get("reservations", {}).values())

    def task(self, task_id: str) -> Task:
        return self.store.get_task(task_id)

    def wait_ended(self, *task_ids: str) -> list[Task]:
        wait_until(lambda: all(self.task(t).state in TERMINAL for t in task_ids), what="the tasks to end")
        return [self.task(t) for t in task_ids]

    def ledger(self, task_id: str) -> list[tuple[str, str, str | None]]:
        return [(e.action, e.resource, e.step) for e in self.store.ledger(task_id)]

    def close(self) -> None:
        for proc in self.workers:
            processes.stop_process(proc)
        self.store.close()


@pytest.fixture
def make_appliance(tmp_path: Path, moto: MotoServer, proxy: StallingProxy) -> Iterator[Any]:
    made: list[Appliance] = []

    def make(**settings: Any) -> Appliance:
        app = Appliance(tmp_path, moto, proxy, **settings)
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()


def vhdx_of_random_data(directory: Path, name: str, mib: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """(raw, vhdx) of ``mib`` MiB of random data: the VHDX is larger than its RAW form (its headers,
    BAT and metadata regions), and nothing in it compresses."""
    raw = random_file(directory / f"{name}.raw", mib * MiB, seed=seed)
    vhdx = directory / f"{name}.vhdx"
    imgs.qemu_img("convert", "-f", "raw", "-O", "vhdx", raw, vhdx)
    return raw, vhdx


def same_disk(a: Path, fmt_a: str, b: Path, fmt_b: str) -> None:
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)], capture_output=True, text=True
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def stored_path(task: Task) -> Path:
    return Path(outcome(task)["location"]["path"])


def looks_partial(path: Path) -> bool:
    """A partial output's name, as this code and the code before it named them."""
    return path.name.startswith(".") and ".partial" in path.name


# -- downloads interrupted by a restart -----------------------------------------------------------


def test_snapshot_import_killed_mid_download_completes_after_a_restart_and_matches_the_source(
    make_appliance: Any, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    app = make_appliance()
    raw, vhdx = vhdx_of_random_data(tmp_path, "disk")
    moto.client("s3").upload_file(str(vhdx), bucket, "disk.vhdx")
    proxy.arm("/disk.vhdx", after=PAST_PREFLIGHT)
    task = app.service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key="disk.vhdx"))
    app.start_worker()
    wait_until(
        lambda: proxy.stalled >= 1 and app.reserved(task.id) > 0, what="the download to stop after 3 MiB"
    )
    assert app.reserved(task.id) == vhdx.stat().st_size  # what the download needs, not the free quota
    app.kill_worker_and_task(task.id)
    proxy.release()
    app.start_worker()
    [done] = app.wait_ended(task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.attempts == 2
    same_disk(raw, "raw", stored_path(done), "raw")


def test_snapshot_import_suspended_by_sigterm_mid_download_completes_after_a_restart(
    make_appliance: Any, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    # The S3 read is held with the default read timeout (60 s), far beyond the worker's shutdown grace:
    # only a read that ends when the task is suspended lets the child release the task in time.
    app = make_appliance()
    raw, vhdx = vhdx_of_random_data(tmp_path, "disk")
    moto.client("s3").upload_file(str(vhdx), bucket, "disk.vhdx")
    proxy.arm("/disk.vhdx", after=PAST_PREFLIGHT)
    task = app.service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key="disk.vhdx"))
    worker = app.start_worker()
    wait_until(
        lambda: proxy.stalled >= 1 and app.reserved(task.id) > 0, what="the download to stop after 3 MiB"
    )
    worker.send_signal(signal.SIGTERM)  # the documented suspend: nothing is undone
    assert worker.wait() == 0
    log = (app.logs / "worker-0.log").read_text()
    assert "did not stop within" not in log, log  # suspended, not killed after the grace
    suspended = app.task(task.id)
    assert suspended.state is TaskState.RUNNING and suspended.owner is None  # released for a resume
    events = app.store.events(task_id=task.id, limit=100_000)
    assert [e.data for e in events if e.kind == "step.stopping"] == [
        {"step": "1/include/2", "name": "fetch", "reason": "suspend"}
    ]
    assert "step.abandoned" not in [e.kind for e in events]
    assert app.reserved(task.id) == 0  # the interrupted download's reservation was given back
    proxy.release()
    app.start_worker()
    [done] = app.wait_ended(task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    same_disk(raw, "raw", stored_path(done), "raw")


def fetch_checkpoint(app: Appliance, task_id: str) -> dict[str, Any] | None:
    """The fetch step's checkpoint in the task store (None before the first)."""
    steps = [r.idx for r in app.store.step_results(task_id) if r.name == "fetch"]
    return app.store.load_checkpoint(task_id, steps[0]) if steps else None


def test_snapshot_import_killed_mid_download_resumes_from_its_checkpoint_in_the_store(
    make_appliance: Any, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    # 1 MiB ranges, 2 in flight, a checkpoint at every range: the kill loses at most the range held, the
    # one fetched ahead of it and the range re-read to check the checkpoint
    app = make_appliance(sources={"range_size": "1MiB", "parallel_ranges": 2, "checkpoint_every": MiB})
    raw, vhdx = vhdx_of_random_data(tmp_path, "disk", mib=80)
    size = vhdx.stat().st_size
    moto.client("s3").upload_file(str(vhdx), bucket, "disk.vhdx")
    hold = 40 * MiB + MiB // 2
    proxy.arm("/disk.vhdx", after=hold)
    task = app.service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key="disk.vhdx"))
    app.start_worker()

    def checkpointed() -> int:
        saved = fetch_checkpoint(app, task.id)
        return int(saved["position"]["offset"]) if saved else 0

    wait_until(
        lambda: proxy.stalled >= 1 and checkpointed() == 40 * MiB,
        what="the download to be held at 40.5 MiB, checkpointed at 40 MiB",
    )
    app.kill_worker_and_task(task.id)
    proxy.release()
    app.start_worker()
    [done] = app.wait_ended(task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert done.attempts == 2
    same_disk(raw, "raw", stored_path(done), "raw")
    # everything both attempts fetched (the preflight included): the second went on from the checkpoint
    fetched = proxy.served_by_path[f"/{bucket}/disk.vhdx"]
    assert size < fetched <= 1.1 * size, (fetched, size)


# -- overlapping downloads ----------------------------------------------------------------------------


def test_two_overlapping_snapshot_downloads_that_fit_the_quota_both_complete(
    make_appliance: Any, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    disks = {name: vhdx_of_random_data(tmp_path, name, seed=n) for n, name in enumerate(("a", "b"))}
    s3 = moto.client("s3")
    for name, (_raw, vhdx) in disks.items():
        s3.upload_file(str(vhdx), bucket, f"{name}.vhdx")
        proxy.arm(f"/{name}.vhdx", after=PAST_PREFLIGHT)
    # room for both downloads and both RAW forms, with 1 MiB to spare
    need = sum(vhdx.stat().st_size + raw.stat().st_size for raw, vhdx in disks.values())
    app = make_appliance(scratch={"quota": need + MiB, "min_free": 0})
    tasks = {
        name: app.service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key=f"{name}.vhdx")).id
        for name in disks
    }
    app.start_worker()
    wait_until(
        lambda: (
            (proxy.stalled >= 2 and all(app.reserved(t) > 0 for t in tasks.values()))
            or any(app.task(t).state in TERMINAL for t in tasks.values())
        ),
        what="both downloads to be under way",
    )
    assert [app.task(t).error_code for t in tasks.values()] == [None, None]  # both downloading at once
    proxy.release()
    for name, done in zip(tasks, app.wait_ended(*tasks.values()), strict=True):
        assert done.state is TaskState.COMPLETED, (name, done.error_code, done.error_message)
        same_disk(disks[name][0], "raw", stored_path(done), "raw")


def test_a_download_that_does_not_fit_beside_another_fails_with_insufficient_scratch(
    make_appliance: Any, moto: MotoServer, proxy: StallingProxy, bucket: str, tmp_path: Path
) -> None:
    raw, vhdx = vhdx_of_random_data(tmp_path, "a")
    _, other = vhdx_of_random_data(tmp_path, "b", seed=1)
    s3 = moto.client("s3")
    s3.upload_file(str(vhdx), bucket, "a.vhdx")
    s3.upload_file(str(other), bucket, "b.vhdx")
    size, virtual = vhdx.stat().st_size, raw.stat().st_size
    assert size > virtual
    # one import fits (its download, then its RAW form beside it); two downloads do not
    app = make_appliance(scratch={"quota": size + virtual + (size - virtual) // 2, "min_free": 0})
    proxy.arm("/a.vhdx", after=PAST_PREFLIGHT)
    first = app.service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key="a.vhdx"))
    app.start_worker()
    wait_until(lambda: proxy.stalled >= 1 and app.reserved(first.id) > 0, what="the first download")
    second = app.service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key="b.vhdx"))
    [refused] = app.wait_ended(second.id)
    assert (refused.state, refused.error_code) == (TaskState.FAILED, "InsufficientScratch"), (
        refused.error_message
    )
    assert f"downloading s3://{bucket}/b.vhdx needs" in refused.error_message
    proxy.release()
    [done] = app.wait_ended(first.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    same_disk(raw, "raw", stored_path(done), "raw")


# -- partial outputs of killed processes ------------------------------------------------------------


def test_kill_during_qemu_img_onto_a_file_volume_leaves_no_partial_after_the_restart(
    make_appliance: Any, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    app = make_appliance()
    src = imgs.qcow2_with_data(tmp_path)
    # a random-access VMDK: qemu-img converts it onto the volume (a stream-optimized one would go
    # through the sequential decoder instead, with no qemu-img to kill)
    vmdk = imgs.convert(src, tmp_path / "disk.vmdk", "vmdk", "subformat=monolithicSparse")
    s3 = moto.client("s3")
    pending = presign_manifest_url(s3, bucket, None, vmdk)
    upload(s3, pending, vmdk, file_format="VMDK")
    volumes = app.state / "volumes"
    volumes.mkdir(parents=True)
    task = app.service.import_volume(
        DiskImage("VMDK", imgs.virtual_size(vmdk), pending.url, 1), availability_zone=None, description=None
    )
    # qemu-img is held as it opens its output: the partial exists, qemu-img is running
    with OpenGate(volumes, lambda path, pid: looks_partial(path) and comm(pid) == "qemu-img") as gate:
        app.start_worker()
        wait_until(lambda: gate.held is not None, what="qemu-img to open its output")
        assert gate.held is not None
        partial, qemu_img = gate.held
        assert os.lstat(partial).st_mode & 0o777 == 0o600
        assert ("created", str(partial)) in [(a, r) for a, r, _ in app.ledger(task.id)]
        app.kill_worker_and_task(task.id, qemu_img)
    app.start_worker()
    [done] = app.wait_ended(task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert not [p for p in volumes.iterdir() if looks_partial(p)]
    assert ("removed", str(partial), "recovery") in app.ledger(task.id)
    same_disk(src, "qcow2", Path(done.result["volume"]["path"]), "raw")


def test_kill_during_the_store_step_leaves_no_partial_image_after_the_restart(
    make_appliance: Any, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    app = make_appliance()
    raw, vhdx = vhdx_of_random_data(tmp_path, "disk")
    moto.client("s3").upload_file(str(vhdx), bucket, "disk.vhdx")
    images = app.state / "images"
    images.mkdir(parents=True)
    task = app.service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key="disk.vhdx"))
    with OpenGate(images, lambda path, pid: looks_partial(path)) as gate:
        app.start_worker()
        wait_until(lambda: gate.held is not None, what="the store step to open its partial image")
        assert gate.held is not None
        partial, _pid = gate.held
        assert os.lstat(partial).st_mode & 0o777 == 0o600
        assert ("created", str(partial)) in [(a, r) for a, r, _ in app.ledger(task.id)]
        app.kill_worker_and_task(task.id)
    app.start_worker()
    [done] = app.wait_ended(task.id)
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    assert [p.name for p in images.iterdir()] == [f"{task.id}.raw"]
    assert ("removed", str(partial), "recovery") in app.ledger(task.id)
    same_disk(raw, "raw", stored_path(done), "raw")


def test_worker_start_removes_the_partials_of_tasks_no_process_runs(
    make_appliance: Any, tmp_path: Path
) -> None:
    app = make_appliance()
    out = tmp_path / "out"
    out.mkdir()
    # a task that ended while a partial of it was left behind, and one a live process still runs
    ended = app.store.create_task("workflow", "none", {})
    app.store.set_state(ended.id, TaskState.FAILED, expected=TaskState.PENDING)
    running = app.store.create_task("workflow", "none", {})
    app.store.claim(running.id, f"{socket.gethostname()}:{os.getpid()}", 3600)
    left, live = out / ".disk.raw.partial-0123abcd", out / ".disk.raw.partial-4567cdef"
    for task, path in ((ended, left), (running, live)):
        app.store.add_ledger(task.id, "created", str(path), "3")
        path.write_bytes(b"half")
    app.start_worker()
    wait_until((app.state / "worker.json").exists, what="the worker's first heartbeat")
    assert not left.exists() and live.exists()
    assert ("removed", str(left), "recovery") in app.ledger(ended.id)
    assert [a for a, _, _ in app.ledger(running.id)] == ["created"]
