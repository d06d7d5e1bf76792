"""The crash matrix of the export side: every step of export-image, copy-image and export-instance,
interrupted by kill -9 and by a suspend in the middle of its writing.

The machinery is the import matrix's (:mod:`tests.appliance.service.test_crash_matrix`: its appliances,
worker generations, rounds, fanotify gate and checks of a round); only the tasks and their moments are
the export side's. The steps come from the workflow files (:func:`leaf_steps`); each is interrupted at
the moment :func:`_hold_for` names for its action in a task's variant, or listed in
:data:`NOT_INTERRUPTIBLE` with the reason, so a new step is covered or the matrix says what is missing.

Everything is real: the worker (``imaging worker``) and its task children, qemu-img, S3 and EC2 on the
moto server (S3 behind :class:`~tests.stallproxy.StallingProxy`), the image exported stored by a real
ImportImage, the cloud instance's disk a real loop device (the EC2 side as
tests/appliance/targets/test_ec2_export.py drives it). The moments are exact, not timed:

- mid-upload: the proxy holds the second ``UploadPart`` (``UploadPartCopy`` for a copy S3 makes) of
  the task's object before it reaches S3, and the moment counts once S3 lists a part of that upload
  (a multipart upload started, a part sent);
- mid-write to a directory: the fanotify gate holds the copy's open of its partial file;
- mid-download: the export of an image stored in S3 first downloads it into scratch; the proxy holds
  that GET half-way (the scratch copy half written).

Two appliances run side by side, one per way of interrupting (``kill``: the worker and every process
below it SIGKILLed, a new worker; ``suspend``: SIGTERM, every task suspended within the grace, a new
worker), each with one task per variant: export-image to RAW, to streamOptimized VMDK, to VHD (each
format its own writer) and to an OVA (its VMDK written to scratch, then the tar streamed) of an image
stored as a file, and to RAW of one stored in S3 (the S3 image target); copy-image of the file into
another bucket (streamed) and into a directory, and of an object into another bucket of its endpoint
(copied by S3: ``UploadPartCopy``); export-instance of an instance of the controlling cloud to RAW.

Each task then ends ``completed``, its output equal to the source (``qemu-img compare``; an object's
sha256 metadata that of its bytes), with no incomplete multipart upload in any bucket, no object or
file but the outputs, no partial file, scratch directory, EC2 volume or snapshot, loop device or
process left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config as config_mod
from appliance import partials
from appliance.service.copies import CopyService, copy_outcome
from appliance.service.exports import ExportService, object_key
from appliance.service.importtasks import DiskContainer
from appliance.service.importviews import outcome
from appliance.store import Task, TaskState
from appliance.targets.ec2 import TASK_TAG
from appliance.workflow.engine import Engine
from appliance.workflow.loader import SHIPPED_DIR, WorkflowLoader
from tests import guestfactory, processes
from tests.appliance.service.test_crash_matrix import (
    MODES,
    App,
    Cell,
    Gate,
    Hold,
    Matrix,
    Opener,
    Run,
    _cmdline,
    cells_of,
    check_interrupted,
    leaf_steps,
    params_of,
)
from tests.appliance.targets.test_ec2 import FakeHypervisor
from tests.euca_upload import random_file
from tests.fangate import MountGate, bind_mount
from tests.loopdevs import attached
from tests.servers import REGION, TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer
from tests.stallproxy import StallingProxy

# the gate reads the task database (SQLite) itself
pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite")]

MiB = 1 << 20
PART_SIZE = 5 * MiB  # S3's smallest: the disks below are several parts
#: the export-side workflows, and the tasks (variants) each one runs
VARIANTS = {
    "export-image": ("raw", "vmdk", "vhd", "ova", "s3-stored"),
    "copy-image": ("s3", "dir", "server-side"),
    "export-instance": ("raw",),
}
IN_BUCKET, OUT_BUCKET, COPY_BUCKET = "xmatrix-in", "xmatrix-out", "xmatrix-copies"
#: the S3 image target's bucket (behind the proxy, as the user buckets: a copy between them is S3's)
IMAGES_BUCKET = "xmatrix-images"
DISK_KEY = "linux.raw"


# -- how each step is interrupted ------------------------------------------------------------------

MID_UPLOAD = Hold(
    "part",
    "the upload's second part is held before it reaches S3, a part of the upload stored",
    suffix="/{bucket}/{key}",
)


def _in_copies(o: Opener) -> bool:
    return (
        isinstance(o.run.app, ExportApp) and o.path.parent == o.run.app.copies and partials.is_partial(o.path)
    )


def _hold_for(action: str, variant: str) -> Hold | str | None:
    """How a step of ``action`` is interrupted in a task of ``variant``: a :class:`Hold`, the reason it is
    not interrupted (a string), or None when nobody has said yet (the cell fails)."""
    if action == "export.write":
        if variant == "s3-stored":
            return Hold(
                "stall",
                "the download of the stored image into scratch is held half-way",
                suffix="{source_key}",
            )
        return MID_UPLOAD
    if action == "copy.image":
        if variant == "dir":
            return Hold("open", "the copy creates its partial file in the destination directory", _in_copies)
        return MID_UPLOAD
    return NOT_INTERRUPTIBLE.get(action)


#: actions whose steps are not interrupted, and why (none yet: every export-side step is)
NOT_INTERRUPTIBLE: dict[str, str] = {}


@functools.cache
def matrix_cells() -> tuple[Cell, ...]:
    return cells_of(VARIANTS, _hold_for)


def cell_params() -> list[Any]:
    return params_of(matrix_cells())


# -- the appliances --------------------------------------------------------------------------------


@dataclasses.dataclass
class Cloud:
    """One appliance's side of the controlling cloud: its own instance (the volumes the export attaches
    go to it), the instance exported, and the loop devices the hypervisor stand-in links those to."""

    appliance: str
    exported: str
    device_dir: Path
    loops: list[Path]


class ExportApp(App):
    """An appliance whose tasks export: no hooks, small parts, the EC2 volume target of its ``cloud``, a
    directory for the copies on the gated mount."""

    def __init__(
        self, mode: str, base: Path, data: Path, moto: MotoServer, proxy: StallingProxy, cloud: Cloud
    ) -> None:
        self.cloud = cloud
        self.copies = data / mode / "copies"
        super().__init__(mode, base, data, moto, proxy)
        self.exports = ExportService(self.config, self.store)
        self.copying = CopyService(self.config, self.store)
        # the configuration an import into the file image target runs with (the worker's stores in S3)
        files = self.settings(moto, proxy)
        files["targets"]["image"] = {"type": "file", "directory": str(self.images)}
        (self.root / "file-images.yaml").write_text(yaml.safe_dump(files))
        self.file_images = config_mod.load(self.root / "file-images.yaml")

    def settings(self, moto: MotoServer, proxy: StallingProxy) -> dict[str, Any]:
        settings = super().settings(moto, proxy)
        del settings["hooks"]
        settings["sources"]["s3"] |= {"part_size": f"{PART_SIZE // MiB}MiB", "threads": 2}
        settings["targets"]["image"] = {
            "type": "s3",
            "bucket": IMAGES_BUCKET,
            "endpoint_url": proxy.endpoint,
            "region": REGION,
            "access_key": "testing",
            "secret_key": "testing",
            "part_size": f"{PART_SIZE // MiB}MiB",
        }
        settings["targets"]["volume"] = {
            "type": "ec2",
            "endpoint_url": moto.endpoint,
            "region": REGION,
            "access_key": TEST_ACCESS_KEY,
            "secret_key": TEST_SECRET_KEY,
            "instance_id": self.cloud.appliance,
            "device_dir": str(self.cloud.device_dir),
            "poll_interval": 0.05,
            "wait_timeout": 60,
            "device_timeout": 60,
        }
        settings["worker"]["concurrency"] = settings["tasks"]["max_active"] = sum(map(len, VARIANTS.values()))
        return settings


# -- driving the rounds ----------------------------------------------------------------------------


class ExportMatrix(Matrix):
    """The import matrix's rounds, with the export side's moment: an upload held mid-way."""

    def __init__(self, moto: MotoServer, *args: Any) -> None:
        super().__init__(*args)
        self.s3 = moto.client("s3")

    def parts_stored(self, run: Run) -> int:
        """Parts S3 holds of the incomplete multipart uploads of the run's object."""
        bucket, key = run.names["bucket"], run.names["key"]
        uploads = self.s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
        return sum(
            len(self.s3.list_parts(Bucket=bucket, Key=key, UploadId=u["UploadId"]).get("Parts", []))
            for u in uploads
            if u["Key"] == key
        )

    def reached(self, run: Run) -> bool:
        cell = run.current
        assert cell is not None and cell.hold is not None
        if cell.hold.kind == "part":
            return self.proxy.stalled_on(run.names["held"]) >= 1 and self.parts_stored(run) >= 1
        return super().reached(run)

    def release(self, run: Run) -> None:
        cell = run.current
        assert cell is not None and cell.hold is not None
        if cell.hold.kind == "part":
            self.proxy.release(run.names["held"])
        else:
            super().release(run)

    def release_all(self, run: Run) -> None:
        super().release_all(run)
        if "held" in run.names:
            self.proxy.release(run.names["held"])


