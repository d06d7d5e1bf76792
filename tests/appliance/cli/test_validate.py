"""``imaging validate`` as a user runs it: a real process, real images, exit 0 / 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import guestfactory as gf


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("IMAGING_CONFIG", None)
    e["XDG_STATE_HOME"] = str(tmp_path / "state")
    return e


def imaging(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "appliance.cli", *map(str, args)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def test_validate_json_of_a_bootable_linux_disk_exits_0(tmp_path: Path, env: dict[str, str]) -> None:
    res = imaging("validate", gf.linux_disk(tmp_path), "--json", "--platform", "Linux", env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is True and report["layout"] == "disk" and report["os"]["distribution"] == "debian"
    assert report["findings"] == []


def test_validate_json_with_error_findings_exits_2(tmp_path: Path, env: dict[str, str]) -> None:
    res = imaging("validate", gf.linux_disk(tmp_path), "--json", "--platform", "Windows", env=env)
    assert res.returncode == 2
    assert [f["code"] for f in json.loads(res.stdout)["findings"]] == ["Guest.PlatformMismatch"]


def test_data_disk_flag_turns_boot_errors_into_info(tmp_path: Path, env: dict[str, str]) -> None:
    img = gf.data_disk(tmp_path)
    assert imaging("validate", img, "--json", env=env).returncode == 2
    res = imaging("validate", img, "--data-disk", env=env)
    assert res.returncode == 0
    assert "INFO    Guest.OsUnknown:" in res.stdout and "layout:      disk (mbr)" in res.stdout


def test_human_output_names_layout_os_boot_mode_and_remediation(tmp_path: Path, env: dict[str, str]) -> None:
    res = imaging("validate", gf.uefi_disk(tmp_path, fallback=False), env=env)
    assert res.returncode == 2
    out = res.stdout
    assert "layout:      disk (gpt)" in out and "Debian GNU/Linux 12" in out and "boot mode:   none" in out
    assert "ERROR   Guest.UefiNoFallbackLoader:" in out and "grub-install --removable" in out


def test_missing_file_is_a_usage_error(tmp_path: Path, env: dict[str, str]) -> None:
    res = imaging("validate", tmp_path / "absent.img", env=env)
    assert res.returncode == 1 and "InvalidParameterValue" in res.stderr


def test_dry_run_plan_of_convert_image_shows_the_guest_verdict_before_anything_runs(
    tmp_path: Path, env: dict[str, str]
) -> None:
    broken = gf.qcow2_of(
        gf.linux_disk(tmp_path, "broken.img", fstab="UUID=0bad / ext4 defaults 0 1\n"),
        tmp_path / "broken.qcow2",
    )
    good = gf.qcow2_of(gf.linux_disk(tmp_path), tmp_path / "good.qcow2")
    target = tmp_path / "out.raw"

    r = imaging(
        "run",
        "convert-image",
        "-p",
        f"source={broken}",
        "-p",
        f"target={target}",
        "-p",
        "validate_guest=system",
        "--dry-run",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "verdict: would fail" in r.stdout
    assert "Guest.FstabDeviceMissing" in r.stdout
    assert not target.exists()

    r = imaging(
        "run",
        "convert-image",
        "-p",
        f"source={good}",
        "-p",
        f"target={target}",
        "-p",
        "validate_guest=system",
        "--dry-run",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "verdict: would pass" in r.stdout

    # the real run stops at the same finding, before inspection or conversion wrote anything
    r = imaging(
        "run",
        "convert-image",
        "-p",
        f"source={broken}",
        "-p",
        f"target={target}",
        "-p",
        "validate_guest=system",
        env=env,
    )
    assert r.returncode == 2
    assert "Guest.FstabDeviceMissing" in r.stderr
    assert not target.exists()


def test_guest_findings_of_convert_image_survive_the_inspection_after_them(
    tmp_path: Path, env: dict[str, str]
) -> None:
    disk = gf.qcow2_of(gf.linux_disk(tmp_path, fstab="/dev/sda1 / ext4 defaults 0 1\n"), tmp_path / "d.qcow2")
    r = imaging(
        "run",
        "convert-image",
        "-p",
        f"source={disk}",
        "-p",
        f"target={tmp_path / 'o.raw'}",
        "-p",
        "validate_guest=system",
        "--json",
        "--progress",
        "none",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    task = json.loads(r.stdout)
    assert task["state"] == "completed"
    assert [f["code"] for f in task["findings"]] == ["Guest.FstabDeviceName"]
