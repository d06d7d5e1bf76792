"""`imaging export` and `imaging convert` of an OVA, as a user runs them: a real process, real qemu-img."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.store import Store, TaskState
from tests import imagefactory as imgs
from tests import stores

MiB = 1024 * 1024


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("IMAGING_CONFIG", None)
    e["XDG_STATE_HOME"] = str(tmp_path / "state")
    return e


def imaging(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def disk(path: Path, size: int, marker: bytes) -> Path:
    with open(path, "wb") as f:
        f.write(marker.ljust(4096, b"."))
        f.truncate(size)
    return path


def test_export_then_convert_an_ova_round_trips_two_disks(tmp_path: Path, env: dict[str, str]) -> None:
    boot, data = (
        disk(tmp_path / "boot.raw", 8 * MiB, b"boot disk"),
        disk(tmp_path / "data.raw", 4 * MiB, b"data"),
    )
    ova = tmp_path / "vm.ova"
    res = imaging("export", boot, ova, "--to", "ova", "--disk", data, "--firmware", "efi", "--json", env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["format"] == "ova" and [d["virtual_size"] for d in out["disks"]] == [8 * MiB, 4 * MiB]
    with tarfile.open(ova) as tar:
        assert tar.getnames() == ["vm.ovf", "vm.mf", "vm-disk1.vmdk", "vm-disk2.vmdk"]
    res = imaging("convert", ova, tmp_path / "back.raw", "--to", "raw", "--json", env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["ova"]["firmware"] == "efi" and got["ova"]["manifest_verified"] is True
    assert (tmp_path / "back.raw").read_bytes() == boot.read_bytes()
    assert (tmp_path / "back-disk2.raw").read_bytes() == data.read_bytes()


def test_export_vmdk_is_stream_optimized(tmp_path: Path, env: dict[str, str]) -> None:
    src = disk(tmp_path / "d.raw", 6 * MiB, b"some data")
    res = imaging("export", src, tmp_path / "d.vmdk", "--to", "vmdk", env=env)
    assert res.returncode == 0, res.stderr
    info = json.loads(
        subprocess.run(
            [imgs.QEMU_IMG, "info", "-f", "vmdk", "--output=json", str(tmp_path / "d.vmdk")],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"


def test_a_hostile_ova_is_rejected_with_exit_2_and_writes_nothing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    ova = tmp_path / "evil.ova"
    with tarfile.open(ova, "w") as tar:
        ti = tarfile.TarInfo("vm.ovf")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(ti)
    res = imaging("convert", ova, tmp_path / "out.raw", "--to", "raw", "--from", "ova", env=env)
    assert res.returncode == 2 and "Ova.UnsafeMember" in res.stderr
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["evil.ova", "state"]
        or not (tmp_path / "out.raw").exists()
    )


def test_imaging_run_convert_ova_converts_every_disk(tmp_path: Path, env: dict[str, str]) -> None:
    boot, data = disk(tmp_path / "boot.raw", 4 * MiB, b"boot"), disk(tmp_path / "data.raw", 2 * MiB, b"data")
    ova = tmp_path / "vm.ova"
    assert imaging("export", boot, ova, "--to", "ova", "--disk", data, env=env).returncode == 0
    res = imaging(
        "run",
        "convert-ova",
        "-p",
        f"source={ova}",
        "-p",
        f"target={tmp_path / 'vm.qcow2'}",
        "-p",
        "format=qcow2",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    for src, out in ((boot, "vm.qcow2"), (data, "vm-disk2.qcow2")):
        cmp = subprocess.run(
            [imgs.QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", str(src), str(tmp_path / out)]
        )
        assert cmp.returncode == 0


def test_export_of_a_volume_id_the_appliance_issued_reads_that_volume(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # a completed ImportVolume as the import-volume workflow records it (its ``volume`` step's result):
    # `imaging export vol-…` finds the file volume through the task store (the resolver) and exports it
    volume_id = "vol-0123456789abcdef0"
    volume = disk(tmp_path / f"{volume_id}.raw", 6 * MiB, b"the imported volume")
    settings = stores.with_store({"state_dir": str(tmp_path / "state")})
    config_file = tmp_path / "imaging.yaml"
    config_file.write_text(json.dumps(settings))
    store = Store(config_mod.from_dict(settings, base_dir=tmp_path).store)
    try:
        store.create_task("import-volume", "import-volume", {}, task_id="import-vol-0badc0de")
        store.claim("import-vol-0badc0de", "test-worker", 30)
        result = {"volume": {"id": volume_id, "type": "file", "path": str(volume), "size": 6 * MiB}}
        store.set_state("import-vol-0badc0de", TaskState.COMPLETED, result=result)
    finally:
        store.close()
    env = dict(env, IMAGING_CONFIG=str(config_file))
    out = tmp_path / "exported.vmdk"
    res = imaging("export", volume_id, out, "--to", "vmdk", "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["virtual_size"] == 6 * MiB
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "vmdk", str(volume), str(out)],
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    # a volume id the appliance never issued: EC2's code, nothing written
    res = imaging("export", "vol-0123456789abcdef1", tmp_path / "none.vmdk", "--to", "vmdk", env=env)
    assert res.returncode != 0 and "InvalidVolume.NotFound" in res.stderr, res.stderr
    assert not (tmp_path / "none.vmdk").exists()
