"""The crash matrix: every step of every shipped import workflow, interrupted by kill -9 and by a suspend.

The steps come from the workflow files themselves (:func:`leaf_steps`, through includes and hook
points): each is interrupted at the moment :func:`_hold_for` names for its action, or listed in
:data:`NOT_INTERRUPTIBLE` with the reason; a step whose action is in neither makes its cell fail, so a
new step is covered or the matrix says what is missing.

Everything is real: the worker (``imaging worker``) and its task children, qemu-img, the guest probe,
S3 on the moto server (behind :class:`~tests.stallproxy.StallingProxy`, which can hold a download
mid-body), and the ``run`` hook's commands. Each moment is made exact, not timed:

- downloads are held by the proxy after a number of body bytes (``source.fetch``, a RAW part);
- ``manifest.wait`` waits for a manifest that is uploaded only after the interruption;
- every other step is held as it opens a file: the appliance's scratch, volumes, images and the hook
  markers live on a directory bind-mounted onto itself, and a fanotify gate on that mount
  (:class:`~tests.fangate.MountGate`) holds the first open matching the step's moment, made by a
  process of the task's tree, while the store says that step is running. Hook points run a ``run`` hook
  (``cat`` of the task's marker file), configured at every point.

Two appliances run side by side, one per way of interrupting, each with one task per import workflow:
import-snapshot from an S3 UserBucket (VHDX), import-image from an http(s) ``Url`` (a gzip-compressed
RAW Linux disk, so inspection decompresses), import-volume of a RAW upload (parts streamed onto the
volume) and import-instance of a VHD upload (assembled in scratch, converted onto the volume). The
steps of import-disk and import-volume, which import-snapshot/import-image and import-instance include,
are so interrupted under both sources and both kinds of upload. Every task is interrupted at each of
its steps in turn, one round per step, all tasks of a round at once:

- ``kill``: the worker and every process below it (task children, qemu-img, the probe, hook commands)
  are stopped and killed with SIGKILL at one moment, then a new worker is started;
- ``suspend``: the worker gets SIGTERM; it must suspend every task within its grace (the step stops,
  the task is released, nothing is undone), then a new worker is started.

Each task then ends ``completed``, its disk equal to the source (``qemu-img compare``), with no partial
output, scratch directory, loop device, isolation directory or process left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest
import yaml

from appliance import config as config_mod
from appliance import partials
from appliance.service.imports import ImportService
from appliance.service.importtasks import DiskContainer, DiskImage
from appliance.service.importviews import outcome
from appliance.store import Store, Task, TaskState
from appliance.workflow.loader import WorkflowLoader
from appliance.workflow.model import StepSpec, Workflow
from tests import guestfactory, processes
from tests import imagefactory as imgs
from tests.euca_upload import PendingUpload, presign_manifest_url, random_file, upload
from tests.fangate import MountGate, bind_mount
from tests.servers import REGION, MotoServer
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: a round waits this long at most for every task to reach its moment (a shared 2-core machine)
wait_until = functools.partial(processes.wait_until, timeout=120.0, interval=0.05)
TERMINAL = (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)
MODES = ("kill", "suspend")
#: the import workflows, and the source or upload each one's task uses
VARIANTS = {
    "import-snapshot": "s3-userbucket",
    "import-image": "url",
    "import-volume": "raw-parts",
    "import-instance": "vhd-parts",
}
HOOK_POINTS = ("after_fetch", "after_inspect", "after_convert", "before_write")
VOLUME_WORKFLOWS = ("import-volume", "import-instance")
PART_SIZE = 2 * MiB
_VOLUME_FILE = re.compile(r"^vol-[0-9a-f]{8,17}\.raw$")


# -- how each step is interrupted ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Opener:
    """An open of a file on the gated mount, by a process of a task's tree."""

    path: Path
    pid: int
    #: the task's own process (the worker's child running it)
    task_pid: int
    comm: str
    run: Run


@dataclasses.dataclass(frozen=True)
class Hold:
    """The moment of a step at which it is interrupted.

    ``kind``: ``open`` (the gate holds the first open ``match`` accepts while the step runs), ``stall``
    (the proxy holds the task's download of ``suffix`` after ``after`` bytes) or ``upload`` (the step
    waits for an upload that comes only after the interruption).
    """

    kind: str
    what: str
    match: Callable[[Opener], bool] | None = None
    #: the stalled download (a path suffix, formatted with the run's names) and where it stops
    suffix: str = ""
    after: int = 0
    #: bytes the task must have reported done before the moment counts as reached
    done_at_least: int = 0


