"""Chaos: three appliances on one PostgreSQL database and one moto server (:func:`tests.fleet.running_fleet`),
20 imports (RAW manifest ImportVolume and VMDK ImportSnapshot, mixed), and one appliance killed with
SIGKILL — its API server, its worker and every task process the worker started, at one moment
(:func:`tests.processes.kill_tree`) — while it converts.

The moment is made exact, not timed: every S3 read of the appliances goes through the fleet's
:class:`~tests.stallproxy.StallingProxy`, which holds each RAW upload's second part after 256 KiB (the
first part is verified and on the volume: the conversion is under way) and each VMDK object's download
past the preflight's ranged reads. Once every worker slot of the fleet is held there, one appliance
dies; then the proxy lets everything through.

What must hold: every import ends ``completed`` exactly once (one ``completed`` state event each, one
volume or snapshot each, its bytes equal to the source by ``qemu-img compare``); each task of the dead
appliance is taken over (a ``task.takeover`` event, then ``task.resumed``) and completed by another
appliance — a RAW one from its checkpoint in the store (its first part is not fetched again); the
tasks the others ran were never claimed twice; Describe through each surviving endpoint shows the
same; and the reports every appliance pushes to the reference controller (``appliance.report.receiver``,
a process) carry each task's completion once, a task's messages in the order of its events (a
``takeover`` message for each task taken over), each appliance's seqs in order. The time from the
kill to each takeover is recorded (``record_property``), not asserted: speed belongs in
``bench/fleet.py``.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from appliance.image.inspect import PREFLIGHT_HEAD
from appliance.store import Store, Task, TaskState
from appliance.timestamps import parse_time
from tests import imagefactory as imgs
from tests import processes
from tests.appliance.report.test_push import SECRET, ReceiverProcess, states_of
from tests.euca_upload import presign_manifest_url, random_file, upload
from tests.fleet import Fleet, Member, running_fleet
from tests.servers import REGION
from tests.stallproxy import StallingProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
IMPORTS = 20
BUCKET = "chaos"
#: RAW uploads: three 1 MiB parts; the second is held after this many bytes
RAW_SIZE, PART_SIZE, HOLD_RAW = 3 * MiB, MiB, 256 * 1024
#: VMDK objects (~4 MiB of random data): held past the preflight's ranged read of the first 2 MiB
VMDK_DATA, HOLD_VMDK = 4 * MiB, PREFLIGHT_HEAD + MiB
RAW_SUFFIX, VMDK_SUFFIX = ".raw.part.1", ".vmdk"
#: the step of import-volume that writes the upload onto the volume (its checkpoints are in the store)
WRITE_STEP = "3"
TERMINAL = (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


def ec2(fleet: Fleet, member: Member) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=member.endpoint,
        region_name=REGION,
        aws_access_key_id=fleet.credentials["access_key"],
        aws_secret_access_key=fleet.credentials["secret_key"],
    )


def s3_through(proxy: StallingProxy) -> Any:
    """An S3 client of the proxy: the part URLs it presigns are read through the proxy."""
    return boto3.client(
        "s3",
        endpoint_url=proxy.endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def same_disk(source: Path, fmt: str, written: Path) -> None:
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", fmt, "-F", "raw", str(source), str(written)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, (source, written, cmp.stdout + cmp.stderr)


def written_path(task: Task) -> Path:
    assert task.result is not None
    if task.kind == "import-snapshot":
        return Path(task.result["disk"]["stored"]["path"])
    return Path(task.result["volume"]["path"])


def worker_of(task: Task, fleet: Fleet) -> Member | None:
    """The appliance whose worker started the process that owns ``task`` now."""
    if not task.owner:
        return None
    proc = processes.read_proc(int(task.owner.rpartition(":")[2]))
    return next((m for m in fleet.members if proc and m.worker and proc.ppid == m.worker.pid), None)


def kinds(store: Store, task_ids: list[str]) -> set[str]:
    return {store.get_task(t).kind for t in task_ids}


def test_kill_9_of_an_appliance_mid_conversion_loses_no_import_and_completes_each_exactly_once(
    tmp_path: Path, record_property: Any
) -> None:
    sources = tmp_path / "sources"
    sources.mkdir()
    settings = {
        "tasks": {"max_active": IMPORTS},
        "worker": {"poll_interval": 0.5},
        # a checkpoint at every (1 MiB) part: the RAW import resumes after the parts written before the kill
        "sources": {
            "manifest_poll_interval": 0.2,
            "manifest_poll_max_interval": 0.5,
            "retries": 10,
            "checkpoint_every": PART_SIZE,
        },
    }
    # every appliance pushes its reports to the reference controller, as itself
    receiver = ReceiverProcess(tmp_path / "controller.jsonl")

    def controller(number: int) -> dict[str, Any]:
        return {
            "controller": {
                "mode": "push",
                "url": receiver.url,
                "secret": SECRET,
                "appliance_id": f"appliance-{number}",
                "report_interval": 1,
                "progress_interval": 5,
                "timeout": 2,
                "max_backoff": 1,
            }
        }

    with contextlib.ExitStack() as stack:
        receiver.start()
        stack.callback(receiver.stop)
        fleet = stack.enter_context(
            running_fleet(
                tmp_path / "fleet", 3, lease=15, settings=settings, member_settings=controller, proxy=True
            )
        )
        proxy = fleet.proxy
        assert proxy is not None
        fleet.moto.client("s3").create_bucket(Bucket=BUCKET)
        through_proxy = s3_through(proxy)
        clients = [ec2(fleet, m) for m in fleet.members]
        # armed before the first task exists: no download passes unheld
        proxy.arm(RAW_SUFFIX, after=HOLD_RAW)
        proxy.arm(VMDK_SUFFIX, after=HOLD_VMDK)
        #: task id -> (source file, its format)
        submitted: dict[str, tuple[Path, str]] = {}
        for n in range(IMPORTS):
            client = clients[n % len(clients)]
            if n % 2 == 0:
                raw = random_file(sources / f"disk{n}.raw", RAW_SIZE, seed=n)
                pending = presign_manifest_url(through_proxy, BUCKET, None, raw)
                upload(through_proxy, pending, raw, part_size=PART_SIZE)
                task_id = client.import_volume(
                    AvailabilityZone="us-east-1a",
                    Image={"Format": "RAW", "Bytes": RAW_SIZE, "ImportManifestUrl": pending.url},
                    Volume={"Size": 1},
                )["ConversionTask"]["ConversionTaskId"]
                submitted[task_id] = (raw, "raw")
            else:
                data = random_file(sources / f"data{n}.raw", VMDK_DATA, seed=n)
                vmdk = sources / f"disk{n}.vmdk"
                imgs.qemu_img(
                    "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", data, vmdk
                )
                assert vmdk.stat().st_size > HOLD_VMDK
                fleet.moto.client("s3").upload_file(str(vmdk), BUCKET, vmdk.name)
                task_id = client.import_snapshot(
                    DiskContainer={"Format": "VMDK", "UserBucket": {"S3Bucket": BUCKET, "S3Key": vmdk.name}}
                )["ImportTaskId"]
                submitted[task_id] = (vmdk, "vmdk")
        ids = list(submitted)
        store = Store(fleet.store_url)
        try:
            # every worker slot of the fleet (3 appliances x 2) holds a task in the middle of its download
            slots = 3 * 2
            processes.wait_until(
                lambda: (
                    proxy.stalled_on(RAW_SUFFIX) + proxy.stalled_on(VMDK_SUFFIX) >= slots
                    or any(store.get_task(t).state in TERMINAL for t in ids)
                ),
                timeout=240,
                what="every worker slot of the fleet held mid-conversion",
            )
            assert [t for t in ids if store.get_task(t).state in TERMINAL] == []
            running = [store.get_task(t) for t in ids if store.get_task(t).state is TaskState.RUNNING]
            assert len(running) == slots
            held: dict[int, list[str]] = {}
            for task in running:
                member = worker_of(task, fleet)
                assert member is not None, task.owner
                held.setdefault(member.number, []).append(task.id)
            assert sorted(len(v) for v in held.values()) == [2, 2, 2]
            # a RAW import held at its second part has its first verified, written and checkpointed
            processes.wait_until(
                lambda: all(
                    (store.load_checkpoint(t.id, WRITE_STEP) or {}).get("next", 0) >= 1
                    for t in running
                    if t.kind == "import-volume"
                ),
                timeout=120,
                what="the first part of each held RAW import checkpointed",
            )
            # the appliance that dies: one converting both kinds if there is one
            victim_number = max(held, key=lambda n: (len(kinds(store, held[n])), -n))
            victim = fleet.members[victim_number - 1]
            dead_tasks = held[victim_number]
            dead_owners = {t: store.get_task(t).owner for t in dead_tasks}
            killed_at = time.time()
            assert victim.serve is not None and victim.worker is not None
            # the worker with its task processes, then the API server: nothing of it gets to clean up
            killed = processes.kill_tree(victim.worker.pid) + processes.kill_tree(victim.serve.pid)
            victim.worker.wait()
            victim.serve.wait()
            processes.wait_until(lambda: not [p for p in killed if p.alive()], what="the appliance gone")
            proxy.release()

            processes.wait_until(
                lambda: all(store.get_task(t).state in TERMINAL for t in ids),
                timeout=600,
                interval=0.5,
                what="all 20 imports to end",
            )
            tasks = {t: store.get_task(t) for t in ids}
            failed = {
                t: (x.state, x.error_code, x.error_message)
                for t, x in tasks.items()
                if x.state is not TaskState.COMPLETED
            }
            assert failed == {}
            events = {t: store.events(task_id=t, limit=100_000) for t in ids}
        finally:
            store.close()

        # exactly once: one completed state change each, never two
        for task_id in ids:
            completed = [
                e for e in events[task_id] if e.kind == "task.state" and e.data["state"] == "completed"
            ]
            assert len(completed) == 1, (task_id, completed)

        # the dead appliance's tasks were taken over and resumed by another appliance
        takeover_seconds = {}
        for task_id in dead_tasks:
            kinds_seen = [e.kind for e in events[task_id]]
            takeovers = [e for e in events[task_id] if e.kind == "task.takeover"]
            assert len(takeovers) == 1, (task_id, kinds_seen)
            takeover = takeovers[0].data
            assert takeover["previous_owner"] == dead_owners[task_id]
            assert (takeover["previous_epoch"], takeover["epoch"]) == (1, 2)
            assert takeover["owner"] != dead_owners[task_id]
            after = kinds_seen[kinds_seen.index("task.takeover") :]
            assert "task.resumed" in after and after.index("task.resumed") < after.index("task.state")
            assert tasks[task_id].epoch == 2 and tasks[task_id].attempts == 2
            takeover_seconds[task_id] = parse_time(takeovers[0].time).timestamp() - killed_at
        record_property("takeover_seconds_after_kill", takeover_seconds)
        print(f"takeovers after kill -9 of appliance {victim_number}: {takeover_seconds}")
        # the others' tasks were claimed once and never taken over
        for task_id in set(ids) - set(dead_tasks):
            assert (tasks[task_id].epoch, tasks[task_id].attempts) == (1, 1), task_id
            assert "task.takeover" not in [e.kind for e in events[task_id]]

        # a RAW import taken over resumed from its checkpoint in the store: its first part (verified and
        # written by the dead appliance) was fetched once; the held one again
        for task_id in dead_tasks:
            source, fmt = submitted[task_id]
            if fmt == "raw":
                first = sum(
                    n for p, n in proxy.served_by_path.items() if p.endswith(f"/{source.name}.part.0")
                )
                assert first == PART_SIZE, (task_id, proxy.served_by_path)

        # one volume or snapshot each, equal to its source
        written = {t: written_path(x) for t, x in tasks.items()}
        assert len(set(written.values())) == IMPORTS
        for task_id, (source, fmt) in submitted.items():
            same_disk(source, fmt, written[task_id])
        volumes = {p for p in (fleet.root / "volumes").iterdir() if not p.name.startswith(".")}
        assert volumes == {written[t] for t in ids if submitted[t][1] == "raw"}
        images = {p for p in fleet.root.glob("appliance*/images/*") if not p.name.startswith(".")}
        assert images == {written[t] for t in ids if submitted[t][1] == "vmdk"}

        # Describe through each surviving endpoint: the same, and completed
        volume_ids = [t for t in ids if submitted[t][1] == "raw"]
        snapshot_ids = [t for t in ids if submitted[t][1] == "vmdk"]
        seen = []
        for member in fleet.members:
            if member is victim:
                continue
            client = ec2(fleet, member)
            conversions = client.describe_conversion_tasks(ConversionTaskIds=volume_ids)["ConversionTasks"]
            snapshots = client.describe_import_snapshot_tasks(ImportTaskIds=snapshot_ids)[
                "ImportSnapshotTasks"
            ]
            assert sorted(c["ConversionTaskId"] for c in conversions) == sorted(volume_ids)
            assert {c["State"] for c in conversions} == {"completed"}
            assert sorted(s["ImportTaskId"] for s in snapshots) == sorted(snapshot_ids)
            assert {s["SnapshotTaskDetail"]["Status"] for s in snapshots} == {"completed"}
            seen.append(
                (
                    sorted(conversions, key=lambda c: c["ConversionTaskId"]),
                    sorted(snapshots, key=lambda s: s["ImportTaskId"]),
                )
            )
        assert len(seen) == 2 and seen[0] == seen[1]

        # the reports: each task's completion once, from the appliance that completed it; each
        # appliance's seqs in order; a task's messages in the order of its events
        processes.wait_until(
            lambda: all("completed" in states_of(receiver.messages(), t) for t in ids),
            timeout=120,
            what="every completion reported to the controller",
        )
        msgs = receiver.messages()
        for number in range(1, 4):
            seqs = [m["seq"] for m in msgs if m["appliance_id"] == f"appliance-{number}"]
            assert seqs == sorted(set(seqs)), number
        for task_id in ids:
            about = [m for m in msgs if m["type"] == "task" and m["task"]["id"] == task_id]
            assert [m["event_id"] for m in about] == sorted({m["event_id"] for m in about}), task_id
            assert states_of(msgs, task_id).count("completed") == 1, task_id
        for task_id in dead_tasks:
            [done] = [
                m
                for m in msgs
                if m.get("event") == "state"
                and m["task"]["id"] == task_id
                and m["task"]["state"] == "completed"
            ]
            assert done["appliance_id"] != f"appliance-{victim_number}"
            assert "takeover" in [
                m["event"] for m in msgs if m["type"] == "task" and m["task"]["id"] == task_id
            ]