# -- fixtures --------------------------------------------------------------------------------------


def linux_disk_with_data(base: Path) -> Path:
    """A bootable Linux disk (an image guest validation accepts) with 12 MiB of random data appended:
    its streamOptimized VMDK, which deflates it, is still three parts."""
    disk = guestfactory.linux_disk(base)
    with open(disk, "r+b") as f:
        f.seek(disk.stat().st_size)
        f.write(random_file(base / "tail", 12 * MiB, seed=3).read_bytes())
    return disk


@contextlib.contextmanager
def cloud_of(mode: str, base: Path, moto: MotoServer, content: bytes) -> Iterator[Cloud]:
    """An appliance instance, an instance to export, and two loop devices holding ``content`` (whichever
    the hypervisor stand-in links to a volume the export attaches reads as the instance's disk)."""
    ec2 = moto.client("ec2")
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ids = [
        i["InstanceId"]
        for i in ec2.run_instances(ImageId=image_id, MinCount=2, MaxCount=2, InstanceType="t3.micro")[
            "Instances"
        ]
    ]
    device_dir = base / f"by-id-{mode}"
    device_dir.mkdir()
    try:
        with contextlib.ExitStack() as stack:
            loops = []
            for i in range(2):
                backing = base / f"cloud-{mode}-{i}.img"
                backing.write_bytes(content)
                loops.append(stack.enter_context(attached(backing)))
            yield Cloud(ids[0], ids[1], device_dir, loops)
    finally:
        ec2.terminate_instances(InstanceIds=ids)


