"""A fixed VHD decoded in this process (:class:`InlineVhdFixedDecode`) does what the confined child's
fixed-VHD decoder does (:class:`StreamDecode` with ``vhd-fixed`` and the input size), compared on the
same input made by qemu-img: the same disk, the same boundaries (and a resume from one, in either
direction), the same coded refusals of a bad footer, a short or a long input."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.errors import ImageRejected
from appliance.image.decoding import Boundary
from appliance.image.streamed import StreamDecode, StreamResult
from appliance.image.vhdinline import InlineVhdFixedDecode
from appliance.targets.base import storage_error
from appliance.targets.rawio import RawWriter
from tests.appliance.image.test_rawinline import data_in, disk

MiB = 1 << 20
LIMITS = config_mod.from_dict({}).limits
Make = Callable[..., Any]


@pytest.fixture(scope="module")
def vhd(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(the disk, the same disk as a fixed VHD written by qemu-img)."""
    d = tmp_path_factory.mktemp("vhdinline")
    data = disk(9 * MiB)
    (d / "disk.raw").write_bytes(data)
    subprocess.run(
        [
            *("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on"),
            *(str(d / "disk.raw"), str(d / "disk.vhd")),
        ],
        check=True,
    )
    image = (d / "disk.vhd").read_bytes()
    assert len(image) == len(data) + 512 and image[-512:].startswith(b"conectix")
    return data, image


def inline(sink: Any, **kw: Any) -> InlineVhdFixedDecode:
    return InlineVhdFixedDecode(sink, **kw)


def child(sink: Any, **kw: Any) -> StreamDecode:
    return StreamDecode("vhd-fixed", sink, limits=LIMITS, max_decompressed_size=kw["max_virtual_size"], **kw)


def run(
    make: Make,
    image: bytes,
    out: Path,
    *,
    resume: Boundary | None = None,
    input_size: int | None = None,
    max_virtual_size: int = 64 * MiB,
    piece: int = 300_000,
) -> tuple[StreamResult, list[tuple[dict[str, Any], int]]]:
    boundaries: list[tuple[dict[str, Any], int]] = []
    out.touch()
    with RawWriter(out, zeroed=resume is None, error=lambda e: storage_error(e, str(out))) as sink:
        with make(
            sink,
            capacity=max_virtual_size,
            max_virtual_size=max_virtual_size,
            input_size=len(image) if input_size is None else input_size,
            resume=resume,
            boundary_every=2 * MiB,
            on_boundary=lambda b, n: boundaries.append((b.to_dict(), n)),
        ) as stream:
            start = resume.input_offset if resume is not None else 0
            for at in range(start, len(image), piece):
                stream.feed(image[at : at + piece])
            result = stream.finish()
        sink.flush()
    return result, boundaries


@pytest.mark.parametrize("piece", [300_000, 100])  # the footer split over many feeds, or inside one
def test_the_inline_vhd_decode_writes_the_disk_and_boundaries_the_child_does(
    tmp_path: Path, vhd: tuple[bytes, bytes], piece: int
) -> None:
    data, image = vhd
    if piece == 100:  # a last feed of 100 bytes: the footer arrives in pieces
        piece = len(image) - 100
    here, bounds = run(inline, image, tmp_path / "a", piece=piece)
    there, child_bounds = run(child, image, tmp_path / "b")
    assert (tmp_path / "a").read_bytes()[: len(data)] == data
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert here == there == StreamResult(len(data), len(image), data_in(data))
    assert len(bounds) >= (4 if piece < MiB else 2) and child_bounds
    for b, _ in bounds + child_bounds:
        assert b["format"] == "vhd-fixed" and b["input_offset"] <= len(data)
        assert b["state"]["data_bytes"] == data_in(data[: b["input_offset"]])
    assert all(n == b["input_offset"] for b, n in bounds)


@pytest.mark.parametrize(("first", "then"), [(inline, child), (child, inline), (inline, inline)])
def test_a_boundary_of_either_decode_resumes_the_other(
    tmp_path: Path, vhd: tuple[bytes, bytes], first: Make, then: Make
) -> None:
    data, image = vhd
    bounds = run(first, image, tmp_path / "whole")[1]
    boundary = next(b for b, _ in bounds if b["input_offset"] >= 4 * MiB)
    out = tmp_path / "resumed"
    out.write_bytes(data[: boundary["input_offset"]])
    result, _ = run(then, image, out, resume=Boundary.from_dict(boundary))
    assert out.read_bytes()[: len(data)] == data
    assert result == StreamResult(len(data), len(image), data_in(data))


def broken_checksum(image: bytes) -> bytes:
    footer = bytearray(image[-512:])
    footer[40] ^= 1  # the original size: the checksum no longer adds up
    return image[:-512] + bytes(footer)


@pytest.mark.parametrize(
    ("change", "input_size", "said"),
    [
        (broken_checksum, None, "footer checksum"),
        (lambda image: image[:-512] + bytes(512), None, "no footer cookie"),
        (lambda image: image[:-1], 9 * MiB + 512, "ends before a complete footer"),
        (lambda image: image[: 5 * MiB], 9 * MiB + 512, "ends before its size"),
        (lambda image: image + b"\x00", 9 * MiB + 512, "longer than its size"),
    ],
)
def test_a_bad_footer_or_input_length_is_refused_as_the_child_refuses_it(
    tmp_path: Path,
    vhd: tuple[bytes, bytes],
    change: Callable[[bytes], bytes],
    input_size: int | None,
    said: str,
) -> None:
    bad = change(vhd[1])
    for make, name in ((inline, "a"), (child, "b")):
        with pytest.raises(ImageRejected) as err:
            run(make, bad, tmp_path / name, input_size=input_size)
        assert err.value.code == "CorruptImage" and said in err.value.message, (name, err.value.message)
