#!/usr/bin/env python3
"""ImportVolume end to end: S3 manifest parts → ``file`` volume, against the pipeline's stages alone.

An EC2 import of a disk uploaded like euca2ools does (``tests/euca_upload.py``: a presigned manifest
and 10 MiB parts, each its own S3 object) to a **moto** server process on loopback. moto keeps
objects in memory and answers a whole-object GET of a 10 MiB part at hundreds of MB/s; only ranged
GETs of big objects are slow on it (a few hundred MB/s), and the import
path never makes those. Two uploads of the same generated disk (sparse RAW, an MBR, ~37 % data:
half incompressible, half text):

- ``RAW``: the workflow streams the parts straight onto the volume (no scratch);
- ``VMDK`` (streamOptimized) and ``VHD`` (fixed): after a preflight of the upload's first and last
  bytes, the parts stream through the confined sequential decoder onto the volume (no scratch).

gzip is not among them: an ImportVolume manifest names RAW, VMDK or VHD, and a gzip upload claimed
RAW is refused (``FormatMismatch``); compressed sources go through ImportImage/ImportSnapshot.

For each, timed in the same run (rotating the order), each after ``sync`` + drop of the page cache
(when root) and a wait for an idle machine, each timing including its own fsync/sync:

- ``e2e``: the ``import-volume`` task from its start to ``completed`` (created with
  :class:`~appliance.service.imports.ImportService` after the upload finished, then run as a worker
  runs it: a new process ``python -m appliance.service.worker run TASK --config FILE``, see
  ``bench/taskproc.py``; timed from the task's recorded start to its end plus a ``sync``, so the
  child's interpreter start and imports are not counted, nor the worker's poll delay). Includes the
  wait step's HEAD of every part, the download with per-part MD5 checks, the write, and the volume's fsync.
- ``download``: the same parts through :func:`~appliance.sources.manifest.download_parts` into a
  sink that discards them (the network/S3 stage alone).
- ``download>file``: the same into a file, then fsync (what the VMDK path does into scratch).
- ``convert``: RAW: :func:`~appliance.targets.rawio.write_raw` of the local file onto a fresh file
  volume + fsync; VMDK/VHD: bare ``qemu-img convert -f vmdk|vpc -O raw`` of the local file + ``sync``.
- ``digest``: the sha256 of the uploaded file's bytes on one thread, in 1 MiB pieces, hashed from
  memory (the file is read into a buffer by the untimed ``prepare``): the source digest every import
  computes while streaming, a serial stage of its own that neither ``download`` nor ``convert``
  contains (RAW's ``convert`` skips the holes and hashes nothing). From memory because that is where
  an import hashes them: read from a sparse file after the cache drop, the kernel's filling of the
  holes cost ~4 CPU-s of system time for 2 GiB and made the stage 4x slower than the hash itself.

During ``e2e`` a thread samples the scratch every 20 ms (bytes reserved in the accounting, and bytes
allocated under the scratch root by files not linked from elsewhere: the guest probe's private
directory holds a hard link to the volume): its maximum is reported as ``peak scratch``. The
small records under the root are not in it but reported apart, in each run's line: the accounting's own
(``appliance.scratch.ACCOUNTING_FILES``: ``.lock``, ``.peak.json``, each task's ``.scratch.json``) and
ImportVolume's ``volume.json`` (``volume.create``'s record of the volume), one 4 KiB block each at most,
never reserved.

Reported per format: medians, MB/s of the uploaded file, ``e2e / slowest stage`` of ``download``,
``convert`` and ``digest`` (goal <= 1.2: the pipeline overlaps its stages) with PASS/MISS, the same
against the slowest of ``download`` and ``convert`` only (``w/o digest``, as measured before the
``digest`` stage existed), and ``e2e / (download + convert)`` (below 1 means
overlap, above 1 means overhead beyond the stages), and ``e2e / limit``: e2e against the machine's limit,
max(slowest stage, CPU-s of ``download``, ``convert`` and ``digest`` measured in the same run, moto's
included, ÷ the CPUs available): stages cannot overlap beyond the CPUs. Results also go to
``bench/out/e2e-results.json``;
``--strict`` exits 1 when a format misses the goal.

``--api snapshot`` measures ImportSnapshot instead (issue #12: no scratch for sequential formats):
the disk is one S3 object (uploaded by boto3), claimed RAW (also for ``GZ``, the disk compressed with
``gzip -1``), VMDK (streamOptimized) or VHD (fixed); ``e2e`` is the ``import-snapshot`` task into
the file image target (it streams: source → decoder → image file), ``download`` the object through
the ranged reader into a sink, ``download>file`` into a file, ``convert`` as above (GZ: the
project's gzip decoder on the local file). Results go to ``bench/out/e2e-snapshot-results.json``.

``--origin http`` (with ``--api snapshot``) serves the disk files from ``bench/rangeserver.py`` instead
of moto: a threaded file server in a process of its own with real ``Range`` support (``sendfile`` from
the page cache, so after the cache drop at disk speed), which the tasks read through a ``Url`` (the
loopback endpoint on ``sources.allowed_endpoints``, as the tests allow theirs). moto answers each ranged
GET by loading the whole object, so an ImportSnapshot of GiBs through it measures moto, not the
pipeline; the ``download`` stages then read the same URL.

Both modes report the peak resident memory of the task process (the new process of each ``e2e`` run:
its ``VmHWM`` sampled while it runs) against the goal of 256 MiB for
a 4 GiB import, and separately that of its children (the confined sequential decoder).
``--task-env NAME=VALUE`` sets a variable in the task processes (e.g. ``MALLOC_ARENA_MAX``).

    .venv/bin/python bench/import_e2e.py               # 2 GiB disk, 3 runs
    .venv/bin/python bench/import_e2e.py --quick       # 256 MiB, 1 run, no idle waits: < 60 s
    .venv/bin/python bench/import_e2e.py --size 4GiB --runs 5 --formats RAW
    .venv/bin/python bench/import_e2e.py --api snapshot --formats RAW,GZ,VMDK,VHD
    .venv/bin/python bench/import_e2e.py --api snapshot --origin http --size 4GiB --formats RAW,VMDK
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
# Run as ``python bench/import_e2e.py``: bench/api.py would shadow the ``api`` package, and the
# repository root gives ``tests.servers`` / ``tests.euca_upload``.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from appliance import config as config_mod  # noqa: E402
from appliance.config import parse_size  # noqa: E402
from appliance.image.decoders import decode_file, open_decoder  # noqa: E402
from appliance.image.decoding import DecodeLimits  # noqa: E402
from appliance.scratch import ACCOUNTING_FILES, ScratchSpace  # noqa: E402
from appliance.service.imports import ImportService  # noqa: E402
from appliance.service.importtasks import DiskContainer, DiskImage  # noqa: E402
from appliance.service.importviews import outcome  # noqa: E402
from appliance.sources.download import download_to_file  # noqa: E402
from appliance.sources.manifest import ImportManifest  # noqa: E402
from appliance.sources.parts import download_parts  # noqa: E402
from appliance.sources.reader import open_reader  # noqa: E402
from appliance.sources.uploadwait import wait_for_manifest  # noqa: E402
from appliance.sources.urlfilter import UrlPolicy  # noqa: E402
from appliance.steps.volume import VOLUME_RECORD  # noqa: E402
from appliance.store import TaskState  # noqa: E402
from appliance.targets.file import FileVolumeTarget  # noqa: E402
from appliance.targets.rawio import write_raw  # noqa: E402
from appliance.timestamps import parse_time  # noqa: E402
from appliance.workflow.engine import Engine  # noqa: E402
from tests.euca_upload import upload_like_euca2ools  # noqa: E402
from tests.servers import REGION, MotoServer, moto_server  # noqa: E402

# the test-disk helpers of bench/convert.py (this directory, imported by its own name)
sys.path.append(str(ROOT))
from convert import drop_caches, log, mbr, text_pool  # noqa: E402
from taskproc import TaskMemory, run_task_child  # noqa: E402
from threadcpu import ThreadCpu  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
#: small files under the scratch root that hold no scratch data, sampled apart from ``peak scratch``: the
#: accounting's own (its lock, high-water mark and each task's reservations) and the task's record of
#: its volume (``volume.create``'s, for a resumed task); none is reserved
RECORD_FILES = ACCOUNTING_FILES | {VOLUME_RECORD}
DEFAULT_OUT = ROOT / "out"
GOAL = 1.2
#: peak resident memory of the task process for a 4 GiB import (issue #12, section 6)
RSS_GOAL = 256 * MiB
S3_SERVER = f"moto {metadata.version('moto')} server process"
BUCKET = "import-bench"
#: bump when the generated disk changes, so stale caches are not reused
DISK_VERSION = 1
DATA_SHARE = 0.375  # like bench/convert.py's disk: ~1.5 GiB of data in 4 GiB
EXTENT = 4 * MiB
STAGES = ("e2e", "download", "download>file", "convert", "digest")
#: the stages an import cannot do without, the slowest of which e2e is measured against ("digest": the
#: source's sha256, which every import computes while streaming)
REFERENCE_STAGES = ("download", "convert", "digest")

# A timed run during which other processes used more than this share of one CPU, is repeated.
OTHER_CPU_LIMIT = 0.25
MAX_ATTEMPTS = 3
IDLE_BUSY = 0.15
IDLE_TIMEOUT = 120.0
HZ = os.sysconf("SC_CLK_TCK")
#: the CPUs this process may run on: what the stages of an import can overlap on
CPUS = len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------------------ the disk


def build_disk(out: Path, size: int) -> Path:
    """The cached sparse RAW disk: MBR, then 4 MiB extents of random data, text or zeros (a hole)."""
    path = out / f"e2e-disk-{size // MiB}M-v{DISK_VERSION}.raw"
    if path.exists() and path.stat().st_size == size:
        return path
    log(f"building the {size // MiB} MiB test disk {path.name} ...")
    rng = random.Random(42)
    pool = text_pool(rng, 8 * MiB)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
        f.write(mbr(size))
        for offset in range(MiB, size, EXTENT):
            n = min(EXTENT, size - offset)
            roll = rng.random()
            if roll < DATA_SHARE / 2:
                data = rng.randbytes(n)
            elif roll < DATA_SHARE:
                at = rng.randrange(len(pool) - n)
                data = pool[at : at + n]
            else:
                continue  # stays a hole: the disk's free space
            f.seek(offset)
            f.write(data)
    os.replace(tmp, path)
    return path


def build_vmdk(raw: Path) -> Path:
    """The same disk as a streamOptimized VMDK (cached next to it)."""
    path = raw.with_suffix(".vmdk")
    if path.exists() and path.stat().st_mtime >= raw.stat().st_mtime:
        return path
    log(f"converting it to a streamOptimized VMDK {path.name} ...")
    tmp = path.with_suffix(".vmdk.tmp")
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            str(raw),
            str(tmp),
        ],
        check=True,
    )
    os.replace(tmp, path)
    return path


def build_gz(raw: Path) -> Path:
    """The same disk compressed with ``gzip -1`` (cached next to it)."""
    path = raw.with_suffix(".raw.gz")
    if path.exists() and path.stat().st_mtime >= raw.stat().st_mtime:
        return path
    log(f"compressing it with gzip -1 to {path.name} ...")
    tmp = path.with_suffix(".gz.tmp")
    with open(tmp, "wb") as out:
        subprocess.run(["gzip", "-1", "-c", str(raw)], check=True, stdout=out)
    os.replace(tmp, path)
    return path


def build_vhd(raw: Path) -> Path:
    """The same disk as a fixed VHD (cached next to it)."""
    path = raw.with_suffix(".vhd")
    if path.exists() and path.stat().st_mtime >= raw.stat().st_mtime:
        return path
    log(f"converting it to a fixed VHD {path.name} ...")
    tmp = path.with_suffix(".vhd.tmp")
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed,force_size=on",
            str(raw),
            str(tmp),
        ],
        check=True,
    )
    os.replace(tmp, path)
    return path


#: qemu-img's name of each upload format (GZ: a gzip-compressed RAW disk, ImportSnapshot only)
QEMU_FORMAT = {"RAW": "raw", "VMDK": "vmdk", "VHD": "vpc", "GZ": "raw"}
#: what an ImportSnapshot claims for each (a claim without a suffix accepts a compressed disk)
SNAPSHOT_CLAIM = {"RAW": "RAW", "VMDK": "VMDK", "VHD": "VHD", "GZ": "RAW"}


class ScratchSampler:
    """The highest scratch use seen while running: reserved bytes and bytes allocated on disk by the
    steps' files; the small records of :data:`RECORD_FILES` (the accounting's lock, high-water mark and
    each task's ``.scratch.json``; ``volume.create``'s ``volume.json``) are bookkeeping, sampled apart."""

    def __init__(self, space: ScratchSpace) -> None:
        self.space = space
        self.peak = 0
        #: the most bytes the accounting's own files held at once
        self.peak_bookkeeping = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            files, bookkeeping = _allocated_under(self.space.root)
            used = max(self.space.reserved(), files)
        except (OSError, ValueError):
            return
        self.peak = max(self.peak, used)
        self.peak_bookkeeping = max(self.peak_bookkeeping, bookkeeping)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> ScratchSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _allocated_under(root: Path) -> tuple[int, int]:
    """Bytes allocated by files under ``root`` that live only there (a hard link to a file elsewhere, the
    confined tools' link to the volume in their private directory, uses no scratch): (the steps' files,
    the records of :data:`RECORD_FILES`)."""
    files = bookkeeping = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # removed while we walk
                st = os.lstat(os.path.join(dirpath, name))
                if st.st_nlink == 1:
                    if name in RECORD_FILES:
                        bookkeeping += st.st_blocks * 512
                    else:
                        files += st.st_blocks * 512
    return files, bookkeeping


def virtual_size(path: Path, fmt: str) -> int:
    info = subprocess.run(
        ["qemu-img", "info", "-f", fmt, "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(json.loads(info.stdout)["virtual-size"])


# ------------------------------------------------------------------------------------------ machine


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine so far, over all CPUs."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return (total - idle - iowait) / HZ, total / HZ


def _own_cpu() -> float:
    me = os.times()
    return me.user + me.system + me.children_user + me.children_system


def _pid_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / HZ


def reset_peak_rss() -> None:
    """Reset this process's high-water mark of resident memory (``--in-process`` runs), where Linux allows."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _pid_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) of ``pid`` in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