def import_image(app: ExportApp, config: config_mod.Config) -> tuple[str, dict[str, Any]]:
    """An image the exports read: the source disk imported by a real ImportImage (run here, by the
    engine, with ``config``: into its image target); (its ami id, its stored location)."""
    task = app.service.import_image(
        [DiskContainer(format="RAW", bucket=IN_BUCKET, key=DISK_KEY)], platform="Linux"
    )
    engine = Engine(config, poll_interval=0.1)
    try:
        done = engine.run(task.id)
    finally:
        engine.store.close()
    assert done.state is TaskState.COMPLETED, (done.error_code, done.error_message)
    return "ami-" + done.id[-17:], dict(outcome(done)["location"])


@dataclasses.dataclass(frozen=True)
class Imported:
    """The images an appliance's tasks read, each stored by a real ImportImage of ``disk``: (ami id,
    location) of one in the file image target, and of two in the S3 image target (one for the export
    held in its download, one for the server-side copy: a held download holds every GET of its object)."""

    disk: Path
    file: tuple[str, dict[str, Any]]
    s3_export: tuple[str, dict[str, Any]]
    s3_copy: tuple[str, dict[str, Any]]

    @property
    def stored(self) -> Path:
        return Path(self.file[1]["path"])


def start_tasks(app: ExportApp, proxy: StallingProxy, imported: Imported, cloud_disk: Path) -> list[Run]:
    """Create the app's tasks, one per variant, and arm the proxy for their held uploads and downloads."""
    mode = app.mode
    runs: list[Run] = []

    def add(
        task: Task, variant: str, source: Path, bucket: str = "-", key: str = "-", read: str = "-"
    ) -> None:
        names = {"source_key": read, "upload_name": "-", "bucket": bucket, "key": key}
        runs.append(Run(app, task.kind, variant, task.id, source, names))

    image_id, _ = imported.file
    for fmt in ("raw", "vmdk", "vhd", "ova"):
        task = app.exports.export_image(
            image_id,
            disk_image_format="VMDK" if fmt == "ova" else fmt.upper(),
            container_format="ova" if fmt == "ova" else None,
            bucket=OUT_BUCKET,
            prefix=f"{mode}/",
        )
        add(task, fmt, imported.stored, OUT_BUCKET, object_key(task))
    task = app.copying.copy_image(image_id, f"s3://{COPY_BUCKET}/{mode}/")
    add(task, "s3", imported.stored, COPY_BUCKET, f"{mode}/{task.id}.raw")
    task = app.copying.copy_image(image_id, f"file://{app.copies}")
    add(task, "dir", imported.stored)
    s3_id, location = imported.s3_export
    task = app.exports.export_image(s3_id, disk_image_format="RAW", bucket=OUT_BUCKET, prefix=f"{mode}/")
    add(
        task,
        "s3-stored",
        imported.disk,
        OUT_BUCKET,
        object_key(task),
        f"/{location['bucket']}/{location['key']}",
    )
    task = app.copying.copy_image(imported.s3_copy[0], f"s3://{COPY_BUCKET}/{mode}/")
    add(task, "server-side", imported.disk, COPY_BUCKET, f"{mode}/{task.id}.raw")
    task = app.exports.export_instance(
        app.cloud.exported,
        target_environment="vmware",
        disk_image_format="RAW",
        bucket=OUT_BUCKET,
        prefix=f"{mode}/",
    )
    add(task, "raw", cloud_disk, OUT_BUCKET, object_key(task))

    cells = [c for c in matrix_cells() if c.mode == mode and c.reason is None]
    for run in runs:
        run.cells = [c for c in cells if (c.workflow, c.variant) == (run.workflow, run.variant)]
        for cell in run.cells:
            assert cell.hold is not None
            if cell.hold.kind == "part":
                run.names["held"] = proxy.arm_request("PUT", "partNumber=2", run.suffix(cell.hold))
            elif cell.hold.kind == "stall":
                proxy.arm(run.suffix(cell.hold), after=imported.disk.stat().st_size // 2)
    return runs


@dataclasses.dataclass(frozen=True)
class Setup:
    matrix: ExportMatrix
    #: per mode: the images the tasks read
    imported: dict[str, Imported]
    cloud_disk: Path
    moto: MotoServer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, moto: MotoServer) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("export-matrix")
    s3 = moto.client("s3")
    for bucket in (IN_BUCKET, OUT_BUCKET, COPY_BUCKET, IMAGES_BUCKET):
        s3.create_bucket(Bucket=bucket)
    disk = linux_disk_with_data(base)
    s3.upload_file(str(disk), IN_BUCKET, DISK_KEY)
    # the cloud instance's disk: data, a hole, data (three parts)
    cloud_disk = base / "cloud.raw"
    cloud_disk.write_bytes(os.urandom(4 * MiB) + bytes(4 * MiB) + os.urandom(4 * MiB))
    content = cloud_disk.read_bytes()
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(StallingProxy(moto.endpoint))
        data = stack.enter_context(bind_mount(base / "data"))
        apps: dict[str, App] = {}
        runs: dict[str, Run] = {}
        imported: dict[str, Imported] = {}
        for mode in MODES:
            cloud = stack.enter_context(cloud_of(mode, base, moto, content))
            app = ExportApp(mode, base, data, moto, proxy, cloud)
            stack.callback(app.close)
            app.copies.mkdir(parents=True)
            apps[mode] = app
            imported[mode] = Imported(
                disk,
                import_image(app, app.file_images),
                import_image(app, app.config),
                import_image(app, app.config),
            )
            runs |= {r.task_id: r for r in start_tasks(app, proxy, imported[mode], cloud_disk)}
            stack.enter_context(
                FakeHypervisor(moto.client("ec2"), cloud.appliance, cloud.device_dir, cloud.loops)
            )
        decider = Gate(runs)
        gate = stack.enter_context(MountGate(data, decider.decide))
        m = ExportMatrix(moto, apps, runs, proxy, decider, gate, base, data)
        try:
            m.run_all()
        finally:
            for run in runs.values():
                m.release_all(run)
        yield Setup(m, imported, cloud_disk, moto)


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", cell_params())
def test_export_crash_matrix(setup: Setup, cell: Cell) -> None:
    matrix = setup.matrix
    assert cell.hold is not None, (
        f"step {cell.label} of {cell.workflow} runs {cell.action!r}, which the export crash matrix cannot "
        "interrupt yet: add a moment for it to _hold_for, or list it in NOT_INTERRUPTIBLE with the reason"
    )
    check_interrupted(matrix, cell, lambda: run_of(matrix, cell.mode, cell.workflow, cell.variant))