def _in(directory: Callable[[Run], Path]) -> Callable[[Opener], bool]:
    return lambda o: o.path.parent == directory(o.run)


def _opens_marker(o: Opener) -> bool:
    return o.path == o.run.marker


def _by_a_child(o: Opener) -> bool:
    return o.pid != o.task_pid


def _hold_for(action: str, variant: str) -> Hold | str | None:
    """How a step of ``action`` is interrupted in a task of ``variant``: a :class:`Hold`, the reason it is
    not interrupted (a string), or None when nobody has said yet (the cell fails)."""
    if action == "hooks":
        return Hold("open", "the point's run hook (cat) opens the task's marker", _opens_marker)
    if action == "source.fetch":
        if variant == "url":
            # the source (a small gzip) is read whole by the route step's header-only preflight GET
            # before the fetch starts, so no byte count holds the fetch's own download: its file is
            return Hold(
                "open",
                "the download creates its file in scratch",
                lambda o: o.pid == o.task_pid and o.path.name == "source.img" and _in(Run.scratch_dir)(o),
            )
        return Hold("stall", "the download is held after its first bytes", suffix="{source_key}", after=-1)
    if action == "image.inspect":
        if variant == "url":
            return Hold(
                "open",
                "the decompressed copy (a partial) is created",
                lambda o: o.pid == o.task_pid and partials.is_partial(o.path) and _in(Run.scratch_dir)(o),
            )
        return Hold("open", "qemu-img opens the image to inspect it", lambda o: o.comm == "qemu-img")
    if action == "guest.validate":
        return Hold("open", "the guest probe (a limited child) opens the image", _by_a_child)
    if action == "scratch.reserve":
        # Not inside the lock, which every task's scratch work takes: a task held there would hold the others.
        return Hold(
            "open",
            "the step opens the scratch lock to reserve",
            lambda o: o.pid == o.task_pid and o.path == o.run.app.scratch / ".lock",
        )
    if action == "image.convert":
        return Hold(
            "open",
            "qemu-img opens its partial output",
            lambda o: o.comm == "qemu-img" and partials.is_partial(o.path),
        )
    if action == "image.store":
        return Hold(
            "open",
            "the image target opens its partial copy",
            lambda o: partials.is_partial(o.path) and _in(Run.images)(o),
        )
    if action == "manifest.wait":
        return Hold("upload", "the step polls for a manifest that is not uploaded yet")
    if action == "volume.create":
        return Hold(
            "open",
            "the volume file is created",
            lambda o: bool(_VOLUME_FILE.match(o.path.name)) and _in(Run.volumes)(o),
        )
    if action == "volume.import":
        if variant == "raw-parts":
            return Hold(
                "stall",
                "the second part is held mid-download, the first one written onto the volume",
                suffix="{upload_name}.part.1",
                after=256 * 1024,
                done_at_least=PART_SIZE,
            )
        return Hold(
            "open",
            "qemu-img opens its partial output beside the volume",
            lambda o: o.comm == "qemu-img" and partials.is_partial(o.path) and _in(Run.volumes)(o),
        )
    if action == "volume.finalize":
        return Hold(
            "open",
            "the volume is opened to be flushed",
            lambda o: bool(_VOLUME_FILE.match(o.path.name)) and _in(Run.volumes)(o),
        )
    if action == "provenance.record":
        if variant == "vhd-parts":  # qemu-img wrote the volume: it is read once for its digest
            return Hold(
                "open",
                "the volume is opened to be hashed for the provenance record",
                lambda o: bool(_VOLUME_FILE.match(o.path.name)) and _in(Run.volumes)(o),
            )
        return (
            "builds the record in memory from the digests the fetch and store steps computed (the stored "
            "image's sha256 is in its location, a streamed volume's sha256-chunked in the volume step's "
            "result): no file, process or connection to hold it at, like util.echo; a resume runs it again"
        )
    return NOT_INTERRUPTIBLE.get(action)


