"""The confinement policy of untrusted-input parsers (appliance.confine), with real processes."""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance import confine
from appliance.errors import UsageError
from tests import confinement, processes

GiB = 1 << 30


@pytest.fixture
def limits() -> config_mod.Limits:
    return config_mod.from_dict({}).limits


@pytest.fixture
def fresh_isolation() -> Iterator[None]:
    """Probe the network isolation again in this test (and forget the result afterwards)."""
    confine.isolation.cache_clear()
    yield
    confine.isolation.cache_clear()


def test_child_environment_is_minimal() -> None:
    env = confine.child_env()
    assert env == {"LC_ALL": "C", "LANG": "C", "PATH": confine.MINIMAL_PATH, "MALLOC_ARENA_MAX": "2"}
    assert all(p.startswith("/") for p in env["PATH"].split(":"))


def test_the_tool_runs_behind_setpriv_unshare_and_prlimit_which_exec_it(limits: config_mod.Limits) -> None:
    policy = confine.qemu_img_info(limits)
    cmd = confine.command(["/usr/bin/qemu-img", "info", "x"], policy)
    names = [Path(a).name for a in cmd]
    assert names[:5] == ["setpriv", "--pdeathsig", "KILL", "--no-new-privs", "--"]
    assert (
        f"--cpu={policy.cpu_seconds}" in cmd and f"--as={policy.address_space}" in cmd and "--core=0" in cmd
    )
    assert cmd[-4:] == ["--", "/usr/bin/qemu-img", "info", "x"]
    if confine.isolation().network is not None:
        assert "unshare" in names and "--net" in cmd


def test_limits_come_from_the_configuration_and_scale_with_the_work() -> None:
    cfg = config_mod.from_dict(
        {
            "limits": {
                "qemu_img_info_cpu_seconds": 3,
                "qemu_img_check_cpu_seconds": 30,
                "qemu_img_address_space": "512MiB",
                "qemu_img_output": "2MiB",
                "qemu_img_convert_cpu_seconds": 100,
                "qemu_img_convert_cpu_seconds_per_gib": 10,
                "qemu_img_convert_address_space": "3GiB",
                "decompress_cpu_seconds": 50,
                "decompress_cpu_seconds_per_gib": 20,
                "decompress_address_space": "768MiB",
                "guest_probe_cpu_seconds": 7,
                "guest_probe_address_space": "256MiB",
            }
        }
    ).limits
    assert confine.qemu_img_info(cfg) == confine.Policy("qemu-img info", 3, 512 << 20, 60, 2 << 20)
    assert confine.qemu_img_check(cfg) == confine.Policy("qemu-img check", 30, 512 << 20, 120, 2 << 20)
    # per started GiB of virtual size; no wall-clock limit (I/O caps may make a genuine run slow)
    assert confine.qemu_img_convert(cfg, 4 * GiB + 1) == confine.Policy(
        "qemu-img convert", 150, 3 << 30, None
    )
    assert confine.qemu_img_convert(cfg, 0).cpu_seconds == 100
    assert confine.decompressor(cfg, 2 * GiB) == confine.Policy("the decompressor", 90, 768 << 20, None)
    assert confine.guest_probe(cfg) == confine.Policy("the guest reader", 7, 256 << 20, 60)
    assert confine.guest_probe(cfg, wall_seconds=5).wall_seconds == 5


@pytest.mark.parametrize(
    ("cap", "said"), [(64 << 20, "64 MiB"), (256 << 10, "256 KiB"), ((1 << 20) + 1, "1048577 bytes")]
)
def test_an_output_cap_is_described_as_configured(cap: int, said: str) -> None:
    """A cap below a MiB or not a whole one is not shown rounded down (``0 MiB of output``)."""
    assert confine.Policy("qemu-img check", 30, 1 << 30, 60, cap).describe().endswith(f", {said} of output")


def test_cpu_limit_kills_a_busy_process(tmp_path: Path) -> None:
    policy = confine.Policy("a loop", 1, 1 << 30, None)
    res = confine.run(["/bin/sh", "-c", "while :; do :; done"], policy, cwd=tmp_path)
    assert res.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert confine.limit_hit(res.returncode, res.stderr) in ("was killed by SIGXCPU", "was killed by SIGKILL")


def test_wall_clock_limit_stops_a_process_that_waits(tmp_path: Path) -> None:
    res = confine.run(["/bin/sleep", "30"], confine.Policy("a sleeper", 10, 1 << 30, 0.5), cwd=tmp_path)
    assert (
        res.timed_out
        and confine.limit_hit(res.returncode, res.stderr, res.timed_out) == "did not finish in time"
    )


