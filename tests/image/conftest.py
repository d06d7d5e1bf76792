"""Session fixtures of the image tests: build (or reuse) the appliance image, boot it, reach it.

The image is built by ``build.sh -c``: a build whose inputs (elements/, build.sh, the project's
sources, pyproject.toml, the options) are unchanged reuses ``.build/cache/<hash>.qcow2``. One VM
with a valid configuration is shared by the tests of a session; the bad-configuration VM boots only
for the tests that ask for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.image import vm as vmlib
from tests.processes import stop_process
from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY, MotoServer, free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[2]
TEST_IMAGE = ROOT / ".build" / "test" / "imaging-appliance.qcow2"
#: never Ec2 in tests: it probes 169.254.169.254, traffic off this machine
TEST_DATASOURCES = "NoCloud, ConfigDrive"
APPLIANCE_ID = "appliance-test-1"
CONTROLLER_SECRET = "controller-secret-0123456789abcdef"
#: guest-side addresses of the host's test servers (qemu guestfwd)
S3_GUEST_IP = "10.0.2.100"
CONTROLLER_GUEST_IP = "10.0.2.101"
SCRATCH_DISK_MIB = 1024
#: the appliance booted with a guest-mounting hook: its own id, so its reports (own seq) stay apart
HOOKS_APPLIANCE_ID = "appliance-test-hooks"
MARKER_PATH = "/etc/imaging-marker"
MARKER_CONTENT = "stamped by the appliance's after_convert hook\n"
#: per-task caps of every test appliance (tests/image/test_appliance_limits.py reads them back from the
#: task's cgroup); generous enough not to slow the other image tests
TASK_CAPS = {
    "task_cpu_quota": "150%",
    "task_io_weight": 300,
    "task_io_read_bandwidth": "200MiB",
    "task_io_write_bandwidth": "100MiB",
    "task_memory_max": "768MiB",
}
#: the user data's hooks: inject-metadata mounts the guest, so configure grants the worker root
HOOKS = {
    "points": {
        "after_convert": [
            {"hook": "inject-metadata", "with": {"files": [{"path": MARKER_PATH, "content": MARKER_CONTENT}]}}
        ]
    }
}

# Building needs root (loop devices, chroot, mounts) and loop devices passed into a container.
_why_not = None
if os.geteuid() != 0:
    _why_not = "the image tests build with diskimage-builder, which needs root (loop devices, chroot)"
elif not os.path.exists("/dev/loop-control"):
    _why_not = "no /dev/loop-control: diskimage-builder cannot attach the image"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(item.fspath).parent == here and "image" in item.keywords and _why_not:
            item.add_marker(pytest.mark.skip(reason=_why_not))


@pytest.fixture(scope="session")
def appliance_image() -> Path:
    """The test build of the image (uncompressed qcow2, NoCloud + ConfigDrive), cached by input hash.

    ``IMAGING_TEST_IMAGE=PATH`` tests a prebuilt image instead (it must have been built with the
    test datasources).
    """
    prebuilt = os.environ.get("IMAGING_TEST_IMAGE")
    if prebuilt:
        return Path(prebuilt).resolve()
    TEST_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    out = subprocess.run(
        [str(ROOT / "build.sh"), "-c", "-u", "-d", TEST_DATASOURCES, "-o", str(TEST_IMAGE)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        pytest.fail(f"build.sh failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    sys.stderr.write(
        f"\n[image] {out.stdout.strip().splitlines()[-1]} ({time.monotonic() - started:.0f} s)\n"
    )
    return TEST_IMAGE


@pytest.fixture(scope="session")
def image_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image")


@pytest.fixture(scope="session")
def ssh_key(image_workdir: Path) -> Path:
    """A throw-away ed25519 key pair for root in the guests (the public key goes in the user data)."""
    key = image_workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@dataclass(frozen=True)
class Controller:
    """The reference controller process on the host and the guest's view of it."""

    forward: vmlib.GuestForward
    log: Path
    pid: int


@pytest.fixture(scope="session")
def controller(image_workdir: Path) -> Iterator[Controller]:
    """``python -m appliance.report.receiver`` recording the appliance's signed reports."""
    port = free_port()
    log = image_workdir / "controller.jsonl"
    out = open(image_workdir / "controller.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.report.receiver",
            "--bind",
            f"127.0.0.1:{port}",
            "--secret",
            CONTROLLER_SECRET,
            "--log",
            str(log),
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc=proc)
        yield Controller(vmlib.GuestForward(CONTROLLER_GUEST_IP, 8780, port), log, proc.pid)
    finally:
        stop_process(proc, grace=10)
        out.close()


def s3_forward(moto: MotoServer) -> vmlib.GuestForward:
    """The guest reaches the host's moto at 10.0.2.100 on moto's own port."""
    port = int(moto.endpoint.rsplit(":", 1)[1])
    return vmlib.GuestForward(S3_GUEST_IP, port, port)