#: actions whose steps are not interrupted, and why
NOT_INTERRUPTIBLE = {
    "util.echo": (
        "computes its result from its arguments in memory: no file, process or connection to hold it at; a "
        "kill there falls between the store's record of its start and of its end, which a resume treats "
        "like a kill right after the previous step (interrupted at every other step here)"
    ),
    "ova.open": (
        "no variant here imports an OVA: for every other disk the step passes its arguments through in "
        "memory, like util.echo (an OVA import's unpack is tested in tests/api/test_e2e_export.py, not "
        "interrupted)"
    ),
    "loop of include:import-disk": (
        "import-image's data disks (DiskContainer.2 onwards): the same import-disk steps as its boot disk, "
        "interrupted there; the image imported here has one disk, so the loop has no item"
    ),
    "loop of include:import-ova-disk": (
        "an OVA's data disks: no variant here imports an OVA (see ova.open), so the loop has no item"
    ),
    "source.route": (
        "two ranged GETs of the source's first and last bytes (the preflight, not held here, as it was not "
        "when source.fetch ran it) and a decision in memory; it writes nothing, so a kill there falls "
        "between the store's record of its start and of its end, which a resume runs again from the start"
    ),
    "image.stream": (
        "skipped (its `when` is false) in every task here: the run hooks configured at every point route "
        "each disk through scratch, so a skipped step does nothing to interrupt; the streamed path is "
        "killed mid-stream and resumed from its checkpoint in tests/appliance/steps/"
        "test_image_stream_resume.py, and its partial image is removed on any failure "
        "(tests/appliance/steps/test_image_stream.py)"
    ),
    "util.fail": (
        "import-volume's check-volume-in-place is skipped (its `when` is false) unless a hook replaced the "
        "volume, which fails the task on purpose: a skipped step does nothing to interrupt"
    ),
}


# -- the steps, from the workflow files ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """One step of one workflow's task, interrupted one way."""

    mode: str
    workflow: str
    variant: str
    idx: str
    label: str
    action: str
    hold: Hold | None
    reason: str | None

    @property
    def id(self) -> str:
        return f"{self.mode}-{self.workflow}-{self.variant}-{self.label}"


def leaf_steps(workflow: Workflow, prefix: str = "", path: str = "") -> Iterator[tuple[str, str, StepSpec]]:
    """(store index, label, step) of every step that runs something: includes are walked into, a hook point
    is one step (its hooks run inside it)."""
    for step in workflow.steps:
        idx, label = f"{prefix}{step.index}", f"{path}{step.name}"
        if step.include is not None and step.loop is None:
            yield from leaf_steps(step.include, f"{idx}/include/", f"{label}/")
        else:
            yield idx, label, step


def action_of(step: StepSpec) -> str:
    if step.hooks is not None:
        return "hooks"
    if step.loop is not None and step.include is not None:
        return f"loop of include:{step.include_ref}"
    if step.loop is not None:
        return f"loop of {step.action}"  # nothing says how to interrupt one item: the cell fails
    return str(step.action)


def cells_of(
    variants: dict[str, tuple[str, ...]], hold_for: Callable[[str, str], Hold | str | None]
) -> tuple[Cell, ...]:
    """A cell per mode, workflow, variant and leaf step (``hold_for(action, variant)``: how the step is
    held, or why it is not interrupted); the export-side matrix builds its cells with this too."""
    loader = WorkflowLoader(config_mod.from_dict({}).workflow_dirs)
    cells = []
    for mode in MODES:
        for workflow, names in variants.items():
            for variant in names:
                for idx, label, step in leaf_steps(loader.load(workflow)):
                    action = action_of(step)
                    how = hold_for(action, variant)
                    hold = how if isinstance(how, Hold) else None
                    reason = how if isinstance(how, str) else None
                    cells.append(Cell(mode, workflow, variant, idx, label, action, hold, reason))
    return tuple(cells)


def params_of(cells: tuple[Cell, ...]) -> list[Any]:
    """The cells as pytest parameters, a cell not interrupted skipped with its reason."""
    out = []
    for cell in cells:
        marks = [pytest.mark.skip(reason=f"not interrupted: {cell.reason}")] if cell.reason else []
        out.append(pytest.param(cell, id=cell.id, marks=marks))
    return out


@functools.cache
def matrix_cells() -> tuple[Cell, ...]:
    return cells_of({workflow: (variant,) for workflow, variant in VARIANTS.items()}, _hold_for)


def cell_params() -> list[Any]:
    return params_of(matrix_cells())


# -- the appliances --------------------------------------------------------------------------------


def run_hook(markers: Path, point: str) -> dict[str, Any]:
    return {
        "hook": "run",
        "name": f"hold-{point}",
        "with": {"command": ["cat", f"{markers}/{{{{ task.id }}}}"], "timeout": 600},
    }