def test_a_confined_child_has_no_network(tmp_path: Path, limits: config_mod.Limits) -> None:
    if confine.isolation().network is None:
        pytest.skip(f"this host gives no private network namespace: {confine.isolation().reason}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        probe = (
            f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5); print('connected')"
        )
        # control: the same program outside the policy reaches the listener
        plain = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True)
        assert plain.stdout.strip() == "connected", plain.stderr
        res = confine.run([sys.executable, "-I", "-c", probe], confine.guest_probe(limits), cwd=tmp_path)
    assert res.returncode != 0 and "connected" not in res.stdout
    assert "Network is unreachable" in res.stderr or "Connection refused" in res.stderr, res.stderr


def test_a_confined_child_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    # an intermediate process starts a confined and a plain sleeper, then is killed with SIGKILL
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from pathlib import Path
        from appliance import confine
        confined = confine.spawn(["/bin/sleep", "300"], confine.Policy("sleep", 600, 1 << 30, None),
                                 cwd=Path({str(tmp_path)!r}), stdout=None, stderr=None)
        plain = subprocess.Popen(["/bin/sleep", "301"])
        print(confined.pid, plain.pid, flush=True)
        time.sleep(600)
        """
    )
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert starter.stdout is not None
    confined_pid, plain_pid = map(int, starter.stdout.readline().split())
    try:
        # the launcher chain execs into the tool: same pid
        processes.wait_until(
            lambda: confinement.cmdline(confined_pid) == ["/bin/sleep", "300"], 30, "the chain to exec sleep"
        )
        starter.kill()
        starter.wait()
        processes.wait_until(lambda: confinement.gone(confined_pid), 30, "the confined child to die")
        # control: without the parent-death signal a child outlives its parent
        assert not confinement.gone(plain_pid)
    finally:
        for pid in (confined_pid, plain_pid):
            if not confinement.gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_only_the_standard_descriptors_reach_the_child(tmp_path: Path, limits: config_mod.Limits) -> None:
    secret = tmp_path / "inherited.txt"
    secret.write_text("must not leak")
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        listing = "import os; print(sorted(int(n) for n in os.listdir('/proc/self/fd')))"
        res = confine.run(
            [sys.executable, "-I", "-S", "-c", listing], confine.guest_probe(limits), cwd=tmp_path
        )
    finally:
        os.close(fd)
    # 0, 1, 2 and the directory listdir itself opened
    assert res.returncode == 0, res.stderr
    assert ast.literal_eval(res.stdout.strip()) == [0, 1, 2, 3]


def test_without_user_namespaces_the_reason_is_kept_and_the_tool_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_isolation: None, limits: config_mod.Limits
) -> None:
    # an unshare that fails as on a kernel that forbids namespaces (a real process standing in)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "unshare"
    shim.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    iso = confine.isolation()
    assert iso.network is None and iso.unshare == ()
    assert "Operation not permitted" in (iso.reason or "")
    assert iso.to_dict() == {"network": None, "reason": iso.reason}
    cmd = confine.command(["/bin/true"], confine.qemu_img_info(limits))
    assert str(shim) not in cmd and not any(Path(a).name == "unshare" for a in cmd)
    assert confine.run(["/bin/true"], confine.qemu_img_info(limits), cwd=tmp_path).returncode == 0


def test_a_missing_util_linux_tool_is_a_coded_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limits: config_mod.Limits
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(confine.ImagingError) as exc:
        confine.command(["/bin/true"], confine.qemu_img_info(limits))
    assert exc.value.code == "MissingTool" and "setpriv" in exc.value.message


def test_private_link_directory_is_empty_private_and_removed(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 512)
    (tmp_path / "sibling.vmdk").write_text("not visible")
    with confine.private_link(image, tmp_path) as link:
        assert oct(link.parent.stat().st_mode & 0o777) == oct(0o700)
        assert [p.name for p in link.parent.iterdir()] == [confine.LINK_NAME]
    assert not link.parent.exists() and image.exists()


def test_collect_asked_for_an_output_cap_and_input_at_once_refuses_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    policy = confine.Policy("a sleeper", 10, 1 << 30, 30)
    proc = confine.spawn(["/bin/sleep", "30"], policy, cwd=tmp_path, stdin=subprocess.PIPE, new_session=True)
    with pytest.raises(UsageError):
        confine.collect(proc, policy, input=b"data", max_output=1 << 20)
    assert proc.returncode is not None  # killed and reaped, not left sleeping