def user_data(
    ssh_key: Path, s3: vmlib.GuestForward, controller: Controller, **imaging_overrides: Any
) -> dict[str, Any]:
    """``#cloud-config`` for a test appliance: root SSH with the test key plus the ``imaging:`` section."""
    imaging: dict[str, Any] = {
        "appliance_id": APPLIANCE_ID,
        "controller": {
            "url": controller.forward.guest_url,
            "secret": CONTROLLER_SECRET,
            "mode": "push",
            "report_interval": 5,
        },
        "api": {
            "bind": f"0.0.0.0:{vmlib.GUEST_API_PORT}",
            "credentials": [{"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}],
        },
        "sources": {"allowed_endpoints": [s3.guest_url]},
        "targets": {"volume": {"type": "file"}},
        "limits": {"concurrent_tasks": 1, **TASK_CAPS},
        "log_level": "debug",
    }
    imaging.update(imaging_overrides)
    return {
        "disable_root": False,
        "ssh_pwauth": False,
        "ssh_authorized_keys": [ssh_key.with_suffix(".pub").read_text().strip()],
        "imaging": imaging,
    }


@pytest.fixture(scope="session")
def appliance_vm(
    appliance_image: Path,
    image_workdir: Path,
    ssh_key: Path,
    moto: MotoServer,
    controller: Controller,
) -> Iterator[vmlib.Vm]:
    """The appliance booted with a valid configuration, ready: API health answers and cloud-init is done."""
    s3 = s3_forward(moto)
    vm = vmlib.boot(
        appliance_image,
        image_workdir / "good",
        user_data(ssh_key, s3, controller),
        ssh_key,
        forwards=[s3, controller.forward],
        scratch_disk_mib=SCRATCH_DISK_MIB,
    )
    try:
        vm.wait_for("the API's /v1/health", lambda: vm.get_json("/v1/health")[0] in (200, 503), 300)
        vm.boot_seconds["api"] = time.monotonic() - vm.boot_seconds["started"]
        vm.wait_cloud_init(300)
        vm.boot_seconds["cloud-init"] = time.monotonic() - vm.boot_seconds["started"]
        sys.stderr.write(f"\n[image] good VM ({vm.accel}): {vm.boot_seconds}\n")
        yield vm
    finally:
        vm.stop()


@pytest.fixture(scope="session")
def bad_config_vm(
    appliance_image: Path,
    image_workdir: Path,
    ssh_key: Path,
    moto: MotoServer,
    controller: Controller,
) -> Iterator[vmlib.Vm]:
    """The appliance booted with user data missing ``imaging.appliance_id``; ready when SSH and the
    health responder answer and cloud-init is done."""
    data = user_data(ssh_key, s3_forward(moto), controller)
    del data["imaging"]["appliance_id"]
    vm = vmlib.boot(appliance_image, image_workdir / "bad", data, ssh_key, forwards=[controller.forward])
    try:
        vm.wait_for("the health responder", lambda: vm.get_json("/v1/health")[0] >= 200, 300)
        vm.wait_cloud_init(300, check=False)
        yield vm
    finally:
        vm.stop()


@pytest.fixture(scope="module")
def hooks_vm(
    appliance_image: Path,
    image_workdir: Path,
    ssh_key: Path,
    moto: MotoServer,
    controller: Controller,
) -> Iterator[vmlib.Vm]:
    """The appliance booted with :data:`HOOKS` in its user data (a second boot: the worker of
    :func:`appliance_vm` must stay unprivileged); ready like it. Stopped after the module."""
    s3 = s3_forward(moto)
    data = user_data(ssh_key, s3, controller, appliance_id=HOOKS_APPLIANCE_ID, hooks=HOOKS)
    vm = vmlib.boot(
        appliance_image,
        image_workdir / "hooks",
        data,
        ssh_key,
        forwards=[s3, controller.forward],
        scratch_disk_mib=SCRATCH_DISK_MIB,
    )
    try:
        vm.wait_for("the API's /v1/health", lambda: vm.get_json("/v1/health")[0] in (200, 503), 300)
        vm.wait_cloud_init(300)
        vm.boot_seconds["cloud-init"] = time.monotonic() - vm.boot_seconds["started"]
        sys.stderr.write(f"\n[image] hooks VM ({vm.accel}): {vm.boot_seconds}\n")
        yield vm
    finally:
        vm.stop()


@pytest.fixture(scope="session")
def host(appliance_vm: vmlib.Vm):
    """A testinfra host over SSH (the ssh config carries the key, the port and no host-key checks)."""
    testinfra = pytest.importorskip("testinfra")
    return testinfra.get_host("ssh://appliance", ssh_config=str(appliance_vm.ssh_config))