class App:
    """One appliance: its configuration, store, directories on the gated mount and worker generations."""

    def __init__(self, mode: str, base: Path, data: Path, moto: MotoServer, proxy: StallingProxy) -> None:
        self.mode = mode
        self.root = base / mode
        self.root.mkdir(parents=True)
        self.scratch = data / mode / "scratch"
        self.volumes = data / mode / "volumes"
        self.images = data / mode / "images"
        self.markers = data / "markers"
        self.config_file = self.root / "imaging.yaml"
        self.config_file.write_text(yaml.safe_dump(self.settings(moto, proxy)))
        self.config = config_mod.load(self.config_file)
        self.db = self.config.db_path
        self.service = ImportService(self.config)
        self.store: Store = self.service.store
        self.worker: subprocess.Popen[bytes] | None = None
        self.generation = -1

    def settings(self, moto: MotoServer, proxy: StallingProxy) -> dict[str, Any]:
        """The appliance's configuration (a subclass changes what its tasks need)."""
        return {
            "state_dir": str(self.root / "state"),
            "scratch": {"root": str(self.scratch)},
            "targets": {
                "volume": {"type": "file", "directory": str(self.volumes)},
                "image": {"type": "file", "directory": str(self.images)},
            },
            "sources": {
                "allowed_endpoints": [proxy.endpoint, moto.endpoint],
                "manifest_poll_interval": 0.2,
                "manifest_poll_max_interval": 0.5,
                "retries": 10,
                "s3": {
                    "endpoint_url": proxy.endpoint,
                    "region": REGION,
                    "access_key": "testing",
                    "secret_key": "testing",
                },
            },
            "worker": {"concurrency": len(VARIANTS), "poll_interval": 0.2},
            "tasks": {"lease_seconds": 60},
            "hooks": {"points": {p: [run_hook(self.markers, p)] for p in HOOK_POINTS}},
        }

    def start_worker(self) -> None:
        self.generation += 1
        with open(self.root / f"worker-{self.generation}.log", "wb") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "--config", str(self.config_file), "worker"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return (self.root / f"worker-{self.generation}.log").read_text()

    def task(self, task_id: str) -> Task:
        return self.store.get_task(task_id)

    def events(self, task_id: str, kind: str) -> list[dict[str, Any]]:
        return [e.data for e in self.store.events(task_id=task_id, limit=1_000_000) if e.kind == kind]

    def close(self) -> None:
        if self.worker is not None:
            processes.stop_process(self.worker)
        self.store.close()


