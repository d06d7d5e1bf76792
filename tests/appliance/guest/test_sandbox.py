"""appliance.guest.sandbox, the launcher of every chroot command, run directly on a guest tree (root only).

The run step and run-in-guest tests cover it on mounted guest disks; these cover what the engine
cannot easily reach: a sandbox that cannot be set up, the worker's reduced capability set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.boot.worker_dropin import CAPABILITIES
from appliance.guest.sandbox import LAUNCHER_ENV, SETUP_FAILED, SandboxFailed, check_status, launcher_argv
from tests.guestfactory import linux_tree

CAP_BITS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_SYS_CHROOT": 18, "CAP_SYS_ADMIN": 21}


@pytest.fixture
def guest(tmp_path: Path) -> Path:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    return linux_tree(tmp_path / "guest", fstab="", programs=True)


def launch(guest: Path, command: str, prefix: tuple[str, ...] = ()) -> tuple[int, str, str, bytes]:
    """(exit status, stdout, stderr, status report) of ``command`` run by the launcher in ``guest``."""
    r, w = os.pipe()
    argv = launcher_argv(
        guest, ["/bin/sh", "-c", command], cwd="/", env={"PATH": "/usr/bin:/bin"}, status_fd=w
    )
    try:
        proc = subprocess.run(
            [*prefix, *argv], pass_fds=(w,), capture_output=True, text=True, env=LAUNCHER_ENV, timeout=60
        )
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        return proc.returncode, proc.stdout, proc.stderr, f.read()


def status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, sep, v in (line.partition(":") for line in text.splitlines()) if sep}


def test_a_sandbox_that_cannot_be_set_up_is_a_coded_failure_and_the_command_never_runs(guest: Path) -> None:
    # without CAP_SYS_ADMIN the namespaces cannot be created
    rc, _, _, status = launch(guest, "touch /ran", ("setpriv", "--bounding-set=-sys_admin", "--"))
    assert rc == SETUP_FAILED
    assert status.startswith(b"E") and b"unshare" in status
    assert not (guest / "ran").exists()
    with pytest.raises(SandboxFailed, match="unshare") as exc:
        check_status(status, rc)
    assert exc.value.code == "Run.SandboxFailed"


def test_a_launcher_that_died_before_reporting_is_a_sandbox_failure() -> None:
    with pytest.raises(SandboxFailed, match="status 1 before starting the command: Traceback"):
        check_status(b"", 1, "Traceback")
    check_status(b"R", 3)  # started: the command's own status is not the sandbox's business


def test_under_the_worker_dropin_capabilities_the_command_still_has_none(guest: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-only-secret"
    secret.write_text("s3cr3t-of-the-host\n")
    # as systemd starts the worker with the drop-in: these capabilities only (no CAP_SETPCAP), no_new_privs
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in CAPABILITIES)])
    prefix = ("setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs", "--")
    rc, out, err, status = launch(guest, f"cat /proc/self/status; cat /proc/1/root{secret}", prefix)
    assert status == b"R" and rc == 1, err
    fields = status_fields(out)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert fields[cap] == "0000000000000000", (cap, fields[cap])
    # the bounding set cannot be emptied without CAP_SETPCAP, but it holds no more than the drop-in's
    allowed = sum(1 << CAP_BITS[c] for c in CAPABILITIES)
    assert int(fields["CapBnd"], 16) & ~allowed == 0
    assert fields["NoNewPrivs"] == "1"
    assert "s3cr3t" not in out + err


def test_a_guest_without_a_proc_directory_runs_without_proc(guest: Path) -> None:
    (guest / "proc").rmdir()
    (guest / "proc").symlink_to("/etc")  # a link must not get proc mounted over the guest's /etc
    rc, out, err, status = launch(guest, "ls /etc/os-release; ls /proc/self")
    assert status == b"R"
    assert out.splitlines()[0] == "/etc/os-release"
    assert "running without /proc" in err and rc != 0
