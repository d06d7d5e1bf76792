"""Plain RAW decoded in this process (:class:`InlineRawDecode`) does what the confined child's RAW decoder
does (:class:`StreamDecode` with ``raw``), compared on the same input: the same disk, the same boundaries
(and a resume from one), the same coded refusals of an input that is too long or too short."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance import config as config_mod
from appliance.errors import ImageRejected
from appliance.image.decoding import Boundary
from appliance.image.rawinline import InlineRawDecode
from appliance.image.streamed import StreamDecode, StreamResult
from appliance.targets.base import storage_error
from appliance.targets.rawio import RawWriter

MiB = 1 << 20
LIMITS = config_mod.from_dict({}).limits


def disk(size: int = 9 * MiB + 4096) -> bytes:
    """Data, whole zero MiBs and zero 4 KiB blocks inside data, and an unaligned end."""
    rnd = random.Random(5)
    out = bytearray(size)
    for at in (0, 3 * MiB + 8192, 7 * MiB):
        out[at : at + MiB] = rnd.randbytes(MiB)
    out[7 * MiB + 4096 : 7 * MiB + 8192] = bytes(4096)
    out[-100:] = b"\x01" * 100
    return bytes(out)


Make = Callable[..., Any]


def inline(sink: Any, **kw: Any) -> InlineRawDecode:
    return InlineRawDecode(sink, **kw)


def child(sink: Any, *, input_size: int | None = None, **kw: Any) -> StreamDecode:
    return StreamDecode(
        "raw", sink, limits=LIMITS, max_decompressed_size=kw["max_virtual_size"], input_size=input_size, **kw
    )


def run(
    make: Make,
    data: bytes,
    out: Path,
    *,
    resume: Boundary | None = None,
    input_size: int | None = None,
    max_virtual_size: int = 64 * MiB,
) -> tuple[StreamResult, list[tuple[dict[str, Any], int]], int]:
    boundaries: list[tuple[dict[str, Any], int]] = []
    with RawWriter(out, zeroed=True, error=lambda e: storage_error(e, str(out))) as sink:
        with make(
            sink,
            capacity=max_virtual_size,
            max_virtual_size=max_virtual_size,
            input_size=input_size,
            resume=resume,
            boundary_every=2 * MiB,
            on_boundary=lambda b, n: boundaries.append((b.to_dict(), n)),
        ) as stream:
            start = resume.input_offset if resume is not None else 0
            for at in range(start, len(data), 300_000):
                stream.feed(data[at : at + 300_000])
            result = stream.finish()
            produced = stream.produced
        sink.flush()
    return result, boundaries, produced


@pytest.mark.parametrize("input_size", [None, 9 * MiB + 4096])
def test_the_inline_raw_decode_writes_the_disk_and_boundaries_the_child_does(
    tmp_path: Path, input_size: int | None
) -> None:
    data = disk()
    (tmp_path / "a").touch()
    (tmp_path / "b").touch()
    here, bounds, _ = run(inline, data, tmp_path / "a", input_size=input_size)
    there, child_bounds, _ = run(child, data, tmp_path / "b", input_size=input_size)
    assert (tmp_path / "a").read_bytes()[: len(data)] == data
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    # three data MiBs, less the zero block inside one, plus the last block with its 100 data bytes
    assert here == there == StreamResult(len(data), len(data), 3 * MiB)
    # a boundary says what was handed over before it, as the child's do (theirs fall on its 4 MiB reads)
    assert len(bounds) >= 4 and child_bounds
    for b, n in bounds + child_bounds:
        assert b["format"] == "raw" and n == b["input_offset"]
        assert b["state"]["data_bytes"] == data_in(data[: b["input_offset"]])


def data_in(prefix: bytes) -> int:
    """Bytes of the 4 KiB blocks of ``prefix`` that are not all zeros."""
    return sum(len(prefix[i : i + 4096]) for i in range(0, len(prefix), 4096) if any(prefix[i : i + 4096]))


def test_a_resumed_inline_decode_goes_on_from_a_boundary_with_its_data_count(tmp_path: Path) -> None:
    data = disk()
    (tmp_path / "whole").touch()
    first = run(inline, data, tmp_path / "whole")[1]
    boundary, _ = next((b, n) for b, n in first if b["input_offset"] >= 4 * MiB)
    out = tmp_path / "resumed"
    with open(out, "wb") as f:
        f.write(data[: boundary["input_offset"]])
    result, _, produced = run(inline, data, out, resume=Boundary.from_dict(boundary))
    assert out.read_bytes()[: len(data)] == data
    assert result.data_bytes == 3 * MiB and produced == len(data) - boundary["input_offset"]


@pytest.mark.parametrize(
    ("input_size", "max_virtual_size", "code", "said"),
    [
        (MiB, 64 * MiB, "CorruptImage", "longer than its size"),
        (10 * MiB, 64 * MiB, "CorruptImage", "ends before its size"),
        (None, 8 * MiB, "SizeLimitExceeded", "over the limit of 8388608"),
    ],
)
def test_an_input_of_the_wrong_length_is_refused_as_the_child_refuses_it(
    tmp_path: Path, input_size: int | None, max_virtual_size: int, code: str, said: str
) -> None:
    data = disk()
    for make, name in ((inline, "a"), (child, "b")):
        (tmp_path / name).touch()
        with pytest.raises(ImageRejected) as err:
            run(make, data, tmp_path / name, input_size=input_size, max_virtual_size=max_virtual_size)
        assert err.value.code == code and said in err.value.message, (name, err.value.message)
