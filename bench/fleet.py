#!/usr/bin/env python3
"""Fleet benchmark: claim latency (SQLite vs PostgreSQL), takeover after kill -9, and
``DescribeConversionTasks`` by id on PostgreSQL through two appliances.

PostgreSQL is the tests' throwaway cluster (:func:`tests.postgres.postgres_cluster`: initdb under
``/tmp``, Unix socket, ``fsync=off``; as ``make fleet`` starts it), one database per part.

``claim``: one ``imaging worker`` (``worker.poll_interval`` ``--poll``, default 5 s) on each
backend; ``--claims`` one-step tasks (``util.sleep`` 0 s) submitted one at a time, each after the
previous one finished and a random pause (0.1 s to the poll interval); the latency of each is its
``task.claimed`` event's time minus its ``created_at`` (both stamped by the store on this machine's
clock); also the median from claimed to completed (the fixed cost of running one task: its process,
one step). On PostgreSQL the submit rings the doorbell (``NOTIFY``) and the worker claims at once;
SQLite has only the poll.

``takeover``: two workers on PostgreSQL with ``worker.lease_seconds`` ``--lease`` (default 5);
appliance A runs a task sleeping 120 s, B idles; A's worker and its task process group are killed
with SIGKILL at one moment (:func:`tests.processes.kill_tree`); the time until the task's epoch
moves to 2 (B claimed it: ``task.takeover``) is measured, ``--takeovers`` times. Goal: lease + 5 s.

``describe``: ``--tasks`` import-volume tasks in PostgreSQL (``bench/api.py``'s ``populate``: the
same mix of states), two ``imaging serve`` (2 gunicorn workers each) on that database, and
``bench/api.py``'s closed-loop clients (``--clients``, spread over the two), pre-signed SigV4
requests for random ids, every sampled response checked. Goal: p99 ≤ 20 ms and ≥ 800 req/s.

``imports``: small-import throughput with 1 and with 3 appliances (``--fleets``): the fleet of
``make fleet`` (:func:`tests.fleet.running_fleet`: PostgreSQL, a moto server for S3, each appliance an
``imaging serve`` and an ``imaging worker`` with the default ``worker.concurrency``); a
stream-optimized VMDK of ``--image-mib`` MiB (a quarter of it data) in moto's S3; one warm-up import
per appliance, then ``--imports`` ImportSnapshot calls sent at once, round-robin over the
endpoints (boto3), and the time until every task is completed. Reported: imports per minute, the
time from submission to completion (p50, max), and the CPU used meanwhile by each part (the
workers with their task processes and ``qemu-img``, the API servers, PostgreSQL, moto, this
client) against the machine's cores: where the time goes on a 2-core machine.

    .venv/bin/python bench/fleet.py                    # all four parts
    .venv/bin/python bench/fleet.py --parts describe   # one of them
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import botocore.exceptions  # noqa: E402
import yaml  # noqa: E402

import bench.api as api_bench  # noqa: E402  (bench/api.py, a namespace package's module)
from appliance import config as config_mod  # noqa: E402
from appliance.store import Store, TaskState  # noqa: E402
from appliance.workflow.engine import Engine  # noqa: E402
from tests.fleet import Fleet, running_fleet  # noqa: E402
from tests.postgres import Cluster, postgres_cluster  # noqa: E402
from tests.processes import kill_tree  # noqa: E402
from tests.servers import REGION, free_port  # noqa: E402

WORKFLOW = """
name: bench-sleep
params:
  seconds: {type: number, default: 0}
steps:
  - name: sleep
    action: util.sleep
    with: {seconds: "{{ seconds }}"}
