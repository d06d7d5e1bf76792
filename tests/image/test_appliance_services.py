"""The booted appliance, probed with testinfra over SSH: services, ports, files, packages, logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.image.conftest import APPLIANCE_ID, ROOT, SCRATCH_DISK_MIB, Controller
from tests.image.vm import GUEST_API_PORT, Vm

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1800)]

SERVICES = [
    "imaging-configure",
    "imaging-api",
    "imaging-worker",
    "imaging-log",
    "imaging-scratch",
    "imaging-reconfigure",
]


@pytest.mark.parametrize("name", SERVICES)
def test_service_is_enabled(host, name: str) -> None:
    assert host.service(name).is_enabled


@pytest.mark.parametrize("name", ["imaging-api", "imaging-worker", "imaging-log", "imaging-reconfigure"])
def test_long_running_service_is_running(host, name: str) -> None:
    assert host.service(name).is_running


def test_configure_and_scratch_oneshots_succeeded(host) -> None:
    for unit in ("imaging-configure", "imaging-scratch"):
        out = host.run(f"systemctl show -p Result -p ActiveState {unit}.service")
        assert "Result=success" in out.stdout and "ActiveState=active" in out.stdout, out.stdout


def test_health_responder_does_not_run_with_a_valid_config(host) -> None:
    assert not host.service("imaging-health-responder").is_running
    assert not host.file("/run/imaging/config-error.json").exists


def test_api_and_ssh_are_listening(host) -> None:
    assert host.socket(f"tcp://0.0.0.0:{GUEST_API_PORT}").is_listening
    assert host.socket("tcp://0.0.0.0:22").is_listening


def test_api_health_answers_through_the_forwarded_port(appliance_vm: Vm) -> None:
    status, body = appliance_vm.get_json("/v1/health")
    assert status == 200, body
    assert body["status"] in ("ok", "degraded"), body


def test_services_run_as_the_imaging_user(host) -> None:
    for unit in ("imaging-api", "imaging-worker"):
        pid = host.run(f"systemctl show -p MainPID --value {unit}.service").stdout.strip()
        assert pid not in ("", "0"), unit
        assert host.run(f"ps -o user= -p {pid}").stdout.strip() == "imaging", unit


def test_config_file_is_0600_owned_by_imaging_and_holds_the_user_data(host) -> None:
    cfg = host.file("/etc/imaging/imaging.yaml")
    assert cfg.is_file
    assert cfg.mode == 0o600
    assert cfg.user == "imaging"
    assert APPLIANCE_ID in cfg.content_string


def test_state_directories_are_private_to_the_service(host) -> None:
    for path in ("/var/lib/imaging", "/var/lib/imaging/scratch", "/var/log/imaging"):
        d = host.file(path)
        assert d.is_directory, path
        assert d.user == "imaging", path
        assert d.mode & 0o007 == 0, f"{path} is world-accessible: {oct(d.mode)}"
    assert host.file("/etc/imaging").mode & 0o007 == 0


def test_attached_blank_disk_is_mounted_as_scratch(host) -> None:
    mount = host.mount_point("/var/lib/imaging/scratch")
    assert mount.exists
    assert mount.filesystem == "ext4"
    assert "noexec" in mount.options
    size = int(host.run("findmnt -n -b -o SIZE /var/lib/imaging/scratch").stdout)
    assert SCRATCH_DISK_MIB * 2**20 * 0.9 < size <= SCRATCH_DISK_MIB * 2**20


def test_seed_disk_is_left_alone(host) -> None:
    # the NoCloud seed is an iso9660 disk: it must never be taken for a blank scratch disk
    assert host.run("blkid -s TYPE -o value /dev/vdb").stdout.strip() == "iso9660"


def test_qemu_img_and_the_imaging_command_are_installed(host) -> None:
    assert host.package("qemu-utils").is_installed
    assert host.run("qemu-img --version").rc == 0
    assert host.run("/usr/local/bin/imaging --help").rc == 0


def test_no_compilers_or_development_packages(host) -> None:
    installed = host.run("dpkg-query -W -f '${Package} ${Status}\\n'").stdout.splitlines()
    names = [line.split()[0] for line in installed if line.endswith(" installed")]
    assert names, "dpkg-query listed nothing"
    offenders = [n for n in names if re.fullmatch(r"gcc(-\d+)?|cpp(-\d+)?|g\+\+.*|build-essential|.*-dev", n)]
    assert offenders == []
    assert not host.exists("gcc")


def test_version_and_git_ref_are_recorded(host) -> None:
    info = json.loads(host.file("/etc/imaging/build-info.json").content_string)
    assert re.fullmatch(r"[0-9a-f]{40}", info["git_ref"])
    # the ref is a commit of this repository
    subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{info['git_ref']}^{{commit}}"], check=True)
    version = host.run(
        "/opt/imaging/venv/bin/python -c 'import importlib.metadata as m; "
        'print(m.version("imaging-appliance"))\''
    ).stdout.strip()
    assert info["version"] == version
    assert host.file("/opt/imaging/VERSION").content_string.split() == [version, info["git_ref"]]
    # the image under test is the one built from these inputs (build.sh names the cache by them)
    if os.environ.get("IMAGING_TEST_IMAGE"):
        return  # a prebuilt image: its inputs are not this checkout's
    cached = {p.stem for p in (ROOT / ".build" / "cache").glob("*.qcow2")}
    assert info["inputs_sha256"] in cached


def test_services_log_to_journald_and_the_log_file(host) -> None:
    assert host.run("journalctl -u imaging-api.service -q --no-pager | grep -c .").stdout.strip() != "0"
    log = host.file("/var/log/imaging/imaging.log")
    assert log.exists and log.mode & 0o007 == 0
    # the configure line and the API's start-up both reach the file
    text = log.content_string
    assert "imaging-configure" in text and "configured appliance" in text
    assert "imaging-api" in text or "gunicorn" in text
    assert host.file("/etc/logrotate.d/imaging").contains("/var/log/imaging/")
    assert host.run("logrotate --debug /etc/logrotate.d/imaging").rc == 0


def test_cloud_init_uses_only_the_test_datasources(host) -> None:
    out = host.run("cloud-init status --long").stdout
    assert "NoCloud" in out
    cfg = host.file("/etc/cloud/cloud.cfg.d/91-dib-cloud-init-datasources.cfg").content_string
    assert "Ec2" not in cfg and "NoCloud" in cfg


def test_grub_timeout_is_zero(host) -> None:
    assert re.search(r"^GRUB_TIMEOUT=0$", host.file("/etc/default/grub").content_string, re.M)


def test_worker_reports_heartbeats_to_the_controller_through_the_guest_forward(
    appliance_vm: Vm, controller: Controller
) -> None:
    # two in a row: each report is a new connection through qemu's guestfwd relay
    deadline = time.monotonic() + 120
    beats: list[dict] = []
    while time.monotonic() < deadline and len(beats) < 2:
        beats = []
        if controller.log.exists():
            for line in controller.log.read_text().splitlines():
                msg = json.loads(line).get("message", {})
                if msg.get("appliance_id") == APPLIANCE_ID and msg.get("type") == "heartbeat":
                    beats.append(msg)
        time.sleep(2)
    assert len(beats) >= 2, f"fewer than 2 heartbeats from {APPLIANCE_ID} in {controller.log}"
    assert beats[0]["ver"] == 1 and beats[0]["seq"] < beats[1]["seq"]
    assert beats[-1]["version"] == host_version(appliance_vm)


def host_version(vm: Vm) -> str:
    return vm.ssh("cut -d' ' -f1 /opt/imaging/VERSION").stdout.strip()


def test_console_log_shows_the_boot(appliance_vm: Vm) -> None:
    assert Path(appliance_vm.console).stat().st_size > 0


@pytest.mark.parametrize("unit", ["imaging-api", "imaging-worker"])
def test_services_are_sandboxed(host, unit: str) -> None:
    props = dict(
        line.split("=", 1)
        for line in host.run(
            f"systemctl show -p ProtectSystem -p ProtectHome -p NoNewPrivileges -p PrivateTmp "
            f"-p CapabilityBoundingSet -p Restart -p User {unit}.service"
        ).stdout.splitlines()
    )
    assert props["ProtectSystem"] == "strict"
    assert props["ProtectHome"] == "yes"
    assert props["NoNewPrivileges"] == "yes"
    assert props["PrivateTmp"] == "yes"
    assert props["CapabilityBoundingSet"] == ""
    assert props["Restart"] == "on-failure"
    assert props["User"] == "imaging"


def test_worker_gets_no_guest_hooks_dropin_without_guest_mounting_hooks(host) -> None:
    # the user data configures no hooks: imaging configure must not widen the worker's privileges
    assert not host.file("/run/systemd/system/imaging-worker.service.d/guest-hooks.conf").exists
    assert "guest-hooks" not in host.run("systemctl show -p DropInPaths imaging-worker.service").stdout


def test_worker_cannot_write_outside_its_directories(host) -> None:
    pid = host.run("systemctl show -p MainPID --value imaging-worker.service").stdout.strip()
    # the worker's mount namespace: /usr read-only, /var/lib/imaging writable
    ro = host.run(f"nsenter -t {pid} -m findmnt -n -o OPTIONS --target /usr").stdout
    rw = host.run(f"nsenter -t {pid} -m findmnt -n -o OPTIONS --target /var/lib/imaging").stdout
    assert ro.startswith("ro"), ro
    assert rw.startswith("rw"), rw


def test_killed_worker_is_restarted(host) -> None:
    before = host.run("systemctl show -p MainPID --value imaging-worker.service").stdout.strip()
    assert host.run(f"kill -9 {before}").rc == 0
    deadline = time.monotonic() + 90
    after = before
    while time.monotonic() < deadline:
        after = host.run("systemctl show -p MainPID --value imaging-worker.service").stdout.strip()
        if after not in (before, "0") and host.service("imaging-worker").is_running:
            break
        time.sleep(2)
    assert after not in (before, "0")