def wait_for_idle(timeout: float = IDLE_TIMEOUT) -> None:
    """Two quiet seconds in a row (CPUs < IDLE_BUSY busy), or give up after ``timeout``."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while True:
        busy0, total0 = _machine_cpu()
        time.sleep(1.0)
        busy1, total1 = _machine_cpu()
        share = (busy1 - busy0) / max(1e-9, total1 - total0)
        quiet = quiet + 1 if share < IDLE_BUSY else 0
        if quiet >= 2:
            return
        if time.monotonic() > deadline:
            log(f"  warning: machine still {share:.0%} busy after {timeout:.0f} s; measuring anyway")
            return


# ------------------------------------------------------------------------------------------ the runs


@dataclass
class Run:
    stage: str
    seconds: float
    other_cpu: float  # CPU-seconds other processes (not this one, its children or moto) used meanwhile
    own_cpu: float  # CPU-seconds of this process and its children (the task, or the stage alone)
    moto_cpu: float  # CPU-seconds of the moto server process
    attempts: int
    cache_dropped: bool
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """What a timed run does (``run``), given what its untimed ``prepare`` returned."""

    run: Callable[[Any], dict[str, Any] | None]
    prepare: Callable[[], Any] | None = None


@dataclass
class Measurement:
    format: str
    file_bytes: int  # what was uploaded and downloaded
    virtual_bytes: int  # what the volume receives
    parts: int
    runs: list[Run] = field(default_factory=list)

    def median(self, stage: str) -> float:
        return statistics.median(r.seconds for r in self.runs if r.stage == stage)

    @property
    def peak_scratch(self) -> int:
        return max((r.detail.get("peak_scratch", 0) for r in self.runs if r.stage == "e2e"), default=0)

    @property
    def peak_bookkeeping(self) -> int:
        """The most bytes the records of :data:`RECORD_FILES` held (not in :attr:`peak_scratch`)."""
        return max(
            (r.detail.get("peak_scratch_bookkeeping", 0) for r in self.runs if r.stage == "e2e"), default=0
        )

    @property
    def peak_rss(self) -> int:
        return max((r.detail.get("peak_rss", 0) for r in self.runs if r.stage == "e2e"), default=0)

    @property
    def child_peaks(self) -> dict[str, int]:
        """The largest peak resident memory of each of the task process's children (the decoder)."""
        peaks: dict[str, int] = {}
        for r in self.runs:
            for name, peak in r.detail.get("children_peak", {}).items():
                peaks[name] = max(peak, peaks.get(name, 0))
        return peaks

    def slowest(self, stages: tuple[str, ...] = REFERENCE_STAGES) -> tuple[str, float]:
        """The slowest of ``stages`` alone (name, median seconds)."""
        return max(((s, self.median(s)) for s in stages), key=lambda x: x[1])

    @property
    def slowest_stage(self) -> tuple[str, float]:
        return self.slowest()

    @property
    def ratio_slowest(self) -> float:
        return self.median("e2e") / self.slowest_stage[1]

    @property
    def ratio_slowest_no_digest(self) -> float:
        """e2e against the slowest of download and convert only, as this bench measured before the
        ``digest`` stage: the two figures side by side say how much of a ratio the sha256 explains."""
        return self.median("e2e") / self.slowest(("download", "convert"))[1]

    @property
    def ratio_sum(self) -> float:
        return self.median("e2e") / (self.median("download") + self.median("convert"))

    def stage_cpu(self, stage: str) -> float:
        """The median CPU-seconds of ``stage`` alone: this process's and its children's, and moto's."""
        return statistics.median(r.own_cpu + r.moto_cpu for r in self.runs if r.stage == stage)

    @property
    def stages_cpu(self) -> float:
        """CPU-seconds of all the stages an import must do (:data:`REFERENCE_STAGES`), moto's included."""
        return sum(self.stage_cpu(s) for s in REFERENCE_STAGES)

    @property
    def machine_limit(self) -> float:
        """The fastest e2e this machine allows: no faster than its slowest stage, and no faster than
        the stages' CPU-seconds spread over every CPU (stages cannot overlap beyond the CPUs)."""
        return max(self.slowest_stage[1], self.stages_cpu / CPUS)

    @property
    def ratio_machine(self) -> float:
        return self.median("e2e") / self.machine_limit