@dataclasses.dataclass
class Run:
    """One task of the matrix and where it is in its cells."""

    app: App
    workflow: str
    variant: str
    task_id: str
    #: the RAW disk the result must equal
    source: Path
    #: names the stalled downloads are found by
    names: dict[str, str]
    cells: list[Cell] = dataclasses.field(default_factory=list)
    #: the manifest upload that ends a ``manifest.wait`` hold
    pending_upload: Callable[[], None] | None = None
    pos: int = 0
    interruptions: int = 0
    #: cell id -> (the path held, when an open was) for the checks at the end
    held_paths: dict[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def current(self) -> Cell | None:
        return self.cells[self.pos] if self.pos < len(self.cells) else None

    @property
    def marker(self) -> Path:
        return self.app.markers / self.task_id

    def scratch_dir(self) -> Path:
        return self.app.scratch / self.task_id

    def volumes(self) -> Path:
        return self.app.volumes

    def images(self) -> Path:
        return self.app.images

    def suffix(self, hold: Hold) -> str:
        return hold.suffix.format(**self.names)


# -- the gate's view of processes ------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def task_process(pid: int) -> tuple[str, int] | None:
    """(task id, pid of the task's process) when ``pid`` is a worker's task child or below one."""
    for _ in range(16):
        argv = _cmdline(pid)
        if "appliance.service.worker" in argv:
            at = argv.index("appliance.service.worker")
            if len(argv) > at + 2 and argv[at + 1] in ("run", "resume"):
                return argv[at + 2], pid
        proc = processes.read_proc(pid)
        if proc is None or proc.ppid <= 1:
            return None
        pid = proc.ppid
    return None


class Gate:
    """Decides, for the :class:`MountGate`, which open interrupts which task (see the module docstring)."""

    def __init__(self, runs: dict[str, Run]) -> None:
        self.runs = runs
        #: cells whose moment has passed: their step, going on, is not held again
        self.released: set[str] = set()
        self._local = threading.local()

    def _step_running(self, run: Run, idx: str) -> bool:
        # A connection of the gate's thread; the database is not on the gated mount.
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(run.app.db)
        if conn is None:
            conn = conns[run.app.db] = sqlite3.connect(f"file:{run.app.db}?mode=ro", uri=True)
        row = conn.execute(
            "SELECT state FROM steps WHERE task_id = ? AND idx = ?", (run.task_id, idx)
        ).fetchone()
        return row is not None and row[0] == "running"

    def decide(self, path: Path, pid: int) -> str | None:
        owner = task_process(pid)
        if owner is None:
            return None
        run = self.runs.get(owner[0])
        cell = run.current if run is not None else None
        if run is None or cell is None or cell.hold is None or cell.hold.kind != "open":
            return None
        if cell.id in self.released:
            return None
        assert cell.hold.match is not None
        if not self._step_running(run, cell.idx):
            return None
        if not cell.hold.match(Opener(path, pid, owner[1], _comm(pid), run)):
            return None
        return run.task_id


# -- driving the rounds ----------------------------------------------------------------------------


class Matrix:
    """The two appliances, their tasks, and the outcome of every cell."""

    def __init__(
        self,
        apps: dict[str, App],
        runs: dict[str, Run],
        proxy: StallingProxy,
        gate: Gate,
        mount_gate: MountGate,
        base: Path,
        data: Path,
    ) -> None:
        self.apps = apps
        self.runs = runs
        self.proxy = proxy
        self.decider = gate
        self.gate = mount_gate
        #: the test's directory, and the gated mount in it
        self.base = base
        self.data = data
        #: cell id -> None (passed) or what went wrong
        self.outcomes: dict[str, str | None] = {}
        #: processes killed in each kill round, all of which must be gone
        self.killed: list[processes.Proc] = []

    # -- moments -------------------------------------------------------------------------------

    def reached(self, run: Run) -> bool:
        cell = run.current
        assert cell is not None and cell.hold is not None
        hold = cell.hold
        if hold.kind == "open":
            return run.task_id in self.gate.held
        if hold.kind == "stall":
            if self.proxy.stalled_on(run.suffix(hold)) < 1:
                return False
            return (run.app.task(run.task_id).bytes_done or 0) >= hold.done_at_least
        return any(e.get("step") == cell.idx for e in run.app.events(run.task_id, "waiting"))

    def ended(self, run: Run) -> bool:
        return run.app.task(run.task_id).state in TERMINAL

    def held_in_process(self, run: Run) -> bool:
        """Whether the run's moment is an open the task's own process makes (not a child's, a download)."""
        held = self.gate.held.get(run.task_id)
        if held is None:
            return False
        owner = task_process(held[1])
        return owner is not None and owner[1] == held[1]

    def release(self, run: Run) -> None:
        cell = run.current
        assert cell is not None and cell.hold is not None
        if cell.hold.kind == "open":
            held = self.gate.held.get(run.task_id)
            if held is not None:
                run.held_paths[cell.id] = held[0]
            self.decider.released.add(cell.id)
            self.gate.release(run.task_id)
        elif cell.hold.kind == "stall":
            self.proxy.release(run.suffix(cell.hold))
        elif run.pending_upload is not None:
            run.pending_upload()
            run.pending_upload = None

    def fail(self, run: Run, message: str) -> None:
        """Record ``message`` for the run's cells from the current one on, and stop interrupting it."""
        for cell in run.cells[run.pos :]:
            self.outcomes.setdefault(cell.id, message)
        run.pos = len(run.cells)

    # -- rounds --------------------------------------------------------------------------------

    def run_all(self) -> None:
        for app in self.apps.values():
            app.start_worker()
        while active := [r for r in self.runs.values() if r.current is not None]:
            done = [r for r in self.runs.values() if r.current is None]
            try:
                # ... and every task that has no moment left has ended: an interruption meant for the others
                # must not hit it too
                wait_until(
                    lambda active=active, done=done: (
                        all(self.reached(r) or self.ended(r) for r in active)
                        and all(self.ended(r) for r in done)
                    ),
                    what="every task to reach its next moment",
                )
            except pytest.fail.Exception:
                for run in active:
                    if not self.reached(run):
                        self.fail(run, f"never reached {run.current.hold.what!r} (step {run.current.label})")
            for run in active:
                if run.current is not None and not self.reached(run):
                    task = run.app.task(run.task_id)
                    if run.interruptions and task.state is TaskState.FAILED:
                        previous = run.cells[run.pos - 1]
                        self.outcomes[previous.id] = (
                            f"after the interruption the task failed: {task.error_code}: {task.error_message}"
                        )
                    self.fail(
                        run,
                        f"the task ended {task.state} ({task.error_code}: {task.error_message}) before "
                        f"{run.current.hold.what!r} (step {run.current.label})",
                    )
            self.kill_round([r for r in active if r.app.mode == "kill" and r.current is not None])
            self.suspend_round([r for r in active if r.app.mode == "suspend" and r.current is not None])
            for app in self.apps.values():
                app.start_worker()
        for run in self.runs.values():
            self.release_all(run)
        wait_until(
            lambda: all(r.app.task(r.task_id).state in TERMINAL for r in self.runs.values()),
            what="every task to end",
        )
        for app in self.apps.values():
            assert app.worker is not None
            app.worker.send_signal(signal.SIGTERM)
            app.worker.wait()

    def release_all(self, run: Run) -> None:
        self.gate.release(run.task_id)
        for suffix in ("{source_key}", "{upload_name}.part.1"):
            self.proxy.release(suffix.format(**run.names))
        if run.pending_upload is not None:
            run.pending_upload()
            run.pending_upload = None

    def kill_round(self, runs: list[Run]) -> None:
        app = self.apps["kill"]
        assert app.worker is not None
        killed = processes.kill_tree(app.worker.pid)
        app.worker.wait()
        self.killed.extend(killed)
        for run in runs:
            self.release(run)  # an opener held by the gate dies as its open returns
        with contextlib.suppress(pytest.fail.Exception):
            wait_until(lambda: not any(p.alive() for p in killed), what="the killed processes to be gone")
        survivors = [p for p in killed if p.alive()]
        for run in runs:
            cell = run.current
            assert cell is not None
            self.outcomes[cell.id] = f"processes survived kill -9: {survivors}" if survivors else None
            run.interruptions += 1
            run.pos += 1

    def suspend_round(self, runs: list[Run]) -> None:
        app = self.apps["suspend"]
        assert app.worker is not None
        app.worker.send_signal(signal.SIGTERM)
        stopped: dict[str, bool] = {}
        for run in runs:
            cell = run.current
            assert cell is not None

            def stopping(run: Run = run, idx: str = cell.idx) -> bool:
                return any(
                    e.get("reason") == "suspend" and (e["step"] == idx or e["step"].startswith(idx + "/"))
                    for e in app.events(run.task_id, "step.stopping")
                )

            with contextlib.suppress(pytest.fail.Exception):
                wait_until(
                    lambda s=stopping: s() or app.worker.poll() is not None,  # type: ignore[union-attr]
                    what="the step to be asked to stop",
                )
            stopped[run.task_id] = stopping()
            if self.held_in_process(run):
                # The step's own thread waits in the kernel and cannot look at the cancel: let its open
                # through (it goes on to its next look at the cancel, or to its end). A held download, a
                # poll or a child process the step stops by itself, and stays held until the worker is gone.
                self.release(run)
        code = app.worker.wait()
        for run in runs:
            self.release(run)
        log = app.log()
        for run in runs:
            cell = run.current
            assert cell is not None
            task = app.task(run.task_id)
            problems = []
            if code != 0:
                problems.append(f"the worker exited with {code}")
            if f"task {run.task_id}: child did not stop within" in log:
                problems.append("its child was killed after the shutdown grace")
            if not stopped[run.task_id]:
                problems.append("the held step was never asked to stop (no step.stopping: suspend)")
            if (task.state, task.owner) != (TaskState.RUNNING, None):
                problems.append(f"the task is {task.state} owned by {task.owner}, not released for a resume")
            if app.events(run.task_id, "step.abandoned"):
                problems.append("a step was abandoned")
            self.outcomes[cell.id] = "; ".join(problems) or None
            run.interruptions += 1
            run.pos += 1


# -- fixtures --------------------------------------------------------------------------------------


def s3_via(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


@dataclasses.dataclass(frozen=True)
class Disks:
    #: random data, the snapshot's content
    data: Path
    data_vhdx: Path
    #: a bootable Linux disk, the image's and the instance's content
    linux: Path
    linux_gz: Path
    linux_vhd: Path
    #: random data uploaded RAW as a volume
    volume: Path


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Disks:
    base = tmp_path_factory.mktemp("disks")
    data = random_file(base / "data.raw", 6 * MiB, seed=1)
    data_vhdx = base / "data.vhdx"
    imgs.qemu_img("convert", "-f", "raw", "-O", "vhdx", data, data_vhdx)
    linux = guestfactory.linux_disk(base)
    linux_gz = imgs.compress(linux, "gzip")
    linux_vhd = base / "linux.vhd"
    imgs.qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", linux, linux_vhd)
    volume = random_file(base / "volume.raw", 5 * MiB, seed=2)
    return Disks(data, data_vhdx, linux, linux_gz, linux_vhd, volume)


def start_tasks(app: App, moto: MotoServer, proxy: StallingProxy, disks: Disks, bucket: str) -> list[Run]:
    """Upload what the app's four tasks import, create the tasks, arm the proxy for their held downloads."""
    s3, via_proxy = moto.client("s3"), s3_via(proxy.endpoint)
    cells = [c for c in matrix_cells() if c.mode == app.mode]
    mode = app.mode
    runs = []

    def cells_of(workflow: str) -> list[Cell]:
        return [c for c in cells if c.workflow == workflow and c.reason is None]

    # import-snapshot: S3 UserBucket
    key = f"{mode}-snapshot.vhdx"
    s3.upload_file(str(disks.data_vhdx), bucket, key)
    task = app.service.import_snapshot(DiskContainer(format="VHDX", bucket=bucket, key=key))
    names = {"source_key": f"/{bucket}/{key}", "upload_name": "-"}
    runs.append(Run(app, "import-snapshot", VARIANTS["import-snapshot"], task.id, disks.data, names))

    # import-image: an http(s) Url (presigned, through the proxy), gzip-compressed RAW
    key = f"{mode}-image.raw.gz"
    s3.upload_file(str(disks.linux_gz), bucket, key)
    url = via_proxy.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=7200
    )
    task = app.service.import_image([DiskContainer(format="RAW", url=url)], platform="Linux")
    names = {"source_key": f"/{bucket}/{key}", "upload_name": "-"}
    runs.append(Run(app, "import-image", VARIANTS["import-image"], task.id, disks.linux, names))

    # import-volume: RAW parts, uploaded after the task waited for them once
    for workflow, disk, fmt in (
        ("import-volume", disks.volume, "RAW"),
        ("import-instance", disks.linux_vhd, "VHD"),
    ):
        named = disk.parent / f"{mode}-{disk.name}"
        if not named.exists():
            os.link(disk, named)
        pending = presign_manifest_url(via_proxy, bucket, mode, named)
        image = DiskImage(fmt, imgs.virtual_size(named), pending.url, 1)
        if workflow == "import-volume":
            task = app.service.import_volume(image, availability_zone=None, description=None)
        else:
            task = app.service.import_instance(
                image,
                platform="Linux",
                architecture="x86_64",
                instance_type=None,
                description=None,
                launch={},
            )
        names = {"source_key": "-", "upload_name": named.name}
        source = disks.volume if fmt == "RAW" else disks.linux
        run = Run(app, workflow, VARIANTS[workflow], task.id, source, names)
        run.pending_upload = functools.partial(_upload, via_proxy, pending, named, fmt)
        runs.append(run)

    for run in runs:
        run.cells = cells_of(run.workflow)
        run.marker.write_text("held here\n")
        for cell in run.cells:
            if cell.hold is not None and cell.hold.kind == "stall":
                after = cell.hold.after if cell.hold.after > 0 else _half_of(run, disks)
                proxy.arm(run.suffix(cell.hold), after=after)
    return runs


def result_path(task: Task) -> Path:
    """The volume (import-volume, import-instance) or stored image (import-snapshot, import-image)."""
    if "volume" in task.result:
        return Path(task.result["volume"]["path"])
    if "imported" in task.result:
        return Path(task.result["imported"]["volume"]["path"])
    return Path(outcome(task)["location"]["path"])


def _upload(s3: Any, pending: PendingUpload, file: Path, fmt: str) -> None:
    upload(s3, pending, file, file_format=fmt, part_size=PART_SIZE)


def _half_of(run: Run, disks: Disks) -> int:
    source = disks.data_vhdx if run.workflow == "import-snapshot" else disks.linux_gz
    return source.stat().st_size // 2


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, disks: Disks) -> Iterator[Matrix]:
    base = tmp_path_factory.mktemp("matrix")
    bucket = "crash-matrix"
    moto.client("s3").create_bucket(Bucket=bucket)
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(StallingProxy(moto.endpoint))
        data = stack.enter_context(bind_mount(base / "data"))
        (data / "markers").mkdir()
        apps = {mode: App(mode, base, data, moto, proxy) for mode in MODES}
        for app in apps.values():
            stack.callback(app.close)
        runs: dict[str, Run] = {}
        for app in apps.values():
            runs |= {r.task_id: r for r in start_tasks(app, moto, proxy, disks, bucket)}
        decider = Gate(runs)
        gate = stack.enter_context(MountGate(data, decider.decide))
        m = Matrix(apps, runs, proxy, decider, gate, base, data)
        try:
            m.run_all()
        finally:
            for run in runs.values():
                m.release_all(run)
        yield m


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", cell_params())
def test_crash_matrix(matrix: Matrix, cell: Cell) -> None:
    assert cell.hold is not None, (
        f"step {cell.label} of {cell.workflow} runs {cell.action!r}, which the crash matrix cannot interrupt "
        "yet: add a moment for it to _hold_for, or list it in NOT_INTERRUPTIBLE with the reason"
    )
    check_interrupted(
        matrix,
        cell,
        lambda: next(
            r for r in matrix.runs.values() if r.app.mode == cell.mode and r.workflow == cell.workflow
        ),
    )


