"""``imaging validate`` as a user runs it: a real process, real images, exit 0 / 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance.cli.main import main
from appliance.guest import validate_image
from tests import guestfactory as gf
from tests import imagefactory as imf

#: containers of a bare filesystem: name → (qemu-img output format, options, what inspection calls it)
CONTAINERS = {
    "qcow2": ("qcow2", None, "qcow2"),
    "vmdk-sparse": ("vmdk", "subformat=monolithicSparse", "vmdk"),
    "vmdk-stream": ("vmdk", "subformat=streamOptimized", "vmdk"),
    "vhd-dynamic": ("vpc", "subformat=dynamic,force_size=on", "vhd"),
    "vhd-fixed": ("vpc", "subformat=fixed,force_size=on", "vhd"),
    "vhdx": ("vhdx", None, "vhdx"),
    "vdi": ("vdi", None, "vdi"),
}
#: container → the format inspection detects in it
DETECTED = {"raw": "raw", **{name: fmt for name, (_, _, fmt) in CONTAINERS.items()}}
BARE = ("ext2", "ntfs")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("IMAGING_CONFIG", None)
    e["XDG_STATE_HOME"] = str(tmp_path / "state")
    return e


def imaging(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "appliance.cli", *map(str, args)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(filesystem, container) → a bare ext2 or NTFS filesystem holding a Linux root, as ``raw`` and in
    every container."""
    d = tmp_path_factory.mktemp("bare")
    tree = gf.portable_root(d / "root")
    images: dict[tuple[str, str], Path] = {}
    for kind in BARE:
        raw = images[kind, "raw"] = gf.filesystem(kind, d / f"{kind}.raw", tree)
        for name, (qemu_format, options, _) in CONTAINERS.items():
            images[kind, name] = gf.convert(raw, d / f"{kind}.{name}", qemu_format, options)
    return images


