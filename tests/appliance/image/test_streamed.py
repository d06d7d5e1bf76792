"""StreamDecode: the confined decoder child fed by this process, its records written by this process.

Real parts: qemu-img makes the images and compares the output, the decoder runs as the confined child,
the target is a loop device filled with stale bytes (zero ranges must be zeroed) or a file.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.errors import ImageRejected, ImagingError
from appliance.image.decoding import Boundary
from appliance.image.streamed import StreamDecode
from appliance.targets.base import storage_error
from appliance.targets.rawio import RawWriter
from tests import imagefactory as imgs
from tests.loopdevs import attached

MiB = 1 << 20
LIMITS = config_mod.from_dict({}).limits


@contextlib.contextmanager
def loop_device(backing: Path, size: int, fill: bytes) -> Iterator[Path]:
    backing.write_bytes(fill * size)
    with attached(backing) as dev:
        yield dev


def stream_vmdk(directory: Path, mib: int = 16, data_mib: int = 3) -> tuple[Path, Path]:
    raw = imgs.raw_mbr(directory, "disk.raw", size=mib * MiB)
    rng = random.Random(3)
    with open(raw, "r+b") as f:
        f.seek(MiB)
        f.write(rng.randbytes(data_mib * MiB))
        f.seek(9 * MiB)
        f.write(rng.randbytes(MiB))
    vmdk = directory / "disk.vmdk"
    imgs.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, vmdk)
    return raw, vmdk


def decode(
    fmt: str,
    data: bytes,
    out: RawWriter,
    capacity: int,
    boundaries: list[Boundary] | None = None,
    max_virtual_size: int | None = None,
) -> int:
    with StreamDecode(
        fmt,
        out,
        capacity=capacity,
        limits=LIMITS,
        max_virtual_size=max_virtual_size or capacity,
        max_decompressed_size=capacity,
        boundary_every=MiB,
        on_boundary=(lambda b, _n: boundaries.append(b)) if boundaries is not None else None,
    ) as stream:
        for at in range(0, len(data), 300_000):
            stream.feed(data[at : at + 300_000])
        return stream.finish().virtual_size


def test_a_stream_vmdk_onto_a_loop_device_of_stale_bytes_equals_the_source(tmp_path: Path) -> None:
    raw, vmdk = stream_vmdk(tmp_path)
    size = raw.stat().st_size
    with loop_device(tmp_path / "backing.img", size, b"\xa5") as dev:
        with RawWriter(dev, zeroed=False, error=lambda e: storage_error(e, str(dev))) as out:
            assert decode("vmdk-stream", vmdk.read_bytes(), out, size) == size
            out.flush()
        cmp = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), str(dev)],
            capture_output=True,
            text=True,
        )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr  # the holes were zeroed, not left stale


def test_a_write_past_the_target_is_refused_by_this_process(tmp_path: Path) -> None:
    _raw, vmdk = stream_vmdk(tmp_path)
    target = tmp_path / "small.raw"
    with open(target, "wb") as f:
        f.truncate(2 * MiB)
    with RawWriter(target, zeroed=True, error=lambda e: None) as out, pytest.raises(ImagingError) as caught:
        # the child's own limit allows the disk: this process's bound on the records stops it
        decode("vmdk-stream", vmdk.read_bytes(), out, 2 * MiB, max_virtual_size=LIMITS.max_virtual_size)
    assert "outside the target" in caught.value.message
    assert target.stat().st_size == 2 * MiB


def test_a_truncated_stream_vmdk_is_corrupt_image_from_the_confined_child(tmp_path: Path) -> None:
    raw, vmdk = stream_vmdk(tmp_path)
    data = vmdk.read_bytes()
    cut = len(data) // 2 + 100  # inside a grain
    target = tmp_path / "out.raw"
    target.touch()
    with RawWriter(target, zeroed=True, error=lambda e: None) as out, pytest.raises(ImageRejected) as caught:
        decode("vmdk-stream", data[:cut] + b"\x01" * 700, out, raw.stat().st_size)
    assert caught.value.code == "CorruptImage"
    assert "input byte" in caught.value.message


def test_a_decode_cut_at_a_reported_boundary_and_resumed_there_equals_the_source(tmp_path: Path) -> None:
    raw, vmdk = stream_vmdk(tmp_path, mib=32, data_mib=20)  # > 8 MiB of input: boundaries
    data = vmdk.read_bytes()
    size = raw.stat().st_size
    first = tmp_path / "first.raw"
    first.touch()
    boundaries: list[Boundary] = []
    with RawWriter(first, zeroed=True, error=lambda e: None) as out:
        decode("vmdk-stream", data, out, size, boundaries)
    b = next(b for b in boundaries if 0 < b.input_offset < len(data))
    # a task killed after this boundary was checkpointed: the input before it was decoded ...
    resumed = tmp_path / "resumed.raw"
    with open(resumed, "wb") as f:
        f.truncate(size)
    with RawWriter(resumed, zeroed=True, error=lambda e: None) as out:
        decode("vmdk-stream", data[: b.input_offset], out, size)
    # ... and the resumed one gets the input from the boundary on
    with (
        RawWriter(resumed, zeroed=False, error=lambda e: None) as out,
        StreamDecode(
            "vmdk-stream",
            out,
            capacity=size,
            limits=LIMITS,
            max_virtual_size=size,
            max_decompressed_size=size,
            resume=b,
        ) as stream,
    ):
        stream.feed(data[b.input_offset :])
        assert stream.finish().virtual_size == size
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), str(resumed)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_the_confined_child_refuses_a_checkpoint_that_is_not_one_itself(tmp_path: Path) -> None:
    # more data bytes than input before the offset: the child's own check, not only the parent's
    target = tmp_path / "out.raw"
    target.touch()
    tampered = Boundary("raw", 4096, {"data_bytes": 8192})
    with (
        RawWriter(target, zeroed=True, error=lambda e: None) as out,
        pytest.raises(ImagingError) as caught,
        StreamDecode(
            "raw",
            out,
            capacity=MiB,
            limits=LIMITS,
            max_virtual_size=MiB,
            max_decompressed_size=MiB,
            resume=tampered,
        ) as stream,
    ):
        stream.feed(b"\x01" * 4096)
        stream.finish()
    assert caught.value.code == "InvalidCheckpoint"
    assert "do not fit" in caught.value.message
    assert target.stat().st_size == 0