def check_interrupted(matrix: Matrix, cell: Cell, run_of_cell: Callable[[], Run]) -> None:
    """What every interrupted cell must show (the export-side matrix checks its cells with this too): the
    gate saw no error, the cell was interrupted and its outcome is clean, and the partial file open at the
    interruption is gone, removed by the step itself (suspend) or swept when the task resumed (kill)."""
    assert not matrix.gate.errors, matrix.gate.errors
    assert cell.id in matrix.outcomes, f"{cell.id} was never interrupted"
    assert matrix.outcomes[cell.id] is None, matrix.outcomes[cell.id]
    run = run_of_cell()
    held = run.held_paths.get(cell.id)
    if held is not None and partials.is_partial(held):
        # the partial output open at the interruption is gone, and the ledger says who removed it
        entries = [(e.action, e.resource, e.step) for e in run.app.store.ledger(run.task_id)]
        assert ("created", str(held)) in [(a, r) for a, r, _ in entries]
        removals = [s for a, r, s in entries if a == "removed" and r == str(held)]
        if cell.mode == "kill":
            assert removals == [partials.RECOVERY_STEP], entries  # swept when the task resumed
        else:
            assert removals and partials.RECOVERY_STEP not in removals, entries  # removed by the step itself
        assert not held.exists()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("workflow", list(VARIANTS))
