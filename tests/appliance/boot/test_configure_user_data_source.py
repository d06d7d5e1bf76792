"""Where and when `imaging configure` finds the instance's user data when no file is named: cloud-init's
copy on disk first (no second cloud-init process on the boot's path to the API), `cloud-init query`
only when that copy is missing or blank; with `--wait-cloud-init`, once cloud-init's init stage has
stored this boot's copy (the image's unit runs beside that stage, not after it).

cloud-init does not run on this machine: a stand-in `cloud-init` executable on PATH answers `query
userdata` and records that it was asked (the only stand-in here; the file is a real file)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from appliance.boot import cloudinit

#: the boot time the tests give the wait (2023-11-14T22:13:20Z): a fixed moment before any file a test
#: writes, so that what a test writes now is "since this boot", and a file it dates before is not
BOOTED = 1_700_000_000.0


@pytest.fixture
def query(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `cloud-init` on PATH whose `query userdata` prints other user data; returns its record file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "asked"
    exe = bin_dir / "cloud-init"
    exe.write_text(f"#!/bin/sh\necho \"$@\" >> {asked}\necho 'imaging:v1:from-query:http://c.test:x'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return asked


def test_cloud_inits_copy_on_disk_is_read_without_asking_cloud_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: Path
) -> None:
    copy = tmp_path / "user-data.txt"
    copy.write_bytes(b"imaging:v1:from-file:http://c.test:x\n")
    monkeypatch.setattr(cloudinit, "CLOUD_INIT_USER_DATA", copy)
    assert cloudinit.read_user_data(None) == b"imaging:v1:from-file:http://c.test:x\n"
    assert not query.exists(), "cloud-init was started although its copy was on disk"


@pytest.mark.parametrize("content", [None, b"", b"\n  \n"])
def test_cloud_init_is_asked_when_its_copy_is_missing_or_blank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: Path, content: bytes | None
) -> None:
    copy = tmp_path / "user-data.txt"
    if content is not None:
        copy.write_bytes(content)
    monkeypatch.setattr(cloudinit, "CLOUD_INIT_USER_DATA", copy)
    assert cloudinit.read_user_data(None) == b"imaging:v1:from-query:http://c.test:x\n"
    assert query.read_text().split() == ["query", "userdata"]


@pytest.fixture
def cloud_init_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cloud-init's per-boot directory while its init stage runs (status: not finished)."""
    run = tmp_path / "run-cloud-init"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"v1": {"init": {"start": 1.0, "finished": None}}}))
    monkeypatch.setattr(cloudinit, "CLOUD_INIT_RUN", run)
    monkeypatch.setattr(cloudinit, "CLOUD_INIT_PROCESSED", tmp_path / "user-data.txt.i")
    monkeypatch.setattr(cloudinit, "CLOUD_INIT_USER_DATA", tmp_path / "user-data.txt")
    return run


def test_configure_waits_for_the_user_data_cloud_init_stores_during_this_boot(
    tmp_path: Path, cloud_init_run: Path
) -> None:
    booted = BOOTED  # cloud-init writes its copy below after it: during this boot
    processed = tmp_path / "user-data.txt.i"
    returned: list[bool] = []

    def wait() -> None:  # the 60 s only keep a broken wait from hanging the test
        returned.append(cloudinit.wait_for_cloud_init(60, booted=booted))
        returned.append(processed.exists())  # what there was when the wait ended

    waiter = threading.Thread(target=wait)
    waiter.start()
    waiter.join(0.5)  # a wait that does not wait has this long to show it
    assert waiter.is_alive(), "configure did not wait for cloud-init's copy of this boot"
    (tmp_path / "user-data.txt").write_bytes(b"imaging:v1:this-boot:http://c.test:x\n")
    processed.write_bytes(b"processed")
    waiter.join(60)
    # it ended because cloud-init stored this boot's user data, not before
    assert returned == [True, True]
    assert cloudinit.read_user_data(None) == b"imaging:v1:this-boot:http://c.test:x\n"


def test_a_copy_from_an_earlier_boot_is_not_taken_until_the_init_stage_has_finished(
    tmp_path: Path, cloud_init_run: Path
) -> None:
    processed = tmp_path / "user-data.txt.i"
    processed.write_bytes(b"processed")
    booted = BOOTED
    os.utime(processed, (booted - 3600, booted - 3600))  # an hour before this boot
    assert not cloudinit.wait_for_cloud_init(0.5, booted=booted)
    (cloud_init_run / "status.json").write_text(json.dumps({"v1": {"init": {"start": 1.0, "finished": 2.0}}}))
    assert cloudinit.wait_for_cloud_init(60, booted=booted)  # at once: the 60 s only prevent a hang


def test_no_wait_where_cloud_init_does_not_run(tmp_path: Path, cloud_init_run: Path) -> None:
    (cloud_init_run / "status.json").unlink()
    cloud_init_run.rmdir()
    assert cloudinit.wait_for_cloud_init(0.0, booted=BOOTED)