def run_of(matrix: Matrix, mode: str, workflow: str, variant: str) -> Run:
    return next(
        r for r in matrix.runs.values() if (r.app.mode, r.workflow, r.variant) == (mode, workflow, variant)
    )


def output_of(task: Task) -> dict[str, Any]:
    """Where a finished task's output is: ``{type: s3, bucket, key}`` or ``{type: file, path}``."""
    if task.kind == "copy-image":
        return dict(copy_outcome(task)["location"])
    exported = task.result["exported"]
    return {"type": "s3", "bucket": exported["bucket"], "key": exported["key"]}


QEMU_FORMAT = {"vmdk": "vmdk", "vhd": "vpc", "ova": "vmdk"}  # else raw


def disk_of_ova(ova: Path) -> Path:
    """The disk of a one-disk OVA (tar members: the OVF, the manifest, the disk), extracted beside it."""
    with tarfile.open(ova) as tar:
        names = tar.getnames()
        assert [n.rsplit(".", 1)[-1] for n in names] == ["ovf", "mf", "vmdk"]
        member = tar.extractfile(names[2])
        assert member is not None
        disk = ova.with_suffix(".vmdk")
        disk.write_bytes(member.read())
    return disk


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("workflow", "variant"), [(w, v) for w, variants in VARIANTS.items() for v in variants]
)
def test_every_interrupted_export_completes_with_the_source_bytes(
    setup: Setup, tmp_path: Path, mode: str, workflow: str, variant: str
) -> None:
    run = run_of(setup.matrix, mode, workflow, variant)
    task = run.app.task(run.task_id)
    assert task.state is TaskState.COMPLETED, (task.error_code, task.error_message)
    assert task.attempts == run.interruptions + 1 == len(run.cells) + 1  # every interruption was real
    out = output_of(task)
    if workflow == "copy-image":  # S3 made the copy of an object to a bucket behind the same endpoint
        assert copy_outcome(task)["method"] == ("server-side" if variant == "server-side" else "stream")
    if out["type"] == "s3":
        s3 = setup.moto.client("s3")
        path = tmp_path / "output"
        s3.download_file(out["bucket"], out["key"], str(path))
        meta = s3.head_object(Bucket=out["bucket"], Key=out["key"])["Metadata"]
        assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        if variant == "ova":
            path = disk_of_ova(path)
    else:
        path = Path(out["path"])
        assert copy_outcome(task)["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    cmp = subprocess.run(
        [
            "qemu-img",
            "compare",
            "-f",
            "raw",
            "-F",
            QEMU_FORMAT.get(variant, "raw"),
            str(run.source),
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    ledger = run.app.store.ledger(run.task_id)
    assert not [e for e in ledger if e.action == "leaked"], ledger
    created = {e.resource for e in ledger if e.action == "created" and partials.is_partial(e.resource)}
    removed = {e.resource for e in ledger if e.action == "removed" and partials.is_partial(e.resource)}
    assert created == removed  # every partial output was accounted for


def test_no_upload_object_or_cloud_resource_is_left_but_the_outputs(setup: Setup) -> None:
    s3, ec2 = setup.moto.client("s3"), setup.moto.client("ec2")
    for bucket in (IN_BUCKET, OUT_BUCKET, COPY_BUCKET, IMAGES_BUCKET):
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == [], bucket
    tasks = [r.app.task(r.task_id) for r in setup.matrix.runs.values()]
    # the source, the images stored in S3, the exports and the copies: nothing else
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=IN_BUCKET)["Contents"]] == [DISK_KEY]
    stored = sorted(i[1]["key"] for m in setup.imported.values() for i in (m.s3_export, m.s3_copy))
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=IMAGES_BUCKET)["Contents"]) == stored
    for bucket in (OUT_BUCKET, COPY_BUCKET):
        listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
        outputs = sorted(o["key"] for t in tasks if (o := output_of(t)).get("bucket") == bucket)
        assert listed == outputs
    # the cloud copies (snapshot, volume) of the export-instance tasks are gone
    for run in setup.matrix.runs.values():
        tagged = [{"Name": f"tag:{TASK_TAG}", "Values": [run.task_id]}]
        assert ec2.describe_volumes(Filters=tagged)["Volumes"] == []
        assert ec2.describe_snapshots(Filters=tagged)["Snapshots"] == []


