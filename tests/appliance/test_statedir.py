"""The state directory is private (appliance.statedir): `imaging serve` and `imaging worker`, started as
`make run` starts them under root's usual umask 022, leave nothing in it another user can read, and
tighten what an older installation left."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from appliance.paths import StatePaths
from tests.processes import stop_process, wait_until
from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port, wait_for_http


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def modes(state: Path) -> dict[str, int]:
    """The mode of the state directory and of everything directly in it (the subdirectories' own
    files are their modules' business: scratch, uploads)."""
    return {".": mode(state)} | {p.name: mode(p) for p in state.iterdir()}


@contextmanager
def started(tmp_path: Path, state: Path) -> Iterator[None]:
    """`imaging serve` and `imaging worker` on the SQLite state directory ``state`` (umask 022), until
    the API answers and the worker has written its heartbeat; stopped by their PIDs afterwards."""
    port = free_port()
    cfg = tmp_path / "imaging.yaml"
    credentials = [{"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}]
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(state),
                "api": {"bind": f"127.0.0.1:{port}", "workers": 1, "credentials": credentials},
                "worker": {"concurrency": 1, "poll_interval": 0.2},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "IMAGING_CONFIG"}
    procs: list[subprocess.Popen[bytes]] = []
    old = os.umask(0o022)  # root's default: what make run and systemd services get unless told
    try:
        for command in ("worker", "serve"):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "appliance.cli", "-c", str(cfg), command],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    finally:
        os.umask(old)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/health", proc=procs[1])
        wait_until(lambda: StatePaths(state).worker_heartbeat.exists(), what="the worker's heartbeat")
        yield
    finally:
        for proc in procs:
            stop_process(proc)


def assert_private(state: Path) -> None:
    found = modes(state)
    for name, m in found.items():
        is_dir = name == "." or (state / name).is_dir()
        assert m == (0o700 if is_dir else 0o600), f"{name}: {m:o} in {found}"


def test_fresh_state_directory_is_private_from_the_start(tmp_path: Path) -> None:
    state = tmp_path / "var"
    with started(tmp_path, state):
        found = modes(state)
        # the task database in WAL mode, its side files and the worker's directories are there
        assert {"imaging.db", "imaging.db-wal", "imaging.db-shm", "worker.json", "scratch"} <= set(found)
        assert_private(state)


def test_existing_world_readable_installation_is_tightened_on_start(tmp_path: Path) -> None:
    state = tmp_path / "var"
    paths = StatePaths(state)
    old = os.umask(0o022)
    try:  # what the earlier versions left: a plain mkdir and SQLite's own file creation
        for directory in (state, paths.scratch, paths.uploads, paths.mounts):
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o755)
        for file in (paths.db, paths.config_announced):
            file.touch()
            os.chmod(file, 0o644)
    finally:
        os.umask(old)
    assert modes(state)["."] == 0o755 and modes(state)["imaging.db"] == 0o644  # control
    with started(tmp_path, state):
        assert_private(state)
