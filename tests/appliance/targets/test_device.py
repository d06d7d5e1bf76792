"""Device target against real loop devices (our own, detached in ``finally``) and the real mount table."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance import config
from appliance.errors import UsageError
from appliance.targets import TargetError, get_volume_target, write_raw
from appliance.targets.device import (
    DeviceVolumeTarget,
    inspect_block_device,
    parse_mountinfo,
    read_mounts,
    root_disks,
)
from tests.loopdevs import attached

MiB = 1024 * 1024


@contextmanager
def loop_device(backing: Path, size: int, fill: bytes = b"\0") -> Iterator[Path]:
    """A loop device over a new ``size``-byte file filled with ``fill``; always detached afterwards."""
    with open(backing, "wb") as f:
        if fill == b"\0":
            f.truncate(size)
        else:
            f.write(fill * size)
    with attached(backing) as dev:
        yield dev


@contextmanager
def mounted(source: str, where: Path, *args: str) -> Iterator[None]:
    """Mount ``source`` on ``where`` (skip the test if mounting is not allowed); unmount afterwards."""
    where.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", *args, source, str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(where)], check=False)


def sparse_source(path: Path, size: int, chunks: dict[int, bytes]) -> bytes:
    """A sparse RAW file with ``chunks`` at their offsets; returns its full content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks.items():
            f.seek(off)
            f.write(data)
    return path.read_bytes()


def test_refuses_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "disk.raw"
    f.write_bytes(b"x" * 4096)
    with pytest.raises(TargetError) as exc:
        DeviceVolumeTarget().create("import-vol-abcd1234", 4096, device=str(f))
    assert exc.value.code == "InvalidTarget.NotBlockDevice"


def test_refuses_character_device() -> None:
    with pytest.raises(TargetError) as exc:
        inspect_block_device("/dev/null", 1)
    assert exc.value.code == "InvalidTarget.NotBlockDevice"


def test_refuses_missing_device(tmp_path: Path) -> None:
    with pytest.raises(TargetError) as exc:
        inspect_block_device(tmp_path / "nope", 1)
    assert exc.value.code == "InvalidTarget.NotFound"


def test_create_without_device_is_usage_error() -> None:
    with pytest.raises(UsageError):
        DeviceVolumeTarget().create("import-vol-abcd1234", MiB)


def test_refuses_device_smaller_than_image(tmp_path: Path) -> None:
    with loop_device(tmp_path / "b.img", 4 * MiB) as dev:
        with pytest.raises(TargetError) as exc:
            DeviceVolumeTarget().create("import-vol-abcd1234", 4 * MiB + 1, device=str(dev))
        assert exc.value.code == "InvalidTarget.TooSmall"
        # exactly the size is fine
        assert DeviceVolumeTarget().create("import-vol-abcd1234", 4 * MiB, device=str(dev)).size == 4 * MiB


def test_refuses_mounted_device(tmp_path: Path) -> None:
    with loop_device(tmp_path / "b.img", 8 * MiB) as dev:
        subprocess.run(["mkfs.ext4", "-q", str(dev)], check=True)
        with mounted(str(dev), tmp_path / "mnt"):
            with pytest.raises(TargetError) as exc:
                inspect_block_device(dev, MiB)
            assert exc.value.code == "InvalidTarget.InUse"
            assert "mounted on" in exc.value.message and str(tmp_path / "mnt") in exc.value.message
        # unmounted again: accepted
        assert inspect_block_device(dev, MiB).size == 8 * MiB


def test_refuses_root_disk() -> None:
    mounts = read_mounts()
    roots = root_disks(mounts)
    if not roots:
        pytest.skip("the root filesystem is not on a block device here")
    disk = sorted(roots)[0]
    node = Path("/dev") / disk.name
    if not node.exists():
        pytest.skip(f"no device node for the root disk {disk.name}")
    # Only inspected (the root check comes before any open): nothing is written.
    with pytest.raises(TargetError) as exc:
        inspect_block_device(node, 1)
    assert exc.value.code == "InvalidTarget.RootDisk"


def test_mountinfo_parsing_handles_escaped_mount_points(tmp_path: Path) -> None:
    where = tmp_path / "with space"
    with mounted("tmpfs", where, "-t", "tmpfs", "-o", "size=1m"):
        entries = read_mounts()
        assert any(e.mount_point == str(where) and e.fstype == "tmpfs" for e in entries)
    text = Path("/proc/self/mountinfo").read_text()
    assert len(parse_mountinfo(text)) == len(text.splitlines())
    assert any(e.mount_point == "/" for e in parse_mountinfo(text))


def test_holders_make_device_in_use(tmp_path: Path) -> None:
    """device-mapper is not available in this kernel, so a holder is laid out as sysfs shows one
    (``/sys/dev/block/M:m`` → ``…/block/NAME`` with ``dev`` and ``holders/dm-0``) over a real loop device."""
    with loop_device(tmp_path / "b.img", 4 * MiB) as dev:
        st = os.stat(dev)
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        fake_sys = tmp_path / "sys"
        block = fake_sys / "devices" / "virtual" / "block" / dev.name
        (block / "holders" / "dm-0").mkdir(parents=True)
        (block / "dev").write_text(f"{major}:{minor}\n")
        (fake_sys / "dev" / "block").mkdir(parents=True)
        (fake_sys / "dev" / "block" / f"{major}:{minor}").symlink_to(block)
        with pytest.raises(TargetError) as exc:
            inspect_block_device(dev, MiB, sys_root=fake_sys)
        assert exc.value.code == "InvalidTarget.InUse" and "dm-0" in exc.value.message
        # the real sysfs shows no holders for our loop device
        assert inspect_block_device(dev, MiB).name == dev.name


def test_writes_through_zeroing_stale_data_and_finalizes(tmp_path: Path) -> None:
    size = 8 * MiB
    src = tmp_path / "image.raw"
    expected = sparse_source(src, 6 * MiB, {0: os.urandom(MiB), 5 * MiB: b"tail" * 1024})
    # The device holds stale 0xFF bytes: the holes of the image must come out as zeros.
    with loop_device(tmp_path / "b.img", size, fill=b"\xff") as dev:
        cfg = config.from_dict(
            {"state_dir": str(tmp_path), "targets": {"volume": {"type": "device", "path": str(dev)}}}
        )
        target = get_volume_target(cfg)
        volume = target.create("import-vol-abcd1234", 6 * MiB)
        assert volume.path == dev and volume.size == size and volume.info["zeroed"] is False
        seen = []
        assert write_raw(volume, src, on_progress=seen.append) == 6 * MiB
        assert seen[-1].done == 6 * MiB and seen[-1].phase == "writing"
        result = target.finalize(volume)
        assert result == {"type": "device", "volume_id": volume.id, "path": str(dev), "size": size}
        with open(dev, "rb") as f:
            written = f.read(6 * MiB)
            rest = f.read()
        assert hashlib.sha256(written).digest() == hashlib.sha256(expected).digest()
        assert rest == b"\xff" * (size - 6 * MiB)  # beyond the image: untouched
        again = target.reopen(volume.info)
        assert again.path == dev and again.id == volume.id
        target.delete(volume.info)  # the device is the controller's: nothing to undo, no error
        assert dev.exists()


def test_settings_errors_name_the_key(tmp_path: Path) -> None:
    cfg = config.from_dict(
        {"state_dir": str(tmp_path), "targets": {"volume": {"type": "device", "path": "dev/vdb"}}}
    )
    with pytest.raises(Exception) as exc:
        get_volume_target(cfg)
    assert exc.value.code == "InvalidConfiguration" and "targets.volume.path" in exc.value.message