class Bench:
    """The moto server, a configuration and a service over one temporary state directory."""

    def __init__(
        self,
        work: Path,
        moto: MotoServer,
        idle_wait: bool,
        attempts: int = MAX_ATTEMPTS,
        api: str = "volume",
        origin: str | None = None,
        task_env: dict[str, str] | None = None,
        in_process: bool = False,
    ) -> None:
        self.work = work
        self.moto = moto
        #: the endpoint of bench/rangeserver.py serving the disk files (``--origin http``), or None
        self.origin = origin
        self.idle_wait = idle_wait
        self.attempts = attempts
        #: "volume" (ImportVolume of a euca2ools upload) or "snapshot" (ImportSnapshot of one object)
        self.api = api
        settings = {
            "state_dir": str(work / "state"),
            "log_level": "warning",
            "scratch": {"quota": "64GiB"},
            "sources": {
                "allowed_endpoints": [moto.endpoint] + ([origin] if origin else []),
                "manifest_poll_interval": 0.2,
                "s3": {
                    "endpoint_url": moto.endpoint,
                    "region": REGION,
                    "access_key": "testing",
                    "secret_key": "testing",
                },
            },
            "targets": {
                "volume": {"type": "file", "directory": str(work / "volumes")},
                "image": {"type": "file", "directory": str(work / "images")},
            },
        }
        # a file: the task children read it (``--config``), as a worker's do
        self.config_path = work / "imaging.yaml"
        self.config_path.write_text(yaml.safe_dump(settings))
        self.config = config_mod.load(self.config_path)
        self.service = ImportService(self.config)
        self.policy = UrlPolicy.from_config(self.config.sources)
        #: added to the task children's environment (``--task-env``)
        self.task_env = dict(task_env or {})
        #: run the engine in this process (CPU-s per thread) instead of a task process
        self.in_process = in_process

    def close(self) -> None:
        self.service.store.close()

    def timed(self, stage: str, variant: Variant) -> Run:
        """Run ``variant.run`` (which includes its own fsync/sync) after its untimed ``prepare``, an
        idle wait and a cache drop; repeat it when other processes used the CPU meanwhile."""
        for attempt in range(1, self.attempts + 1):
            prepared = variant.prepare() if variant.prepare is not None else None
            if self.idle_wait:
                wait_for_idle()
            dropped = drop_caches()
            own0, moto0, machine0 = _own_cpu(), _pid_cpu(self.moto.pid), _machine_cpu()
            start = time.perf_counter()
            detail = variant.run(prepared) or {}
            # a variant that knows its own span (e2e: the task's start to its end) reports it
            seconds = detail.pop("seconds", time.perf_counter() - start)
            own1, moto1, machine1 = _own_cpu(), _pid_cpu(self.moto.pid), _machine_cpu()
            other = max(0.0, (machine1[0] - machine0[0]) - (own1 - own0) - (moto1 - moto0))
            run = Run(stage, seconds, other, own1 - own0, moto1 - moto0, attempt, dropped, detail)
            if other <= OTHER_CPU_LIMIT * seconds or attempt == self.attempts:
                return run
            _clean(detail.get("volume"))
            _clean(detail.get("path"))
            log(f"    {stage}: other processes used {other:.1f} CPU-s in {seconds:.1f} s; repeating")
        raise AssertionError("unreachable")

    # -- the variants ---------------------------------------------------------------------------

    def create_task(self, fmt: str, url: str, image_bytes: int, volume_gib: int) -> str:
        """The ImportVolume task, as the API creates it (not timed: the upload is already complete)."""
        task = self.service.import_volume(
            DiskImage(fmt, image_bytes, url, volume_gib), availability_zone=None, description="bench"
        )
        return task.id

    def e2e(self, task_id: str) -> dict[str, Any]:
        """Run the task as a worker does, in a new task process (:func:`taskproc.run_task_child`),
        then ``sync``. Timed from the task's start to its end (as the task records them) plus the
        ``sync``: the child's interpreter start and imports come before the task starts, as in a
        worker's child. Its peak resident memory and its decoder child's are the processes' own.

        ``--in-process`` runs the engine in this process instead, to read the task's CPU-s per
        thread (:class:`threadcpu.ThreadCpu`); its memory figure is then this process's high-water
        mark (an upper bound: the bench's own allocations are in it)."""
        task_log = self.work / f"task-{task_id}.log"
        cpu: ThreadCpu | None = None
        with ScratchSampler(ScratchSpace.from_config(self.config)) as scratch:
            if self.in_process:
                reset_peak_rss()
                engine = Engine(self.config, poll_interval=0.1)
                try:
                    with ThreadCpu() as cpu:
                        engine.run(task_id)
                finally:
                    engine.store.close()
                memory = TaskMemory(0, _pid_memory(os.getpid()).get("VmHWM", 0))
            else:
                memory = run_task_child(task_id, self.config_path, env=self.task_env, log=task_log)
        sync0 = time.perf_counter()
        subprocess.run(["sync"], check=True)  # the volume was fsynced by finalize; this flushes the rest
        sync_s = time.perf_counter() - sync0
        done = self.service.store.get_task(task_id)
        if memory.returncode != 0 or done.state is not TaskState.COMPLETED:
            tail = "".join(task_log.read_text(errors="replace").splitlines(keepends=True)[-20:])
            raise RuntimeError(
                f"import failed (task process exit {memory.returncode}, {done.state.value}): "
                f"{done.error_code}: {done.error_message}\n{tail}"
            )
        if self.api == "volume":
            volume = Path(done.result["volume"]["path"])
            streamed = done.result.get("written", {}).get("streamed")
        else:
            volume = Path(outcome(done)["location"]["path"])
            streamed = "streamed" in (done.result.get("disk") or {})
        assert done.finished_at is not None and done.started_at is not None
        task_seconds = (parse_time(done.finished_at) - parse_time(done.started_at)).total_seconds()
        steps = {
            s.name: round((parse_time(s.finished_at) - parse_time(s.started_at)).total_seconds(), 3)
            for s in self.service.store.step_results(done.id)
            if s.started_at and s.finished_at
        }
        return {
            "task": done.id,
            "task_seconds": round(task_seconds, 3),
            "steps": steps,
            "volume": str(volume),
            "peak_scratch": scratch.peak,
            "peak_scratch_bookkeeping": scratch.peak_bookkeeping,
            "peak_rss": memory.task_peak,
            "children_peak": memory.children_peak,
            "streamed": streamed,
            "seconds": task_seconds + sync_s,
            **(
                {
                    "thread_cpu": {k: round(v, 2) for k, v in cpu.groups.items()},
                    "thread_cpu_summary": cpu.summary(),
                }
                if cpu is not None
                else {}
            ),
        }

    def create_snapshot_task(self, fmt: str, source: dict[str, str]) -> str:
        """The ImportSnapshot task of ``source`` (``{"bucket", "key"}`` or ``{"url"}``), as the API
        creates it (not timed)."""
        claim = SNAPSHOT_CLAIM[fmt]
        if "url" in source:
            container = DiskContainer(format=claim, url=source["url"])
        else:
            container = DiskContainer(format=claim, bucket=source["bucket"], key=source["key"])
        return self.service.import_snapshot(container).id

    def download_object(self, source: dict[str, str], into: Path | None) -> dict[str, Any]:
        """The object through the ranged reader (parallel ranged GETs), into a sink or a file + fsync."""
        if into is not None:
            download_to_file(source, into, self.policy, self.config.sources.s3, max_bytes=1 << 50)
            return {}
        with open_reader(source, self.policy, self.config.sources.s3) as reader:
            buf = bytearray(MiB)
            while reader.readinto(buf):
                pass
        return {}

    def download(self, manifest: ImportManifest, into: Path | None) -> dict[str, Any]:
        if into is None:
            download_parts(manifest, lambda _offset, _chunk: None, self.policy)
            return {}
        fd = os.open(into, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:

            def write(offset: int, chunk: bytes) -> None:
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n

            download_parts(manifest, write, self.policy)
            os.fsync(fd)
        finally:
            os.close(fd)
        return {}

    @staticmethod
    def load(source: Path) -> bytearray:
        """The uploaded file in memory, for :meth:`digest` (untimed)."""
        buf = bytearray(source.stat().st_size)
        with open(source, "rb", buffering=0) as f, memoryview(buf) as view:
            done = 0
            while done < len(buf) and (n := f.readinto(view[done:])):
                done += n
        return buf

    @staticmethod
    def digest(data: bytearray) -> dict[str, Any]:
        """The sha256 of the source's bytes on one thread, in 1 MiB pieces, from memory: the digest
        every import computes while it streams the bytes it received."""
        sha = hashlib.sha256()
        with memoryview(data) as view:
            for at in range(0, len(view), MiB):
                sha.update(view[at : at + MiB])
        return {"sha256": sha.hexdigest()}

    def convert(self, fmt: str, source: Path, volume_bytes: int) -> dict[str, Any]:
        out_dir = self.work / "convert"
        out_dir.mkdir(exist_ok=True)
        if fmt == "RAW":
            target = FileVolumeTarget(out_dir)
            volume = target.create("bench", volume_bytes)
            write_raw(volume, source)
            target.finalize(volume)  # fsync of the file and its directory, as the import does
            return {"path": str(volume.path)}
        dst = out_dir / "converted.raw"
        if fmt == "GZ":  # qemu-img reads no gzip: the project's decoder (what the pipeline runs)
            dst.unlink(missing_ok=True)
            with open(source, "rb") as f:
                decode_file(open_decoder("gzip", f, DecodeLimits(1 << 44, 1 << 44, 0)), dst)
            subprocess.run(["sync"], check=True)
            return {"path": str(dst)}
        qemu_fmt = QEMU_FORMAT[fmt]
        subprocess.run(
            ["qemu-img", "convert", "-f", qemu_fmt, "-O", "raw", str(source), str(dst)], check=True
        )
        subprocess.run(["sync"], check=True)  # qemu-img never fsyncs
        return {"path": str(dst)}


@contextlib.contextmanager
def range_server(files: list[Path]) -> Iterator[str]:
    """``bench/rangeserver.py`` serving ``files`` (each at ``/<its name>``) in a process of its own;
    its endpoint."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "rangeserver.py"), *map(str, files)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _clean(path: str | Path | None) -> None:
    if path:
        Path(path).unlink(missing_ok=True)


def measure(bench: Bench, fmt: str, image: Path, runs: int) -> Measurement:
    """Upload ``image`` like euca2ools, then time every stage ``runs`` times (rotating the order)."""
    s3 = bench.moto.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    file_bytes = image.stat().st_size
    qemu_fmt = QEMU_FORMAT[fmt]
    # a gzip file's disk is the RAW file it was made from (cached beside it)
    vsize = virtual_size(image.with_suffix("") if fmt == "GZ" else image, qemu_fmt)
    image_bytes = file_bytes if fmt == "RAW" else vsize  # what euca2ools declares (Image.Bytes)
    volume_gib = max(1, -(-vsize // GiB))
    t0 = time.perf_counter()
    if bench.api == "snapshot":
        return measure_snapshot(bench, fmt, image, runs, vsize, volume_gib)
    url = upload_like_euca2ools(s3, BUCKET, "bench", image, file_format=fmt)
    upload_s = time.perf_counter() - t0
    mem = _pid_memory(bench.moto.pid)
    log(
        f"{fmt}: uploaded {file_bytes / MiB:.0f} MiB as 10 MiB parts to moto in {upload_s:.1f} s "
        f"({file_bytes / upload_s / 1e6:.0f} MB/s); moto resident {mem.get('VmRSS', 0) / GiB:.2f} GiB"
    )
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    manifest = wait_for_manifest(url, bench.policy, deadline=deadline)
    m = Measurement(fmt, file_bytes, vsize, len(manifest.parts))
    scratch_file = bench.work / "download.bin"
    variants = {
        "e2e": Variant(bench.e2e, lambda: bench.create_task(fmt, url, image_bytes, volume_gib)),
        "download": Variant(lambda _: bench.download(manifest, None)),
        "download>file": Variant(lambda _: bench.download(manifest, scratch_file)),
        "convert": Variant(lambda _: bench.convert(fmt, image, volume_gib * GiB)),
        "digest": Variant(bench.digest, lambda: bench.load(image)),
    }
    run_variants(bench, m, variants, runs, scratch_file)
    bench.moto.reset()  # moto keeps every part in memory: free it before the next format
    return m


def measure_snapshot(
    bench: Bench, fmt: str, image: Path, runs: int, vsize: int, volume_gib: int
) -> Measurement:
    """ImportSnapshot of ``image`` as one S3 object (boto3's multipart upload), or from the range
    server's URL (``--origin http``), every stage timed."""
    file_bytes = image.stat().st_size
    source: dict[str, str]
    if bench.origin is not None:
        source = {"url": f"{bench.origin}/{image.name}"}
        log(f"{fmt}: {file_bytes / MiB:.0f} MiB served by bench/rangeserver.py at {source['url']}")
    else:
        s3 = bench.moto.client("s3")
        source = {"bucket": BUCKET, "key": f"bench.{fmt.lower()}"}
        t0 = time.perf_counter()
        s3.upload_file(str(image), BUCKET, source["key"])
        upload_s = time.perf_counter() - t0
        log(f"{fmt}: uploaded {file_bytes / MiB:.0f} MiB as one object to moto in {upload_s:.1f} s")
    m = Measurement(fmt, file_bytes, vsize, 1)
    scratch_file = bench.work / "download.bin"
    variants = {
        "e2e": Variant(bench.e2e, lambda: bench.create_snapshot_task(fmt, source)),
        "download": Variant(lambda _: bench.download_object(source, None)),
        "download>file": Variant(lambda _: bench.download_object(source, scratch_file)),
        "convert": Variant(lambda _: bench.convert(fmt, image, volume_gib * GiB)),
        "digest": Variant(bench.digest, lambda: bench.load(image)),
    }
    run_variants(bench, m, variants, runs, scratch_file)
    bench.moto.reset()
    return m


def run_variants(
    bench: Bench, m: Measurement, variants: dict[str, Variant], runs: int, scratch_file: Path
) -> None:
    file_bytes = m.file_bytes
    for i in range(runs):
        order = STAGES[i % len(STAGES) :] + STAGES[: i % len(STAGES)]
        for stage in order:
            run = bench.timed(stage, variants[stage])
            m.runs.append(run)
            extra = ""
            if "task_seconds" in run.detail:
                steps = ", ".join(f"{k} {v:.2f}" for k, v in run.detail["steps"].items())
                extra = (
                    f"\n      task started→completed {run.detail['task_seconds']:.2f} s; steps (s): {steps}"
                    f"; peak scratch {run.detail['peak_scratch']} bytes (records "
                    f"{run.detail['peak_scratch_bookkeeping']} bytes, not counted)"
                    f"; streamed {run.detail['streamed']}"
                    f"; task process peak RSS {run.detail['peak_rss'] / MiB:.0f} MiB"
                    + "".join(
                        f", child {name} {peak / MiB:.0f} MiB"
                        for name, peak in run.detail["children_peak"].items()
                    )
                    + (
                        f"\n      task process CPU-s by thread: {run.detail['thread_cpu_summary']}"
                        if "thread_cpu_summary" in run.detail
                        else ""
                    )
                )
            log(
                f"  run {i + 1} {stage:<14} {run.seconds:7.2f} s  {file_bytes / run.seconds / 1e6:7.0f} MB/s"
                f"  CPU {run.own_cpu:5.2f} s (+ moto {run.moto_cpu:5.2f} s)"
                f"  other CPU {run.other_cpu:4.1f} s{extra}"
            )
            # keep the disk from filling up: each variant's output is only needed for its timing
            _clean(run.detail.pop("volume", None))
            _clean(run.detail.pop("path", None))
            scratch_file.unlink(missing_ok=True)


def print_summary(
    results: list[Measurement], moto_peak: int, size: int, api: str = "volume", origin: str = "moto"
) -> None:
    log("")
    if api == "volume":
        log(
            f"ImportVolume of a {size / GiB:g} GiB disk ({DATA_SHARE:.1%} data) from {S3_SERVER} on loopback "
            f"(10 MiB parts, whole-object GETs) to the file volume target; medians, MB/s of the uploaded file"
        )
    else:
        server = S3_SERVER if origin == "moto" else "bench/rangeserver.py (a ranged file server process)"
        log(
            f"ImportSnapshot of a {size / GiB:g} GiB disk ({DATA_SHARE:.1%} data) from {server} on "
            "loopback (one object, parallel ranged GETs) to the file image target; medians, MB/s of the "
            "uploaded file"
        )
    header = f"{'format':<6} {'file':>9} " + " ".join(f"{s:>16}" for s in STAGES)
    ratios = f" {'e2e/slowest':>12} {'w/o digest':>10} {'e2e/sum':>8} {'e2e/limit':>9}"
    log(header + ratios + f" {'peak scratch':>13}  goal <= {GOAL}")
    for m in results:
        cells = []
        for stage in STAGES:
            sec = m.median(stage)
            cells.append(f"{sec:6.2f}s {m.file_bytes / sec / 1e6:5.0f}MB/s")
        verdict = "PASS" if m.ratio_slowest <= GOAL else "MISS"
        log(
            f"{m.format:<6} {m.file_bytes / MiB:7.0f}Mi "
            + " ".join(f"{c:>16}" for c in cells)
            + f" {m.ratio_slowest:12.2f} {m.ratio_slowest_no_digest:10.2f} {m.ratio_sum:8.2f}"
            + f" {m.ratio_machine:9.2f}"
            + f" {m.peak_scratch:13d}"
            + f"  {verdict} (slowest: {m.slowest_stage[0]})"
        )
    for m in results:
        e2e = m.median("e2e")
        log(
            f"{m.format}: {m.parts} parts; e2e moves {m.virtual_bytes / e2e / 1e6:.0f} MB/s of virtual disk; "
            f"slowest stage alone: {m.slowest_stage[0]} {m.slowest_stage[1]:.2f} s, "
            f"stages in sequence {m.median('download') + m.median('convert'):.2f} s, e2e {e2e:.2f} s"
        )
    for m in results:
        cpu = ", ".join(f"{s} {m.stage_cpu(s):.2f}" for s in REFERENCE_STAGES)
        log(
            f"{m.format}: machine limit {m.machine_limit:.2f} s = max(slowest stage "
            f"{m.slowest_stage[1]:.2f} s, stages' CPU-s {m.stages_cpu:.2f} ({cpu}; moto's included) / "
            f"{CPUS} CPUs = {m.stages_cpu / CPUS:.2f} s); e2e {m.median('e2e'):.2f} s uses "
            f"{m.stage_cpu('e2e'):.2f} CPU-s; "
            f"e2e / machine limit {m.ratio_machine:.2f}"
        )
    for m in results:
        verdict = "PASS" if m.peak_rss <= RSS_GOAL else "MISS"
        log(
            f"{m.format}: peak resident memory of the task process {m.peak_rss / MiB:.0f} MiB "
            f"(goal <= {RSS_GOAL // MiB} MiB for a 4 GiB import): {verdict}"
            + "".join(f"; its child {n}: {p / MiB:.0f} MiB" for n, p in m.child_peaks.items())
        )
    overlapped = [r for m in results for r in m.runs if r.other_cpu > OTHER_CPU_LIMIT * r.seconds]
    if overlapped:
        log(f"warning: {len(overlapped)} timed runs overlapped other work (> {OTHER_CPU_LIMIT} CPU-s/s)")
    if origin == "moto":
        log(
            f"moto peak resident memory: {moto_peak / GiB:.2f} GiB (objects over ~5 MiB spool to temporary "
            "files, so the parts live on disk and a dropped page cache makes moto read them back)"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2GiB", help="virtual size of the test disk (default 2GiB)")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each stage (default 3)")
    p.add_argument(
        "--formats",
        default=None,
        help="comma-separated: RAW, VMDK, VHD, and GZ with --api snapshot (default all of the API's)",
    )
    p.add_argument(
        "--api",
        choices=("volume", "snapshot"),
        default="volume",
        help="volume: ImportVolume of a euca2ools upload (default); snapshot: ImportSnapshot of one object",
    )
    p.add_argument(
        "--origin",
        choices=("moto", "http"),
        default="moto",
        help="with --api snapshot: where the object is read from: moto (default), or http: "
        "bench/rangeserver.py serving the files with real byte ranges (for GiB-sized objects)",
    )
    p.add_argument("--quick", action="store_true", help="256 MiB, one run, no idle waits: a smoke test")
    p.add_argument("--no-idle-wait", action="store_true", help="do not wait for an idle machine")
    p.add_argument("--strict", action="store_true", help="exit 1 when a ratio misses the goal")
    p.add_argument(
        "--attempts",
        type=int,
        default=MAX_ATTEMPTS,
        help="tries of a run that overlapped other work (default 3)",
    )
    p.add_argument(
        "--task-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the task processes' environment (e.g. MALLOC_ARENA_MAX=2); repeatable",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run each e2e task in this process and print its CPU-s per thread (memory: an upper bound)",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="cache/results directory (default bench/out)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.runs, args.no_idle_wait, args.attempts = "256MiB", 1, True, 1
    args.size = parse_size(args.size)
    if args.formats is None:
        args.formats = "RAW,GZ,VMDK,VHD" if args.api == "snapshot" else "RAW,VMDK,VHD"
    args.formats = [f.strip().upper() for f in args.formats.split(",") if f.strip()]
    if any("=" not in e for e in args.task_env):
        p.error("--task-env takes NAME=VALUE")
    args.task_env = dict(e.split("=", 1) for e in args.task_env)
    if args.origin != "moto" and args.api != "snapshot":
        p.error("--origin http goes with --api snapshot (ImportVolume reads a euca2ools upload from S3)")
    allowed = set(QEMU_FORMAT) if args.api == "snapshot" else set(QEMU_FORMAT) - {"GZ"}
    if not set(args.formats) <= allowed:
        p.error(f"--formats takes {', '.join(sorted(allowed))} with --api {args.api}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("qemu-img") is None:
        log("error: qemu-img is not installed")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    raw = build_disk(args.out, args.size)
    images = {"RAW": raw}
    if "VMDK" in args.formats:
        images["VMDK"] = build_vmdk(raw)
    if "VHD" in args.formats:
        images["VHD"] = build_vhd(raw)
    if "GZ" in args.formats:
        images["GZ"] = build_gz(raw)
    if os.geteuid() != 0:
        log("note: not root, so the page cache is not dropped between runs")
    work = Path(tempfile.mkdtemp(prefix="imaging-bench-e2e-", dir=args.out))
    results: list[Measurement] = []
    try:
        with contextlib.ExitStack() as stack:
            moto = stack.enter_context(moto_server(work))
            origin = None
            if args.origin == "http":
                origin = stack.enter_context(range_server([images[f] for f in args.formats]))
            bench = Bench(
                work,
                moto,
                idle_wait=not args.no_idle_wait,
                attempts=args.attempts,
                api=args.api,
                origin=origin,
                task_env=args.task_env,
                in_process=args.in_process,
            )
            try:
                for fmt in args.formats:
                    results.append(measure(bench, fmt, images[fmt], args.runs))
                moto_peak = _pid_memory(moto.pid).get("VmHWM", 0)
            finally:
                bench.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_summary(results, moto_peak, args.size, args.api, args.origin)
    out = {
        "size": args.size,
        "s3_server": S3_SERVER,
        "origin": args.origin,
        "part_size": 10 * MiB,
        "moto_peak_bytes": moto_peak,
        "results": [
            asdict(m)
            | {
                "ratio_slowest": m.ratio_slowest,
                "ratio_slowest_no_digest": m.ratio_slowest_no_digest,
                "ratio_sum": m.ratio_sum,
                "ratio_machine_limit": m.ratio_machine,
                "machine_limit_seconds": m.machine_limit,
                "stages_cpu_seconds": m.stages_cpu,
                "cpus": CPUS,
                "goal": GOAL,
                "peak_scratch_bytes": m.peak_scratch,
                "peak_scratch_bookkeeping_bytes": m.peak_bookkeeping,
                "peak_rss_bytes": m.peak_rss,
                "child_peak_rss_bytes": m.child_peaks,
            }
            for m in results
        ],
    }
    name = "e2e-results.json" if args.api == "volume" else "e2e-snapshot-results.json"
    (args.out / name).write_text(json.dumps(out, indent=2) + "\n")
    return 1 if args.strict and any(m.ratio_slowest > GOAL for m in results) else 0


if __name__ == "__main__":
    sys.exit(main())