@pytest.fixture
def in_process(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``main()`` in this process sees the same environment as :func:`imaging`'s child."""
    monkeypatch.delenv("IMAGING_CONFIG", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", env["XDG_STATE_HOME"])


def validate_json(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, dict, str]:
    """``imaging validate --json ARGS`` run by ``main()`` here: (exit status, report, stderr)."""
    status = main(["validate", "--json", *map(str, args)])
    out, err = capsys.readouterr()
    return status, (json.loads(out) if out else {}), err


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


@pytest.mark.parametrize("container", list(DETECTED))
@pytest.mark.parametrize("kind", BARE)
@pytest.mark.usefixtures("in_process")
def test_validate_reads_a_bare_filesystem_in_any_container_without_being_told_the_format(
    kind: str, container: str, bare: dict[tuple[str, str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    expected = validate_image(bare[kind, "raw"], "raw").to_dict()
    assert expected["layout"] == "partition" and expected["partitions"][0]["filesystem"] == kind  # control
    status, report, err = validate_json(capsys, bare[kind, container])
    assert (status, err) == (0, "")
    # what was detected, and so read
    assert (report.pop("format"), report.pop("compression")) == (DETECTED[container], None)
    assert report == expected
    assert "Guest.NoFilesystem" not in {f["code"] for f in report["findings"]}


@pytest.mark.usefixtures("in_process")
def test_validate_reports_the_format_it_read_in_its_summary(
    bare: dict[tuple[str, str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(bare["ntfs", "vhd-fixed"])]) == 0
    out = capsys.readouterr().out
    assert "  format:      vhd\n" in out and "layout:      partition" in out


@pytest.mark.parametrize(
    ("claim", "container"), [("vhd", "vhd-fixed"), ("VMDK", "vmdk-stream"), ("vpc", "vhd-dynamic")]
)
@pytest.mark.usefixtures("in_process")
def test_a_format_given_that_matches_the_content_is_accepted(
    claim: str, container: str, bare: dict[tuple[str, str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, report, _ = validate_json(capsys, bare["ntfs", container], "-f", claim)
    assert status == 0 and report["layout"] == "partition" and report["partitions"][0]["filesystem"] == "ntfs"


def test_a_given_format_is_a_claim_checked_against_the_content_like_inspect(
    bare: dict[tuple[str, str], Path], env: dict[str, str]
) -> None:
    # before, -f raw (the old default) read the qcow2 container as a disk and found no filesystem
    res = imaging("validate", bare["ntfs", "qcow2"], "-f", "raw", "--data-disk", env=env)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("imaging: FormatMismatch: claimed raw, detected qcow2"), res.stderr
    res = imaging("validate", bare["ext2", "vmdk-stream"], "-f", "qcow2", env=env)
    assert res.returncode == 2 and "imaging: FormatMismatch: claimed qcow2, detected vmdk" in res.stderr


@pytest.mark.usefixtures("in_process")
def test_an_unsafe_image_is_rejected_with_its_inspection_code_and_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report, err = validate_json(capsys, imf.qcow2_backing(tmp_path))
    assert (status, report) == (2, {})
    assert err.startswith("imaging: UnsafeImage.BackingFile: "), err
    status, report, err = validate_json(capsys, imf.iso_qcow2_polyglot(tmp_path))
    assert (status, report) == (2, {}) and err.startswith("imaging: UnsafeImage.Polyglot: "), err


@pytest.mark.parametrize(
    ("container", "compression"), [("raw", "gzip"), ("qcow2", "xz"), ("vhd-fixed", "zstd")]
)
def test_compressed_input_is_decompressed_into_scratch_as_inspect_does(
    container: str, compression: str, bare: dict[tuple[str, str], Path], env: dict[str, str], tmp_path: Path
) -> None:
    packed = imf.compress(bare["ntfs", container], compression, name=f"upload.{container}.{compression}")
    expected = validate_image(bare["ntfs", "raw"], "raw").to_dict()
    res = imaging("validate", packed, "--json", env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert (report.pop("format"), report.pop("compression")) == (
        DETECTED[container],
        compression,
    )
    assert report == expected
    # a claim names the compression too, as for inspect; a wrong one is a mismatch
    suffix = {"gzip": "gz", "xz": "xz", "zstd": "zst"}[compression]
    claim = DETECTED[container]
    assert imaging("validate", packed, "-f", f"{claim}.{suffix}", env=env).returncode == 0
    res = imaging("validate", packed, "-f", claim, env=env)
    assert res.returncode == 0, res.stderr  # a claim without a suffix accepts a compressed file
    res = imaging("validate", packed, "-f", f"{claim}.bz2", env=env)
    assert res.returncode == 2 and "imaging: FormatMismatch:" in res.stderr
    # decompressed into the scratch of the state directory, and nothing of it is left behind
    scratch = tmp_path / "state" / "imaging" / "scratch"
    # (the root's accounting, its lock and its high-water mark of reserved bytes, is not a leftover)
    left = [p for p in scratch.rglob("*") if p.is_file() and p.stat().st_size and p.name != ".peak.json"]
    assert scratch.is_dir() and not left and (scratch / ".peak.json").is_file()


@contextmanager
def read_only_loop(image: Path) -> Iterator[Path]:
    """A read-only loop device over ``image``; always detached afterwards."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    proc = subprocess.run(["losetup", "--show", "-r", "-f", str(image)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {proc.stderr.strip()}")
    dev = Path(proc.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


@pytest.mark.usefixtures("in_process")
def test_a_block_device_is_read_as_raw_unless_told_otherwise(
    bare: dict[tuple[str, str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # inspection reads files only: a device holds its disk as it is
    with read_only_loop(bare["ntfs", "raw"]) as dev:
        status, report, err = validate_json(capsys, dev)
        assert (status, err) == (0, "")
        assert (report.pop("format"), report.pop("compression")) == ("raw", None)
        assert report == validate_image(bare["ntfs", "raw"], "raw").to_dict()
        assert main(["validate", str(dev), "-f", "raw.gz"]) == 1
        assert "without a compression suffix" in capsys.readouterr().err
    with read_only_loop(bare["ntfs", "qcow2"]) as dev:
        status, report, _ = validate_json(capsys, dev, "-f", "qcow2")
        assert status == 0 and report["format"] == "qcow2" and report["partitions"][0]["filesystem"] == "ntfs"
