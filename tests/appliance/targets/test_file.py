"""File targets: sparse volume files and atomically stored image files, on real filesystems."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config
from appliance.errors import Cancelled, ConfigError, LeaseLost, UsageError
from appliance.targets import (
    InsufficientStorage,
    TargetError,
    get_image_target,
    get_volume_target,
    write_raw,
)
from appliance.targets.encryption import Encryption, EncryptionNotSupported
from appliance.targets.file import FileImageTarget, FileVolumeTarget

MiB = 1024 * 1024
TASK = "import-vol-abcd1234"


def make_config(tmp_path: Path, volume: dict | None = None, image: dict | None = None) -> config.Config:
    targets = {
        "volume": volume or {"type": "file", "min_free": 0},
        "image": image or {"type": "file", "min_free": 0},
    }
    return config.from_dict({"state_dir": str(tmp_path / "state"), "targets": targets})


def sparse_source(path: Path, size: int, chunks: dict[int, bytes]) -> bytes:
    """A sparse RAW file with ``chunks`` at their offsets; returns its full content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks.items():
            f.seek(off)
            f.write(data)
    return path.read_bytes()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (unmounted afterwards); skipped where mounting is not allowed."""
    where = tmp_path / "tiny"
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_volume_is_private_sparse_file_of_full_size(tmp_path: Path) -> None:
    target = get_volume_target(make_config(tmp_path))
    volume = target.create(TASK, 64 * MiB)
    directory = tmp_path / "state" / "volumes"
    assert re.fullmatch(r"vol-[0-9a-f]{17}", volume.id)
    assert volume.path == directory / f"{volume.id}.raw" and volume.size == 64 * MiB
    st = volume.path.stat()
    assert st.st_size == 64 * MiB and st.st_blocks * 512 < MiB  # nothing allocated yet
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert json.loads(json.dumps(volume.info)) == volume.info
    assert volume.info["zeroed"] is True and volume.info["type"] == "file"
    assert target.describe()["directory"] == str(directory)


def test_write_finalize_reopen_delete(tmp_path: Path) -> None:
    target = get_volume_target(make_config(tmp_path))
    volume = target.create(TASK, 32 * MiB)
    src = tmp_path / "image.raw"
    expected = sparse_source(src, 20 * MiB, {0: os.urandom(MiB), 12 * MiB: b"\x01" * 4096})
    progress = []
    assert write_raw(volume, src, on_progress=progress.append) == 20 * MiB
    assert progress[-1].done == 20 * MiB and progress[-1].percent == 100.0
    result = target.finalize(volume)
    assert result["volume_id"] == volume.id and result["size"] == 32 * MiB
    assert result["allocated"] < 4 * MiB  # holes stayed holes
    content = volume.path.read_bytes()
    assert content[: 20 * MiB] == expected and content[20 * MiB :] == bytes(12 * MiB)

    # after a worker restart: a new target object finds the same file from the stored info
    again = get_volume_target(make_config(tmp_path)).reopen(json.loads(json.dumps(volume.info)))
    assert again.path == volume.path and again.id == volume.id and again.size == 32 * MiB

    target.delete(volume.info)
    assert not volume.path.exists()
    target.delete(volume.info)  # already gone: fine
    with pytest.raises(TargetError) as exc:
        target.reopen(volume.info)
    assert exc.value.code == "InvalidVolume.NotFound"


def test_rewrite_after_reopen_zeroes_stale_data(tmp_path: Path) -> None:
    target = get_volume_target(make_config(tmp_path))
    volume = target.create(TASK, 8 * MiB)
    volume.path.write_bytes(b"\xee" * (8 * MiB))  # an earlier, interrupted write
    again = target.reopen(volume.info)
    assert again.info["zeroed"] is False
    src = tmp_path / "image.raw"
    expected = sparse_source(src, 8 * MiB, {3 * MiB: b"data" * 256})
    write_raw(again, src)
    assert volume.path.read_bytes() == expected


def test_a_create_run_again_with_its_client_token_takes_the_same_file_again_emptied(tmp_path: Path) -> None:
    # The import step's create was killed after the file existed and before the step recorded it: the
    # create run again with the same token must not leave that file behind.
    target = get_volume_target(make_config(tmp_path))
    first = target.create(TASK, 8 * MiB, client_token=f"{TASK}/2")
    first.path.write_bytes(b"\xee" * MiB)  # whatever the killed process left (nothing, normally)
    again = target.create(TASK, 16 * MiB, client_token=f"{TASK}/2")
    assert again.id == first.id and again.path == first.path and again.info["zeroed"] is True
    assert again.path.stat().st_size == 16 * MiB and again.path.stat().st_blocks == 0
    other = target.create(TASK, 8 * MiB, client_token=f"{TASK}/5")  # another step's volume
    untokened = target.create(TASK, 8 * MiB)
    assert len({again.path, other.path, untokened.path}) == 3
    assert sorted(p.name for p in again.path.parent.iterdir()) == sorted(
        p.name for p in (again.path, other.path, untokened.path)
    )


def test_write_refuses_image_larger_than_volume(tmp_path: Path) -> None:
    volume = get_volume_target(make_config(tmp_path)).create(TASK, MiB)
    src = tmp_path / "image.raw"
    sparse_source(src, MiB + 512, {})
    with pytest.raises(UsageError):
        write_raw(volume, src)


def test_create_refuses_below_free_space_floor(tmp_path: Path) -> None:
    target = get_volume_target(make_config(tmp_path, volume={"type": "file", "min_free": "1PiB"}))
    with pytest.raises(InsufficientStorage) as exc:
        target.create(TASK, MiB)
    assert exc.value.code == "InsufficientStorage" and "targets.volume.min_free" in exc.value.message
    assert list((tmp_path / "state" / "volumes").iterdir()) == []


def test_full_filesystem_while_writing_is_insufficient_storage(tmp_path: Path, tiny_tmpfs: Path) -> None:
    target = FileVolumeTarget(tiny_tmpfs / "volumes", min_free=0)
    volume = target.create(TASK, 8 * MiB)  # sparse: fits, until written
    src = tmp_path / "image.raw"
    sparse_source(src, 4 * MiB, {0: os.urandom(3 * MiB)})
    with pytest.raises(InsufficientStorage) as exc:
        write_raw(volume, src)
    assert exc.value.code == "InsufficientStorage" and volume.id in exc.value.message


def test_settings_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        get_volume_target(make_config(tmp_path, volume={"type": "file", "min_free": "lots"}))
    assert "targets.volume.min_free" in exc.value.message
    with pytest.raises(ConfigError) as exc:
        get_image_target(make_config(tmp_path, image={"type": "file", "directroy": "x"}))
    assert "targets.image" in exc.value.message and "directroy" in exc.value.message


# -- image target ---------------------------------------------------------------------------------


def test_store_copies_sparse_file_atomically_with_sha256(tmp_path: Path) -> None:
    target = get_image_target(make_config(tmp_path))
    src = tmp_path / "out.qcow2"
    expected = sparse_source(src, 40 * MiB, {0: os.urandom(2 * MiB), 30 * MiB: os.urandom(MiB)})
    progress = []
    loc = target.store("import-ami-0123456789abcdef0", src, format="qcow2", on_progress=progress.append)
    final = tmp_path / "state" / "images" / "import-ami-0123456789abcdef0.qcow2"
    assert loc == {
        "type": "file",
        "path": str(final),
        "format": "qcow2",
        "size": 40 * MiB,
        "sha256": hashlib.sha256(expected).hexdigest(),
        "encryption": None,
    }
    assert final.read_bytes() == expected
    st = final.stat()
    assert st.st_blocks * 512 < 8 * MiB  # 3 MiB of data, not 40
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temporary left
    assert progress[-1].done == 40 * MiB

    target.delete(loc)
    assert not final.exists()
    target.delete(loc)  # already gone: fine


def test_store_writes_a_private_partial_named_in_the_ledger_before_it_exists(tmp_path: Path) -> None:
    target = FileImageTarget(tmp_path / "images", min_free=0)
    src = tmp_path / "in.raw"
    sparse_source(src, 16 * MiB, {0: os.urandom(9 * MiB)})
    announced: list[tuple[str, str, bool]] = []
    seen: list[tuple[str, int]] = []

    class Ledger:
        def ledger_created(self, resource: str | Path) -> None:
            announced.append(("created", str(resource), os.path.lexists(resource)))

        def ledger_removed(self, resource: str | Path) -> None:
            announced.append(("removed", str(resource), os.path.lexists(resource)))

    def on_progress(p: object) -> None:
        seen.extend((e.name, stat.S_IMODE(e.lstat().st_mode)) for e in (tmp_path / "images").iterdir())

    loc = target.store("t-0", src, format="raw", on_progress=on_progress, ledger=Ledger())
    [(created, partial, existed), (removed, gone, exists_after)] = announced
    assert (created, removed, gone, existed, exists_after) == ("created", "removed", partial, False, False)
    assert Path(partial).name.startswith(".t-0.raw.partial-")
    assert (Path(partial).name, 0o600) in seen and all(mode == 0o600 for _, mode in seen)
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["t-0.raw"]
    assert stat.S_IMODE(Path(loc["path"]).stat().st_mode) == 0o600


def test_file_image_target_refuses_to_store_an_image_encrypted_and_writes_nothing(tmp_path: Path) -> None:
    target = FileImageTarget(tmp_path / "images", min_free=0)
    src = tmp_path / "in.raw"
    sparse_source(src, MiB, {0: os.urandom(MiB)})
    assert target.sse_algorithms == frozenset()
    with pytest.raises(EncryptionNotSupported) as exc:
        target.store("t-0", src, format="raw", encryption=Encryption("AES256"))
    assert "file image target" in exc.value.message and "s3 image target" in exc.value.message
    assert not (tmp_path / "images").exists() or list((tmp_path / "images").iterdir()) == []


def test_store_keeps_trailing_hole_and_zero_chunks_exact(tmp_path: Path) -> None:
    target = FileImageTarget(tmp_path / "images", min_free=0)
    src = tmp_path / "in.raw"
    # a data extent made of zeros (written, not a hole) followed by a trailing hole
    expected = sparse_source(src, 16 * MiB, {MiB: bytes(5 * MiB), 7 * MiB: b"z"})
    loc = target.store("t-1", src, format="raw")
    assert Path(loc["path"]).read_bytes() == expected
    assert loc["sha256"] == hashlib.sha256(expected).hexdigest()


def test_store_cancel_midway_leaves_nothing(tmp_path: Path) -> None:
    target = FileImageTarget(tmp_path / "images", min_free=0)
    src = tmp_path / "big.raw"
    sparse_source(src, 16 * MiB, {0: os.urandom(16 * MiB)})
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        # the first progress report arrives after the first chunk: cancel there
        target.store("t-2", src, format="raw", on_progress=lambda p: cancel.set(), cancel=cancel)
    assert list((tmp_path / "images").iterdir()) == []


def test_store_refuses_when_data_would_not_fit(tmp_path: Path, tiny_tmpfs: Path) -> None:
    target = FileImageTarget(tiny_tmpfs / "images", min_free=0)
    src = tmp_path / "in.raw"
    sparse_source(src, 4 * MiB, {0: os.urandom(2 * MiB)})
    with pytest.raises(InsufficientStorage):
        target.store("t-3", src, format="raw")
    assert list((tiny_tmpfs / "images").iterdir()) == []


def test_delete_refuses_paths_outside_the_directory(tmp_path: Path) -> None:
    target = FileImageTarget(tmp_path / "images", min_free=0)
    victim = tmp_path / "precious"
    victim.write_text("keep")
    with pytest.raises(UsageError):
        target.delete({"type": "file", "path": str(victim)})
    assert victim.exists()


def test_store_rejects_unknown_format(tmp_path: Path) -> None:
    src = tmp_path / "in.raw"
    src.write_bytes(b"x")
    with pytest.raises(UsageError):
        FileImageTarget(tmp_path / "images", min_free=0).store("t-4", src, format="floppy")


def test_an_image_whose_run_lost_its_lease_is_not_published(tmp_path: Path) -> None:
    target = FileImageTarget(tmp_path / "images", min_free=0)
    src = tmp_path / "in.raw"
    sparse_source(src, MiB, {0: os.urandom(MiB)})

    def fence() -> None:
        raise LeaseLost("task t-0: another worker owns it now")

    with pytest.raises(LeaseLost):
        target.store("t-0", src, format="raw", fence=fence)
    assert list((tmp_path / "images").iterdir()) == []  # neither the image nor its partial
