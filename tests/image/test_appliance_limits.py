"""Per-task caps and the confinement of parsers in the booted appliance, read from the kernel while a
real task runs.

The appliance boots with :data:`~tests.image.conftest.TASK_CAPS` in its user data. An ``ImportVolume``
is started before its manifest is uploaded, so its task child waits (polling the manifest) inside its
cgroup while the test reads ``cpu.max``, ``memory.max``, ``io.max`` and the IO weights there; a watcher
in the guest then catches the guest probe that validates the written volume and records its limits,
namespaces and working directory. Once the task is done its cgroup is gone.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import parse_size
from appliance.service.taskcgroup import bfq_weight, cpu_max
from tests.euca_upload import presign_manifest_url, random_file, upload
from tests.image.conftest import TASK_CAPS, s3_forward
from tests.image.ec2 import MiB, SplitS3, ec2_client, s3_client
from tests.image.vm import Vm
from tests.servers import MotoServer

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1800)]

SERVICE_CGROUP = "/sys/fs/cgroup/system.slice/imaging-worker.service"

#: runs in the guest: catches the guest probe in a task cgroup, holds it (SIGSTOP), records it
WATCHER = r"""
import json, os, signal, sys, time
base, deadline, worker = sys.argv[1], time.time() + float(sys.argv[2]), sys.argv[3]
def probe(pid):
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    return len(argv) > 3 and argv[1:3] == [b"-I", b"-c"] and b"from appliance.guest.probe import" in argv[3]
while time.time() < deadline:
    for name in os.listdir(base):
        if not name.startswith("task-"):
            continue
        try:
            pids = open(f"{base}/{name}/cgroup.procs").read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                if not probe(pid):
                    continue
                os.kill(int(pid), signal.SIGSTOP)
                try:
                    limits = open(f"/proc/{pid}/limits").read()
                    cwd = os.readlink(f"/proc/{pid}/cwd")
                    seen = {
                        "cgroup": name,
                        "limits": {l[:26].strip(): l[26:47].strip() for l in limits.splitlines()[1:]},
                        "net": os.readlink(f"/proc/{pid}/ns/net"),
                        "user": os.readlink(f"/proc/{pid}/ns/user"),
                        "worker_net": os.readlink(f"/proc/{worker}/ns/net"),
                        "worker_user": os.readlink(f"/proc/{worker}/ns/user"),
                        "cwd": cwd,
                        "cwd_entries": sorted(os.listdir(f"/proc/{pid}/cwd")),
                        "fds": [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")],
                        "status": dict(
                            l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines()
                        ),
                    }
                finally:
                    os.kill(int(pid), signal.SIGCONT)
                print(json.dumps(seen))
                sys.exit(0)
            except (OSError, ValueError):
                continue
    time.sleep(0.02)
sys.exit(1)
"""


def _sh(vm: Vm, command: str, **kw: Any) -> str:
    return vm.ssh(command, **kw).stdout


def _task_cgroups(vm: Vm) -> list[str]:
    return _sh(vm, f"ls -d {SERVICE_CGROUP}/task-* 2>/dev/null || true").split()


def _wait(what: str, probe: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def test_worker_unit_delegates_its_cgroup_and_health_says_the_caps_are_enforced(appliance_vm: Vm) -> None:
    props = dict(
        line.split("=", 1)
        for line in _sh(
            appliance_vm,
            "systemctl show -p Delegate -p DelegateControllers -p ProtectControlGroups "
            "imaging-worker.service",
        ).splitlines()
    )
    assert props["Delegate"] == "yes" and props["ProtectControlGroups"] == "no", props
    assert {"cpu", "io", "memory", "pids"} <= set(props["DelegateControllers"].split()), props
    # the worker moved itself into a leaf of its delegated cgroup
    pid = _sh(appliance_vm, "systemctl show -p MainPID --value imaging-worker.service").strip()
    assert (
        _sh(appliance_vm, f"cat /proc/{pid}/cgroup").strip()
        == "0::/system.slice/imaging-worker.service/worker"
    )
    status, body = appliance_vm.get_json("/v1/health")
    assert status == 200, body
    limits, confinement = body["checks"]["task_limits"], body["checks"]["confinement"]
    schedulers = _sh(appliance_vm, "grep . /sys/block/*/queue/scheduler /sys/block/*/removable")
    assert limits["status"] == "ok", f"{limits}\n{schedulers}"
    assert set(limits["caps"]) == {f"worker.{k}" for k in TASK_CAPS}
    assert limits["cgroup"] == SERVICE_CGROUP
    assert confinement == {"status": "ok", "network": "user+net"}, confinement
    # the IO weight is only worth something under BFQ: configure flagged it, udev selected it
    assert "[bfq]" in _sh(appliance_vm, "cat /sys/block/vda/queue/scheduler")
    assert _sh(appliance_vm, "cat /run/imaging/io-weight")


def test_a_running_task_is_capped_in_its_cgroup_and_its_probe_is_confined(
    appliance_vm: Vm, moto: MotoServer, tmp_path: Path
) -> None:
    assert _task_cgroups(appliance_vm) == [], "a task cgroup is left from an earlier test"
    disk = random_file(tmp_path / "disk.raw", 12 * MiB, seed=7)
    bucket = "appliance-limits"
    moto.client("s3").create_bucket(Bucket=bucket)
    s3 = SplitS3(s3_client(s3_forward(moto).guest_url), moto.client("s3"))
    pending = presign_manifest_url(s3, bucket, "limits", disk)
    ec2 = ec2_client(appliance_vm)
    # the manifest is not there yet: the task waits for it in its cgroup
    task_id = ec2.import_volume(
        AvailabilityZone="us-east-1a",
        Image={"Format": "RAW", "Bytes": disk.stat().st_size, "ImportManifestUrl": pending.url},
        Volume={"Size": 1},
    )["ConversionTask"]["ConversionTaskId"]
    cgroup = _wait("the task's cgroup", lambda: _task_cgroups(appliance_vm))
    assert cgroup == [f"{SERVICE_CGROUP}/task-{task_id}"]
    path = cgroup[0]
    # the worker makes the cgroup before it starts the task child, which joins it once Python is up
    _wait("the task child in its cgroup", lambda: _sh(appliance_vm, f"cat {path}/cgroup.procs").strip())
    files = {
        name: _sh(appliance_vm, f"cat {path}/{name} 2>/dev/null || true").strip()
        for name in ("cpu.max", "memory.max", "io.max", "io.weight", "io.bfq.weight", "cgroup.procs")
    }
    assert files["cpu.max"] == cpu_max(TASK_CAPS["task_cpu_quota"])
    assert int(files["memory.max"]) == parse_size(TASK_CAPS["task_memory_max"])
    disks = _sh(appliance_vm, "for d in /sys/block/vd*; do cat $d/dev; done").split()
    read, write = (
        parse_size(TASK_CAPS["task_io_read_bandwidth"]),
        parse_size(TASK_CAPS["task_io_write_bandwidth"]),
    )
    io_max = {line.split()[0]: line.split()[1:] for line in files["io.max"].splitlines()}
    assert set(io_max) == set(disks), files["io.max"]
    for limits in io_max.values():
        assert f"rbps={read}" in limits and f"wbps={write}" in limits
    # BFQ's weight is the one that acts here; io.weight exists (and is set) where io.cost is built in
    assert files["io.bfq.weight"].splitlines()[0] == f"default {bfq_weight(TASK_CAPS['task_io_weight'])}"
    assert files["io.weight"] in ("", f"default {TASK_CAPS['task_io_weight']}"), files
    # the task child itself is in there
    children = [
        _sh(appliance_vm, f"tr '\\0' ' ' < /proc/{pid}/cmdline") for pid in files["cgroup.procs"].split()
    ]
    assert any(f"appliance.service.worker run {task_id}" in c for c in children), children

    # catch the guest probe that validates the volume once the parts are in
    worker = _sh(appliance_vm, "systemctl show -p MainPID --value imaging-worker.service").strip()
    script = base64.b64encode(WATCHER.encode()).decode()
    appliance_vm.ssh(f"echo {script} | base64 -d > /root/watch.py")
    appliance_vm.ssh(
        f"nohup python3 /root/watch.py {SERVICE_CGROUP} 900 {worker} > /root/watch.json 2> /root/watch.err "
        "< /dev/null &"
    )
    upload(s3, pending, disk, part_size=5 * MiB)
    deadline = time.monotonic() + 900
    while True:
        t = ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"][0]
        if t["State"] in ("completed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert t["State"] == "completed", t
    # its cgroup went with it
    _wait("the finished task's cgroup to go", lambda: _task_cgroups(appliance_vm) == [], 60)

    out = _sh(appliance_vm, "cat /root/watch.json; cat /root/watch.err", check=False)
    seen = json.loads(out.splitlines()[0]) if out.strip().startswith("{") else None
    assert seen is not None, f"the guest probe was never seen running: {out}"
    assert seen["cgroup"] == f"task-{task_id}"
    assert seen["limits"]["Max cpu time"] == "60" and seen["limits"]["Max address space"] == str(1 << 30)
    assert seen["limits"]["Max core file size"] == "0"
    # a network and a user namespace of its own, not the worker's; no capability; no_new_privs
    assert seen["net"] != seen["worker_net"] and seen["user"] != seen["worker_user"]
    assert int(seen["status"]["CapEff"].strip(), 16) == 0 and seen["status"]["NoNewPrivs"].strip() == "1"
    assert seen["cwd_entries"] == ["image"] and "/guest-probe." in seen["cwd"]
    assert not [
        fd for fd in seen["fds"] if fd.startswith("socket:") or "/etc/imaging" in fd or "imaging.db" in fd
    ]