"""


def log(message: str) -> None:
    print(f"[fleet] {message}", file=sys.stderr, flush=True)


def _time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _pct(values: list[float], q: float) -> float:
    return api_bench._percentile(sorted(values), q)


class Worker:
    """An ``imaging worker`` with a state directory of its own, in a process group of its own."""

    def __init__(self, home: Path, store: dict[str, Any] | None, workflows: Path, poll: float, lease: int):
        home.mkdir(parents=True)
        self.config = home / "imaging.yaml"
        data: dict[str, Any] = {
            "state_dir": str(home / "state"),
            "workflows": {"extra_dirs": [str(workflows)]},
            "worker": {"concurrency": 2, "poll_interval": poll, "lease_seconds": lease},
        }
        if store:
            data["store"] = store
        if store and store["url"].startswith("postgresql"):
            data["targets"] = {"volume": {"type": "file", "shared": True}}
        self.config.write_text(yaml.safe_dump(data))
        self.log = home / "worker.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "-c", str(self.config), "worker"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.state = home / "state"

    def ready(self) -> bool:
        beat = self.state / "worker.json"
        return beat.exists() and json.loads(beat.read_text() or "{}").get("status") == "ok"

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
            self.proc.wait()


def _wait(cond: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}")


def _engine(work: Path, store: dict[str, Any] | None, workflows: Path) -> Engine:
    data: dict[str, Any] = {
        "state_dir": str(work / "submitter"),
        "workflows": {"extra_dirs": [str(workflows)]},
    }
    if store:
        data["store"] = store
    if store and store["url"].startswith("postgresql"):
        data["targets"] = {"volume": {"type": "file", "shared": True}}
    return Engine(config_mod.from_dict(data))


def claim_latency(
    work: Path, store: dict[str, Any] | None, workflows: Path, args: argparse.Namespace
) -> dict:
    name = "postgresql" if store else "sqlite"
    (work / name).mkdir()
    target = store or {"url": f"sqlite:///{work / name / 'imaging.db'}"}
    engine = _engine(work / name, target, workflows)
    worker = Worker(work / name / "worker", target, workflows, args.poll, 60)
    latencies: list[float] = []
    runs: list[float] = []  # claimed -> completed: the task process's start, one step, its end
    try:
        _wait(worker.ready, 120, f"the {name} worker")
        rng = random.Random(7)
        for _ in range(args.claims):
            # a pause at a random phase of the worker's poll (a fixed one would meet it at one phase)
            time.sleep(rng.uniform(0.1, args.poll))
            task_id = engine.submit("bench-sleep", {"seconds": 0})
            _wait(lambda: engine.store.get_task(task_id).state is TaskState.COMPLETED, 60, "a task", 0.01)  # noqa: B023
            task = engine.store.get_task(task_id)
            claimed = [e for e in engine.store.events(task_id=task_id) if e.kind == "task.claimed"]
            latencies.append((_time(claimed[0].time) - _time(task.created_at)) * 1000)
            done = [e for e in engine.store.events(task_id=task_id) if e.kind == "task.state"]
            runs.append((_time(done[-1].time) - _time(claimed[0].time)) * 1000)
    finally:
        worker.stop()
        engine.close()
    result = {
        "backend": name,
        "claims": len(latencies),
        "poll_interval_s": args.poll,
        "p50_ms": _pct(latencies, 0.5),
        "p90_ms": _pct(latencies, 0.9),
        "p99_ms": _pct(latencies, 0.99),
        "max_ms": max(latencies),
        "over_100ms": sum(1 for x in latencies if x > 100),
        "claimed_to_completed_p50_ms": _pct(runs, 0.5),
    }
    log(f"claim latency {name}: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms "
        f"(max {result['max_ms']:.1f}, {len(latencies)} claims, poll {args.poll} s)")  # fmt: skip
    return result


def takeover(work: Path, cluster: Cluster, workflows: Path, args: argparse.Namespace) -> dict:
    times = []
    for round_ in range(args.takeovers):
        # a database per round: the task of the last one is left behind
        cluster.admin(f"CREATE DATABASE bench_takeover{round_}")
        store = {"url": cluster.url(f"bench_takeover{round_}")}
        engine = _engine(work / "takeover" / f"e{round_}", store, workflows)
        try:
            a = Worker(work / "takeover" / f"a{round_}", store, workflows, args.poll, args.lease)
            _wait(a.ready, 120, "worker A")
            task_id = engine.submit("bench-sleep", {"seconds": 120})
            _wait(lambda: engine.store.get_task(task_id).state is TaskState.RUNNING, 60, "the task on A")  # noqa: B023
            b = Worker(work / "takeover" / f"b{round_}", store, workflows, args.poll, args.lease)
            try:
                _wait(b.ready, 120, "worker B")
                killed_at = time.monotonic()
                kill_tree(a.proc.pid)
                _wait(lambda: engine.store.get_task(task_id).epoch >= 2, args.lease + 60, "the takeover")  # noqa: B023
                times.append(time.monotonic() - killed_at)
                log(f"takeover {round_ + 1}: {times[-1]:.2f} s after kill -9 (lease {args.lease} s)")
            finally:
                a.stop()
                b.stop()
        finally:
            engine.close()
    return {"lease_s": args.lease, "poll_interval_s": args.poll, "takeover_s": times,
            "max_s": max(times), "goal_s": args.lease + 5, "pass": max(times) <= args.lease + 5}  # fmt: skip


def describe(work: Path, cluster: Cluster, args: argparse.Namespace) -> dict:
    cluster.admin("CREATE DATABASE bench_describe")
    store = {"url": cluster.url("bench_describe")}
    t0 = time.monotonic()
    expected = api_bench.populate(store["url"], args.tasks)
    ids = list(expected)
    log(f"{len(ids)} tasks stored in PostgreSQL in {time.monotonic() - t0:.1f} s")
    creds = ("AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))
    servers = []
    try:
        for n in (1, 2):
            home = work / f"serve{n}"
            home.mkdir()
            shared = {"store": store, "targets": {"volume": {"type": "file", "shared": True}}}
            servers.append(api_bench.start_server(home, free_port(), 2, *creds, "info", extra=shared))
        load = argparse.Namespace(
            clients=args.clients,
            requests=args.requests,
            duration=args.duration,
            warmup=3.0,
            sample_every=50,
            workers=2,
            log_level="info",
            no_idle_wait=True,
        )
        report = api_bench.run_load(load, servers[0], ids, expected, creds, tuple(servers[1:]))
        api_bench.print_report(report)
        return asdict(report) | {"appliances": len(servers)}
    finally:
        for server in servers:
            server.stop()


# ------------------------------------------------------------------------------------------ imports

HZ = os.sysconf("SC_CLK_TCK")


def _stats() -> dict[int, tuple[int, float]]:
    """Every process: pid -> (parent pid, CPU seconds of itself and of its reaped children)."""
    out: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        # after the name: state ppid … utime(12th) stime cutime cstime
        out[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / HZ)
    return out


def _tree_cpu(stats: dict[int, tuple[int, float]], roots: list[int]) -> float:
    """CPU seconds of the process trees under ``roots``: each live process's own and its reaped
    children's (a child that ended counts in its parent's)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo += children.get(pid, [])
    return total


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine so far, over all CPUs."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / HZ, sum(fields[:8]) / HZ


