"""Boot the appliance image under qemu for tests: overlay disk, NoCloud seed, forwarded ports, SSH.

The guest's network is qemu's user mode with ``restrict=on``: nothing leaves this machine. The host
reaches the guest through ``hostfwd`` (SSH, the API) and the guest reaches test servers on the host
through ``guestfwd`` (an address of the guest's 10.0.2.0/24 net mapped to a host loopback port).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.processes import stop_process
from tests.servers import free_port

QEMU = "qemu-system-x86_64"
RELAY = Path(__file__).with_name("relay.py")
GUEST_API_PORT = 8773
MiB = 2**20

#: how long a KVM boot may take to answer SSH before KVM is declared unusable (a nested kvm_pvm
#: host accepts -accel kvm but the guest kernel never gets past its decompressor)
KVM_PROBE_SECONDS = 90.0
_accel_verdict: str | None = None


class BootFailed(RuntimeError):
    """The guest did not become ready; the message carries the end of its console."""


@dataclass(frozen=True)
class GuestForward:
    """The guest connects to ``guest_ip:guest_port``; qemu relays to ``127.0.0.1:host_port``."""

    guest_ip: str
    guest_port: int
    host_port: int

    @property
    def guest_url(self) -> str:
        return f"http://{self.guest_ip}:{self.guest_port}"


def kvm_candidate() -> bool:
    """Whether KVM is worth a probe boot: /dev/kvm usable and the CPU exposing VT-x or AMD-V."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M) is not None


def accelerators() -> list[str]:
    """Accelerators to try in order. ``IMAGING_TEST_ACCEL=tcg|kvm`` forces one."""
    forced = os.environ.get("IMAGING_TEST_ACCEL")
    if forced:
        return [forced]
    if _accel_verdict is not None:
        return [_accel_verdict]
    return ["kvm", "tcg"] if kvm_candidate() else ["tcg"]


def _cloud_config(doc: dict[str, Any]) -> str:
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False)


def seed_iso(
    workdir: Path,
    user_data: dict[str, Any] | str,
    instance_id: str,
    vendor_data: dict[str, Any] | None = None,
) -> Path:
    """A NoCloud seed (ISO labelled ``cidata``) holding the user data (a dict: ``#cloud-config``; a
    string: as is, e.g. the compact ``imaging:v1:…`` line), meta-data and optionally ``#cloud-config``
    vendor data (cloud-init applies it too: how a test reaches a guest whose user data is one line)."""
    ud = workdir / "user-data"
    md = workdir / "meta-data"
    ud.write_text(user_data if isinstance(user_data, str) else _cloud_config(user_data))
    md.write_text(f"instance-id: {instance_id}\nlocal-hostname: {instance_id}\n")
    iso = workdir / "seed.iso"
    cmd = ["cloud-localds", str(iso), str(ud), str(md)]
    if vendor_data is not None:
        vd = workdir / "vendor-data"
        vd.write_text(_cloud_config(vendor_data))
        cmd[1:1] = ["--vendor-data", str(vd)]
    subprocess.run(cmd, check=True, capture_output=True)
    return iso


@dataclass
class Vm:
    """One booted appliance. Create with :func:`boot`; :meth:`stop` kills qemu by its own PID."""

    workdir: Path
    accel: str
    ssh_port: int
    api_port: int
    ssh_config: Path
    proc: subprocess.Popen | None = None
    boot_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def ssh(self, command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``command`` in the guest as root (through the ssh config's ControlMaster)."""
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "appliance", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def wait_cloud_init(self, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """``cloud-init status --wait`` over SSH, retried while ssh itself fails (exit 255) until
        ``timeout``: under TCG sshd can answer its banner before cloud-init has installed root's key,
        and the first connection is then refused."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                result = self.ssh("cloud-init status --wait", timeout=max(left, 1), check=False)
            except subprocess.TimeoutExpired as exc:
                tail = self.console_tail()
                raise BootFailed(f"cloud-init: not done within {timeout:.0f} s:\n{tail}") from exc
            if result.returncode != 255:
                break
            if time.monotonic() + 3 >= deadline or not self.alive():
                raise BootFailed(
                    f"ssh never connected within {timeout:.0f} s ({self.accel}): {result.stderr.strip()}\n"
                    f"{self.console_tail()}"
                )
            time.sleep(3)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def get_json(self, path: str, timeout: float = 5) -> tuple[int, Any]:
        """GET ``path`` on the forwarded API port: (HTTP status, parsed JSON body)."""
        try:
            with urllib.request.urlopen(self.api_url + path, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for(self, what: str, probe, timeout: float) -> None:
        """Poll ``probe()`` until it is truthy; fail with the console tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BootFailed(f"qemu exited while waiting for {what}:\n{self.console_tail()}")
            with contextlib.suppress(Exception):
                if probe():
                    return
            time.sleep(1)
        raise BootFailed(f"{what}: not within {timeout:.0f} s ({self.accel}):\n{self.console_tail()}")

    def ssh_banner(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=3) as s:
            s.settimeout(3)
            return s.recv(16).startswith(b"SSH-")

    def stop(self) -> None:
        """Close the SSH master and kill qemu (our own process only)."""
        subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "-O", "exit", "appliance"], capture_output=True, check=False
        )
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, grace=10)