@pytest.mark.parametrize("mode", MODES)
def test_nothing_is_left_behind_on_the_appliance(setup: Setup, mode: str) -> None:
    matrix = setup.matrix
    app = matrix.apps[mode]
    assert isinstance(app, ExportApp)
    runs = [r for r in matrix.runs.values() if r.app is app]
    data, base = matrix.data, matrix.base
    # no partial file anywhere
    assert not [p for p in (data / mode).rglob("*") if partials.is_partial(p)]
    # no scratch: every task directory is gone
    assert [p.name for p in app.scratch.iterdir() if p.is_dir()] == []
    # the copies are exactly the file copy, the images exactly the imported one
    copies = [Path(o["path"]).name for r in runs if (o := output_of(app.task(r.task_id)))["type"] == "file"]
    assert sorted(p.name for p in app.copies.iterdir()) == copies
    assert sorted(app.images.iterdir()) == [setup.imported[mode].stored]
    # nothing attached here any more: the hypervisor stand-in unlinked every volume
    assert list(app.cloud.device_dir.iterdir()) == []
    # no process of a killed tree, and none working on this appliance
    assert not [p for p in matrix.killed if p.alive()]
    working = [
        p.pid for p in processes.all_procs() if p.state != "Z" and str(base) in " ".join(_cmdline(p.pid))
    ]
    assert working == []
    # no loop device backed by the appliance's files (the cloud's stand-in disks are the test's)
    listed = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True, check=True)
    loops = json.loads(listed.stdout or "{}")
    assert [d for d in loops.get("loopdevices", []) if str(data) in (d.get("back-file") or "")] == []


def test_the_matrix_covers_every_step_of_every_export_workflow() -> None:
    # The cells are made from the workflow files: each step of each export-side workflow is in the matrix
    # for every variant and both ways of interrupting, as an interrupted cell or a listed exception.
    loader = WorkflowLoader(config_mod.from_dict({}).workflow_dirs)
    for workflow, variants in VARIANTS.items():
        steps = [label for _idx, label, _step in leaf_steps(loader.load(workflow))]
        for mode in MODES:
            for variant in variants:
                cells = [
                    c for c in matrix_cells() if (c.workflow, c.variant, c.mode) == (workflow, variant, mode)
                ]
                assert [c.label for c in cells] == steps
    uncovered = sorted({c.action for c in matrix_cells() if c.hold is None and c.reason is None})
    assert uncovered == [], f"no moment to interrupt {uncovered} at; see _hold_for"
    # every export-side workflow shipped is in the matrix
    shipped = {p.stem for p in SHIPPED_DIR.glob("*.yaml")}
    assert {w for w in shipped if w.startswith(("export-", "copy-"))} == set(VARIANTS)