def _parts(fleet: Fleet) -> dict[str, list[int]]:
    members = fleet.members
    return {
        "workers+tasks": [m.worker.pid for m in members if m.worker],
        "api servers": [m.serve.pid for m in members if m.serve],
        "postgresql": [fleet.postmaster_pid()],
        "moto (S3)": [fleet.moto.pid],
    }


def _small_image(work: Path, mib: int) -> Path:
    """A stream-optimized VMDK of ``mib`` MiB whose first quarter is data (random: not compressible)."""
    raw, vmdk = work / "small.raw", work / "small.vmdk"
    with raw.open("wb") as out:
        out.write(random.Random(3).randbytes(mib << 18))
        out.truncate(mib << 20)
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
            str(vmdk),
        ],
        check=True,
    )
    raw.unlink()
    return vmdk


def import_throughput(work: Path, appliances: int, image: Path, args: argparse.Namespace) -> dict:
    root = work / f"fleet{appliances}"
    with running_fleet(root, appliances=appliances, lease=60) as fleet:
        creds = fleet.credentials
        s3 = boto3.client(
            "s3",
            endpoint_url=fleet.moto.endpoint,
            region_name=REGION,
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )
        s3.create_bucket(Bucket="disks")
        s3.upload_file(str(image), "disks", "small.vmdk")
        ec2s = [
            boto3.client(
                "ec2",
                endpoint_url=m.endpoint,
                region_name=REGION,
                aws_access_key_id=creds["access_key"],
                aws_secret_access_key=creds["secret_key"],
            )
            for m in fleet.members
        ]
        container = {"Format": "VMDK", "UserBucket": {"S3Bucket": "disks", "S3Key": "small.vmdk"}}
        store = Store(fleet.store_url)
        try:

            def wait_all(ids: list[str], timeout: float) -> None:
                _wait(lambda: all(store.get_task(i).terminal for i in ids), timeout, "the imports", 0.1)
                failed = {
                    i: store.get_task(i).error_code
                    for i in ids
                    if store.get_task(i).state is not TaskState.COMPLETED
                }
                if failed:
                    raise RuntimeError(f"imports did not complete: {failed} (logs under {root})")

            def submit(ec2: Any) -> str:
                # tasks.max_active (default 5) counts the active tasks of the whole fleet (one store):
                # beyond it a client is told ResourceLimitExceeded and retries, as this one does
                while True:
                    try:
                        return str(ec2.import_snapshot(DiskContainer=container)["ImportTaskId"])
                    except botocore.exceptions.ClientError as exc:
                        if exc.response["Error"]["Code"] != "ResourceLimitExceeded":
                            raise
                        time.sleep(0.2)

            # warm-up: every appliance's worker is up and has run one import (first-use costs)
            wait_all([submit(ec2) for ec2 in ec2s], 300)
            stats0, machine0, self0 = _stats(), _machine_busy(), resource.getrusage(resource.RUSAGE_SELF)
            started = time.monotonic()
            ids = [submit(ec2s[i % appliances]) for i in range(args.imports)]
            submitted = time.monotonic() - started
            wait_all(ids, 60 * args.imports)
            seconds = time.monotonic() - started
            stats1, machine1, self1 = _stats(), _machine_busy(), resource.getrusage(resource.RUSAGE_SELF)
            tasks = [store.get_task(i) for i in ids]
        finally:
            store.close()
        turnaround = [_time(t.finished_at or t.updated_at) - _time(t.created_at) for t in tasks]
        cpu = {
            name: (_tree_cpu(stats1, pids) - _tree_cpu(stats0, pids)) / seconds
            for name, pids in _parts(fleet).items()
        }
        cpu["bench client"] = (self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime) / seconds
        busy = (machine1[0] - machine0[0]) / (machine1[1] - machine0[1]) * (os.cpu_count() or 1)
        cpu["everything else"] = max(0.0, busy - sum(cpu.values()))
    result = {
        "appliances": appliances,
        "worker_concurrency_each": 2,
        "imports": len(ids),
        "image_mib": args.image_mib,
        "submitted_in_s": submitted,
        "seconds": seconds,
        "imports_per_min": 60 * len(ids) / seconds,
        "turnaround_p50_s": _pct(turnaround, 0.5),
        "turnaround_max_s": max(turnaround),
        "machine_busy_cores": busy,
        "cores": os.cpu_count(),
        "cpu_cores_by_part": cpu,
    }
    shares = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
    log(
        f"imports with {appliances} appliance(s): {len(ids)} in {seconds:.1f} s = "
        f"{result['imports_per_min']:.1f}/min; turnaround p50 {result['turnaround_p50_s']:.1f} s, "
        f"max {result['turnaround_max_s']:.1f} s; busy {busy:.2f} of {os.cpu_count()} cores ({shares})"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="claim,takeover,describe,imports")
    p.add_argument("--claims", type=int, default=30)
    p.add_argument("--poll", type=float, default=5.0, help="worker.poll_interval (default 5 s)")
    p.add_argument("--lease", type=int, default=5)
    p.add_argument("--takeovers", type=int, default=3)
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--imports", type=int, default=12, help="small imports per fleet (default 12)")
    p.add_argument("--fleets", default="1,3", help="appliances per measured fleet (default 1,3)")
    p.add_argument("--image-mib", type=int, default=64, help="virtual size of the small image (default 64)")
    p.add_argument("--out", type=Path, default=ROOT / "out")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    work = Path(tempfile.mkdtemp(prefix="imaging-bench-fleet-", dir="/tmp"))
    os.chmod(work, 0o755)
    workflows = work / "workflows"
    workflows.mkdir()
    (workflows / "bench-sleep.yaml").write_text(WORKFLOW)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    try:
        if "imports" in parts:
            # each fleet brings its own PostgreSQL and moto server (tests.fleet)
            image = _small_image(work, args.image_mib)
            results["imports"] = [
                import_throughput(work, int(n), image, args) for n in args.fleets.split(",")
            ]
        with contextlib.ExitStack() as stack:
            if {"claim", "takeover", "describe"} & set(parts):
                cluster = stack.enter_context(postgres_cluster(synchronous_commit=True))
            if "claim" in parts:
                cluster.admin("CREATE DATABASE bench_claim")
                results["claim"] = [
                    claim_latency(work, None, workflows, args),
                    claim_latency(work, {"url": cluster.url("bench_claim")}, workflows, args),
                ]
            if "takeover" in parts:
                results["takeover"] = takeover(work, cluster, workflows, args)
            if "describe" in parts:
                results["describe"] = describe(work, cluster, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet-results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