def _write_ssh_config(workdir: Path, port: int, key: Path) -> Path:
    # testinfra's ssh backend ignores --ssh-extra-args: everything goes into a config file.
    control = Path("/tmp") / f"imaging-ssh-{os.getpid()}-{port}"  # short: unix socket paths max 108
    cfg = workdir / "ssh_config"
    cfg.write_text(
        "Host appliance\n"
        "  HostName 127.0.0.1\n"
        f"  Port {port}\n"
        "  User root\n"
        f"  IdentityFile {key}\n"
        "  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n"
        "  LogLevel ERROR\n"
        "  ConnectTimeout 10\n"
        "  ServerAliveInterval 10\n"
        "  ControlMaster auto\n"
        f"  ControlPath {control}\n"
        "  ControlPersist 300\n"
    )
    return cfg


def _start_qemu(
    image: Path,
    workdir: Path,
    seed: Path,
    accel: str,
    ssh_key: Path,
    forwards: list[GuestForward],
    scratch_disk_mib: int,
    memory_mib: int,
    root_size: str,
) -> Vm:
    overlay = workdir / f"overlay-{accel}.qcow2"
    overlay.unlink(missing_ok=True)
    # An overlay keeps the built image pristine; a larger virtual size gives growpart work to do.
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay), root_size],
        check=True,
    )
    ssh_port, api_port = free_port(), free_port()
    netdev = (
        f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,"
        f"hostfwd=tcp:127.0.0.1:{api_port}-:{GUEST_API_PORT}"
    )
    for f in forwards:
        # cmd: runs the relay per guest connection (a tcp: target is one shared connection)
        netdev += (
            f",guestfwd=tcp:{f.guest_ip}:{f.guest_port}-cmd:{sys.executable} {RELAY} 127.0.0.1 {f.host_port}"
        )
    accel_arg = "kvm" if accel == "kvm" else "tcg,thread=multi"
    cmd = [
        QEMU,
        "-name",
        f"imaging-test-{workdir.name}",
        "-accel",
        accel_arg,
        "-smp",
        "2",
        "-m",
        str(memory_mib),
        "-nographic",
        "-serial",
        f"file:{workdir / 'console.log'}",
        "-monitor",
        "none",
        "-drive",
        f"file={overlay},if=virtio,format=qcow2",
        "-drive",
        f"file={seed},if=virtio,format=raw,readonly=on",
        "-netdev",
        netdev,
        "-device",
        "virtio-net-pci,netdev=n0",
    ]
    if scratch_disk_mib:
        scratch = workdir / "scratch.qcow2"
        scratch.unlink(missing_ok=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(scratch), f"{scratch_disk_mib}M"], check=True
        )
        cmd += ["-drive", f"file={scratch},if=virtio,format=qcow2"]
    (workdir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
    log = open(workdir / "qemu.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    vm = Vm(workdir, accel, ssh_port, api_port, _write_ssh_config(workdir, ssh_port, ssh_key), proc)
    return vm


def boot(
    image: Path,
    workdir: Path,
    user_data: dict[str, Any] | str,
    ssh_key: Path,
    *,
    vendor_data: dict[str, Any] | None = None,
    forwards: list[GuestForward] = (),
    scratch_disk_mib: int = 0,
    memory_mib: int = 1536,
    root_size: str = "4G",
    ssh_timeout: float = 420,
    on_start: Callable[[Vm, float], None] | None = None,
) -> Vm:
    """Boot ``image`` with ``user_data`` (a ``#cloud-config`` dict, or raw text) until SSH answers.

    KVM is used only when a probe boot reaches SSH within :data:`KVM_PROBE_SECONDS`; otherwise TCG.
    ``on_start(vm, started)`` is called as soon as qemu runs (``started``: its ``time.monotonic()``),
    e.g. to watch a service that may answer before SSH does.
    """
    global _accel_verdict
    if shutil.which(QEMU) is None:
        raise BootFailed(f"{QEMU} is not installed (Debian package qemu-system-x86)")
    workdir.mkdir(parents=True, exist_ok=True)
    seed = seed_iso(workdir, user_data, f"iid-{workdir.name}", vendor_data)
    candidates = accelerators()
    for i, accel in enumerate(candidates):
        last = i == len(candidates) - 1
        started = time.monotonic()
        vm = _start_qemu(
            image, workdir, seed, accel, ssh_key, list(forwards), scratch_disk_mib, memory_mib, root_size
        )
        if on_start is not None:
            on_start(vm, started)
        try:
            vm.wait_for("SSH", vm.ssh_banner, ssh_timeout if last else KVM_PROBE_SECONDS)
        except BootFailed:
            vm.stop()
            if last:
                raise
            continue
        vm.boot_seconds["ssh"] = time.monotonic() - started
        vm.boot_seconds["started"] = started
        _accel_verdict = accel
        return vm
    raise BootFailed("no accelerator to try")