def test_every_interrupted_import_completes_with_the_source_bytes(
    matrix: Matrix, mode: str, workflow: str
) -> None:
    run = next(r for r in matrix.runs.values() if r.app.mode == mode and r.workflow == workflow)
    task = run.app.task(run.task_id)
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    assert task.attempts == run.interruptions + 1 == len(run.cells) + 1  # every interruption was real
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(run.source), str(result_path(task))],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    ledger = run.app.store.ledger(run.task_id)
    assert not [e for e in ledger if e.action == "leaked"], ledger
    created = {e.resource for e in ledger if e.action == "created" and partials.is_partial(e.resource)}
    removed = {e.resource for e in ledger if e.action == "removed" and partials.is_partial(e.resource)}
    assert created == removed  # every partial output was accounted for


@pytest.mark.parametrize("mode", MODES)
def test_nothing_is_left_behind_after_the_matrix(matrix: Matrix, mode: str) -> None:
    app = matrix.apps[mode]
    runs = [r for r in matrix.runs.values() if r.app is app]
    data, base = matrix.data, matrix.base
    # no partial output anywhere
    assert not [p for p in (data / mode).rglob("*") if partials.is_partial(p)]
    # no scratch: every task directory is gone
    assert [p.name for p in app.scratch.iterdir() if p.is_dir()] == []
    # the volumes and images are exactly the results
    results = {r.workflow: result_path(app.task(r.task_id)).name for r in runs}
    volumes = sorted(name for workflow, name in results.items() if workflow in VOLUME_WORKFLOWS)
    images = sorted(name for workflow, name in results.items() if workflow not in VOLUME_WORKFLOWS)
    assert sorted(p.name for p in app.volumes.iterdir()) == volumes
    assert sorted(p.name for p in app.images.iterdir()) == images
    # no process of a killed tree, and none working on this appliance
    assert not [p for p in matrix.killed if p.alive()]
    working = [
        p.pid for p in processes.all_procs() if p.state != "Z" and str(base) in " ".join(_cmdline(p.pid))
    ]
    assert working == []
    # no loop device backed by its files
    listed = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True, check=True)
    loops = json.loads(listed.stdout or "{}")
    assert [d for d in loops.get("loopdevices", []) if str(base) in (d.get("back-file") or "")] == []
    # no isolation directory (qemu-img's, the guest probe's) outside scratch still pointing into the data
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    stray = [
        link
        for link in tmp.glob("qemu-img.*/image")
        if link.is_symlink() and os.readlink(link).startswith(f"{data / mode}/")
    ]
    assert stray == []


def test_the_matrix_covers_every_step_of_every_import_workflow() -> None:
    # The cells are made from the workflow files: each step of each import workflow is in the matrix for
    # both ways of interrupting, as an interrupted cell or as a listed exception with its reason.
    loader = WorkflowLoader(config_mod.from_dict({}).workflow_dirs)
    for workflow in VARIANTS:
        steps = [label for _idx, label, _step in leaf_steps(loader.load(workflow))]
        for mode in MODES:
            cells = [c for c in matrix_cells() if c.workflow == workflow and c.mode == mode]
            assert [c.label for c in cells] == steps
    uncovered = sorted({c.action for c in matrix_cells() if c.hold is None and c.reason is None})
    assert uncovered == [], f"no moment to interrupt {uncovered} at; see _hold_for"
