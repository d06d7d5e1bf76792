"""The streamOptimized VMDK decoder (appliance.image.vmdkstream): real qemu-img streams and hand-built
spec-layout streams decode to exactly what ``qemu-img convert -O raw`` produces; hostile streams are
refused with ``CorruptImage`` naming the offset and leave no output; a decode resumes from a boundary."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.errors import ImageRejected
from appliance.image.decoders import check_checkpoint, decode_file, open_decoder, resume_decoder
from appliance.image.decoding import Boundary, DecodeLimits
from appliance.image.vmdkstream import VmdkStreamDecoder
from appliance.targets.rawio import RawWriter
from tests import imagefactory as factory
from tests import streamfactory as sf

MiB = factory.MiB
GRAIN = 64 * 1024
LIMITS = DecodeLimits(max_virtual_size=1 << 40, max_decompressed_size=1 << 40, threads=2)


def _source_disk(path: Path, size: int, seed: int) -> Path:
    """A disk of ``size`` bytes: random, text-like and zero regions, some not grain-aligned."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(12):
            at = rnd.randrange(0, size - 1)
            n = min(rnd.randrange(1, 3 * GRAIN), size - at)
            f.seek(at)
            f.write(rnd.randbytes(n) if rnd.random() < 0.5 else (b"log %d ok\n" % at * n)[:n])
        f.seek(size - 100)
        f.write(b"end of disk".ljust(100, b"!"))
    return path


def _qemu_raw(src: Path, fmt: str, dst: Path) -> Path:
    factory.qemu_img("convert", "-f", fmt, "-O", "raw", src, dst)
    return dst


def _same(a: Path, b: Path) -> bool:
    res = subprocess.run(
        [factory.QEMU_IMG, "compare", "-f", "raw", "-F", "raw", str(a), str(b)], capture_output=True
    )
    return res.returncode == 0


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _decode_bytes(data: bytes, out: Path, limits: DecodeLimits = LIMITS) -> None:
    decode_file(open_decoder("vmdk-stream", io.BytesIO(data), limits), out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qemu-img streamOptimized conversions of several disks, and a spec-layout stream."""
    d = tmp_path_factory.mktemp("vmdk-corpus")
    out: dict[str, Path] = {}
    sources = {
        "mixed": _source_disk(d / "mixed.raw", 24 * MiB, 1),
        "unaligned-size": _source_disk(d / "odd.raw", 10 * MiB + 4096 + 512, 2),
        "zeros": d / "zeros.raw",
        "dense": d / "dense.raw",
    }
    with open(sources["zeros"], "wb") as f:
        f.truncate(8 * MiB)
    with open(sources["dense"], "wb") as f:
        f.write(random.Random(3).randbytes(6 * MiB))
    for name, raw in sources.items():
        vmdk = d / f"{name}.vmdk"
        factory.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, vmdk)
        out[name] = vmdk
    spec = sf.Stream(
        capacity=128 * 1100,
        grains=[
            sf.Grain(0, b"a" * GRAIN),
            sf.Grain(128 * 5, random.Random(4).randbytes(GRAIN)),
            sf.Grain(128 * 600, b"hello"),
            sf.Grain(128 * 1099, b"last grain"),
        ],
    )
    (d / "spec.vmdk").write_bytes(sf.build(spec))
    out["spec-layout"] = d / "spec.vmdk"
    return out


@pytest.mark.parametrize("name", ["mixed", "unaligned-size", "zeros", "dense", "spec-layout"])
def test_every_stream_of_the_corpus_decodes_to_what_qemu_img_produces(
    corpus: dict[str, Path], name: str, tmp_path: Path
) -> None:
    vmdk = corpus[name]
    reference = _qemu_raw(vmdk, "vmdk", tmp_path / "ref.raw")
    out = tmp_path / "out.raw"
    with open(vmdk, "rb") as f:
        dec = open_decoder("vmdk-stream", f, LIMITS)
        assert dec.virtual_size == reference.stat().st_size  # known before the first write
        result = decode_file(dec, out)
    assert result.virtual_size == out.stat().st_size == reference.stat().st_size
    assert _same(out, reference)
    # sparse: exactly the 4 KiB blocks holding data were written, and only they are allocated
    assert result.data_bytes == sf.nonzero_bytes(reference)
    assert _allocated(out) <= result.data_bytes + 4096


@pytest.mark.parametrize("threads", [1, 4])
def test_the_pool_size_does_not_change_the_output(
    corpus: dict[str, Path], threads: int, tmp_path: Path
) -> None:
    out = tmp_path / "out.raw"
    with open(corpus["mixed"], "rb") as f:
        decode_file(open_decoder("vmdk-stream", f, DecodeLimits(1 << 40, 1 << 40, threads)), out)
    assert _same(out, _qemu_raw(corpus["mixed"], "vmdk", tmp_path / "ref.raw"))


def test_decoding_onto_stale_content_through_a_raw_writer_zeroes_what_the_stream_leaves_unallocated(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    reference = _qemu_raw(corpus["mixed"], "vmdk", tmp_path / "ref.raw")
    target = tmp_path / "reused.img"
    target.write_bytes(b"\xff" * reference.stat().st_size)  # a device of unknown content
    with open(corpus["mixed"], "rb") as f, RawWriter(target, zeroed=False, error=lambda e: None) as w:
        open_decoder("vmdk-stream", f, LIMITS).decode(w)
    assert _same(target, reference)


# ------------------------------------------------------------------------------------ hostile streams


def _grain(lba: int, fill: bytes = b"x") -> sf.Grain:
    return sf.Grain(lba, fill * GRAIN)


def _stream(**kw: object) -> sf.Stream:
    kw.setdefault("capacity", 128 * 64)
    kw.setdefault("grains", [_grain(0), _grain(128, b"y"), _grain(256, b"z")])
    return sf.Stream(**kw)  # type: ignore[arg-type]


def _truncated_grain() -> bytes:
    data = sf.build(_stream(grains=[_grain(0), sf.Grain(128, random.Random(1).randbytes(GRAIN))]))
    return data[: 128 * 512 + 512 + 2000]  # inside the second grain


def _grain_block(lba: int, data: bytes) -> bytes:
    comp = zlib.compress(data.ljust(GRAIN, b"\0"))
    block = struct.pack("<QI", lba, len(comp)) + comp
    return block + bytes(-len(block) % 512)


def _bomb() -> sf.Grain:
    return sf.Grain(128, raw=zlib.compress(bytes(64 * MiB), 9))  # ~64 KiB compressed, inflates to 64 MiB


HOSTILE: dict[str, bytes] = {
    "truncated grain": _truncated_grain(),
    "LBA beyond capacity": sf.build(_stream(grains=[_grain(0), _grain(128 * 64)])),
    "LBA not grain-aligned (overlapping grains)": sf.build(_stream(grains=[_grain(0), _grain(64)])),
    "repeated grain": sf.build(_stream(grains=[_grain(0), _grain(128), _grain(0, b"q")])),
    "huge grain size": sf.build(_stream(header={"grain_size": 1 << 21})),
    "grain size not a power of two": sf.build(_stream(header={"grain_size": 96})),
    "zlib bomb in one grain": sf.build(_stream(grains=[_grain(0), _bomb()])),
    "compressed size over the bound": sf.build(
        _stream(grains=[_grain(0), sf.Grain(128, b"a", size=1 << 30)])
    ),
    "grain inflating short": sf.build(_stream(grains=[sf.Grain(0, raw=zlib.compress(b"short"))])),
    "bytes after a grain's deflate stream": sf.build(
        _stream(grains=[sf.Grain(0, raw=zlib.compress(bytes(GRAIN)) + b"junk")])
    ),
    "garbage grain data": sf.build(_stream(grains=[sf.Grain(0, raw=b"\x78\x9c" + b"\xff" * 100)])),
    "grain after the grain directory (markers out of order)": sf.build(
        _stream(before_footer=_grain_block(512, b"late" * 100))
    ),
    "grain table after the grain directory": sf.build(
        _stream(before_footer=sf.metadata_marker(1, 1) + bytes(512))
    ),
    "second grain directory": sf.build(_stream(before_footer=sf.metadata_marker(2, 1) + bytes(512))),
    "grain table claiming a huge size": sf.build(_stream(grains=[_grain(0)]))[: 128 * 512 + 512]
    + sf.metadata_marker(1, 1 << 40),
    "unknown marker type": sf.build(_stream(before_footer=sf.metadata_marker(7, 1) + bytes(512))),
    "footer disagreeing with the header (capacity)": sf.build(_stream(footer={"capacity": 128 * 65})),
    "footer disagreeing with the header (grain size)": sf.build(_stream(footer={"grain_size": 64})),
    "footer saying GD_AT_END again": sf.build(_stream(footer={"gd": sf.GD_AT_END})),
    "no footer though the header says GD_AT_END": sf.build(_stream(footer=None)),
    "no end-of-stream marker after the footer": sf.build(_stream(eos=False)),
    "data after the end-of-stream marker": sf.build(_stream(trailing=b"\0" * 512 + b"hidden")),
    "createType not streamOptimized": sf.build(_stream(create_type="monolithicSparse")),
    "not compressed": sf.build(_stream(header={"flags": 0x1})),
    "unknown incompatible flag": sf.build(_stream(header={"flags": 0x70001})),
    "descriptor elsewhere": sf.build(_stream(header={"desc_offset": 2})),
    "overHead beyond the metadata": sf.build(_stream(header={"overhead": 1 << 30})),
    "version 4": sf.build(_stream(header={"version": 4})),
    "no magic": b"\0" * 4096,
    "a partial marker at the end": sf.build(_stream(header={"gd": 50}, footer=None, eos=False)) + b"\1" * 100,
}


#: what the refusal of each hostile stream says (so each is refused for its own defect)
WHY = {
    "LBA beyond capacity": "grain LBA 8192 (grain-aligned and below capacity",
    "LBA not grain-aligned (overlapping grains)": "grain LBA 64 (grain-aligned",
    "a partial marker at the end": "ends inside a marker",
    "bytes after a grain's deflate stream": "bytes after the grain's deflate stream",
    "compressed size over the bound": "compressed bytes (at most 131072)",
    "createType not streamOptimized": "createType is 'monolithicSparse'",
    "data after the end-of-stream marker": "data after the end-of-stream marker",
    "descriptor elsewhere": "descriptor at sector 2",
    "footer disagreeing with the header (capacity)": "footer disagrees with the header (capacity)",
    "footer disagreeing with the header (grain size)": "footer disagrees with the header (grain_size)",
    "footer saying GD_AT_END again": "gdOffset is GD_AT_END too",
    "garbage grain data": "does not inflate",
    "grain after the grain directory (markers out of order)": "a grain after the gd marker",
    "grain inflating short": "inflates to 5 bytes",
    "grain size not a power of two": "grain size 96 sectors",
    "grain table after the grain directory": "a grain table after the gd marker",
    "grain table claiming a huge size": "grain table of 1099511627776 sectors",
    "huge grain size": "grain size 2097152 sectors",
    "no end-of-stream marker after the footer": "ends without its footer and end-of-stream marker",
    "no footer though the header says GD_AT_END": "without the footer the header announces",
    "no magic": "no sparse extent header",
    "not compressed": "not a stream",
    "overHead beyond the metadata": "overHead 1073741824 sectors",
    "repeated grain": "grain LBA 0 appears twice",
    "second grain directory": "a grain directory after the gd marker",
    "truncated grain": "the input ends inside a grain",
    "unknown incompatible flag": "unknown incompatible flags",
    "unknown marker type": "unknown marker type 7",
    "version 4": "unsupported version 4",
    "zlib bomb in one grain": "inflates to more than the grain size",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_stream_is_refused_with_its_offset_and_leaves_no_output(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    with pytest.raises(ImageRejected) as err:
        _decode_bytes(HOSTILE[name], out)
    assert err.value.code == "CorruptImage", err.value
    assert "at input byte" in err.value.message
    assert WHY[name] in err.value.message
    assert not out.exists()


def test_every_hostile_stream_starts_from_a_stream_the_decoder_accepts(tmp_path: Path) -> None:
    """The hostile cases are one defect away from valid: the unbroken stream decodes and qemu-img agrees."""
    good = tmp_path / "good.vmdk"
    good.write_bytes(sf.build(_stream()))
    _decode_bytes(good.read_bytes(), tmp_path / "out.raw")
    assert _same(tmp_path / "out.raw", _qemu_raw(good, "vmdk", tmp_path / "ref.raw"))


def test_a_disk_over_the_size_limit_is_refused_before_any_write(tmp_path: Path) -> None:
    data = sf.build(_stream())
    with pytest.raises(ImageRejected) as err:
        open_decoder("vmdk-stream", io.BytesIO(data), DecodeLimits(1 * MiB, 1 << 40))
    assert err.value.code == "SizeLimitExceeded"


def test_the_bomb_grain_is_refused_at_the_grain_that_holds_it() -> None:
    data = sf.build(_stream(grains=[_grain(0), _bomb()]))
    with pytest.raises(ImageRejected) as err:
        open_decoder("vmdk-stream", io.BytesIO(data), LIMITS).decode(_MemorySink())
    assert f"at input byte {128 * 512 + 512}" in err.value.message  # the second grain's marker
    assert "more than the grain size" in err.value.message


# ------------------------------------------------------------------------------------------ resuming


class _MemorySink:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.writes = 0

    def write(self, offset: int, chunk: bytes) -> None:
        if len(self.buf) < offset + len(chunk):
            self.buf.extend(bytes(offset + len(chunk) - len(self.buf)))
        self.buf[offset : offset + len(chunk)] = chunk
        self.writes += 1

    def zero(self, offset: int, length: int) -> None:
        if offset < len(self.buf):
            end = min(len(self.buf), offset + length)
            self.buf[offset:end] = bytes(end - offset)


class _Crash(Exception):
    pass


class _CrashingWriter(RawWriter):
    """A RawWriter whose process "dies" after ``after`` grain writes."""

    def __init__(self, path: Path, after: int) -> None:
        super().__init__(path, zeroed=True, error=lambda e: None, create=True)
        self.left = after

    def write(self, offset: int, chunk: bytes) -> None:
        if self.left == 0:
            raise _Crash()
        self.left -= 1
        super().write(offset, chunk)


@pytest.mark.parametrize("name", ["mixed", "spec-layout"])
def test_a_decode_resumed_from_a_boundary_gives_the_same_disk(
    corpus: dict[str, Path], name: str, tmp_path: Path
) -> None:
    vmdk = corpus[name]
    reference = _qemu_raw(vmdk, "vmdk", tmp_path / "ref.raw")
    out = tmp_path / "out.raw"
    with open(out, "wb") as f:
        f.truncate(reference.stat().st_size)
    grains = {"mixed": 11, "spec-layout": 2}[name]  # mixed: inside the second batch of grains
    with open(vmdk, "rb") as f, _CrashingWriter(out, grains) as w:
        dec = open_decoder("vmdk-stream", f, LIMITS)
        with pytest.raises(_Crash):
            dec.decode(w)
        saved = json.dumps(dec.boundary().to_dict())  # what a checkpoint would store
    boundary = Boundary.from_dict(json.loads(saved))
    assert 0 < boundary.input_offset < vmdk.stat().st_size
    # zeroed=False: the resumed decode zeroes what it believes unwritten, so a boundary that forgot a
    # written grain would wipe it
    with open(vmdk, "rb") as f, RawWriter(out, zeroed=False, error=lambda e: None) as w:
        f.seek(boundary.input_offset)  # a ranged read from the boundary on
        result = resume_decoder(boundary, f, LIMITS).decode(w)
    assert result.virtual_size == reference.stat().st_size
    assert _same(out, reference)


def test_a_resumed_decode_still_refuses_a_grain_written_before_the_boundary(tmp_path: Path) -> None:
    grains = [_grain(128 * i, bytes([65 + i])) for i in range(20)] + [_grain(0, b"again")]
    data = sf.build(_stream(capacity=128 * 64, grains=grains))
    one = DecodeLimits(1 << 40, 1 << 40, threads=1)
    dec = open_decoder("vmdk-stream", io.BytesIO(data), one)
    crash = _CrashingWriter(tmp_path / "o", 2)
    with pytest.raises(_Crash):
        dec.decode(crash)
    crash.close()
    b = dec.boundary()
    assert b.input_offset == 128 * 512 + 2 * 512  # after the second grain (one sector each)
    resumed = VmdkStreamDecoder.resume(io.BytesIO(data[b.input_offset :]), b, one)
    with pytest.raises(ImageRejected, match="grain LBA 0 appears twice"):
        resumed.decode(_MemorySink())


def _checkpoint_after_two_grains(tmp_path: Path) -> tuple[bytes, dict[str, Any], DecodeLimits]:
    """A 20-grain stream, the decoder "killed" after writing two grains, and its checkpoint as JSON."""
    grains = [_grain(128 * i, bytes([65 + i])) for i in range(20)]
    data = sf.build(_stream(capacity=128 * 64, grains=grains))
    one = DecodeLimits(1 << 40, 1 << 40, threads=1)
    dec = open_decoder("vmdk-stream", io.BytesIO(data), one)
    crash = _CrashingWriter(tmp_path / "o", 2)
    with pytest.raises(_Crash):
        dec.decode(crash)
    crash.close()
    state = dec.checkpoint()
    assert state is not None
    return data, json.loads(json.dumps(state)), one


def test_a_decode_restored_from_its_checkpoint_gives_what_one_pass_gives(tmp_path: Path) -> None:
    data, state, one = _checkpoint_after_two_grains(tmp_path)
    whole = _MemorySink()
    one_pass = open_decoder("vmdk-stream", io.BytesIO(data), one).decode(whole)
    resumed = _MemorySink()
    for lba, fill in ((0, b"A"), (128, b"B")):  # what the killed run had written
        resumed.write(lba * 512, fill * GRAIN)
    dec = VmdkStreamDecoder.restore(io.BytesIO(data[state["input_offset"] :]), state, one)
    result = dec.decode(resumed)
    assert result == one_pass
    assert result.data_bytes == 20 * GRAIN
    assert resumed.buf == whole.buf


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def tamper(state: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = state
        for key in parents:
            node = node[key]
        node[last] = value

    return tamper


def _bitmap(bits: bytes) -> str:
    return base64.b64encode(zlib.compress(bits)).decode()


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        # every check a stream's header passes applies to the checkpoint's
        (_set("state.header.grain_size", 1 << 20), "grain size"),
        (_set("state.header.flags", 0x10000), "not a stream"),
        (_set("state.header.capacity", 0), "capacity 0"),
        (_set("state.header.gtes_per_gt", 4096), "entries per grain table"),
        (_set("state.header.overhead", 1 << 40), "overHead"),
        (_set("state.header.capacity", -1), "not a count"),
        (_set("state.header.version", "3"), "not a count"),
        # the configuration's limit, not the checkpoint's: a disk over it is refused
        (_set("state.header.capacity", (1 << 40) // 512 + 128), "over the limit"),
        (_set("state.written", _bitmap(bytes(100))), "does not fit the header"),
        (
            lambda s: [
                _set("state.header.capacity", 128 * 60)(s),
                _set("state.written", _bitmap(b"\x03" + bytes(6) + b"\x80"))(s),  # grain 63 of 60
            ],
            "beyond the capacity",
        ),
        (_set("state.written", "not base64!"), "does not decode"),
        (_set("state.data_bytes", 3 * GRAIN), "do not fit its 2 grains"),
        (_set("state.data_bytes", -1), "do not fit"),
        (_set("input_offset", 128 * 512 + 2 * 512 + 1), "not a marker's place"),
        (_set("input_offset", 512), "not a marker's place"),
        (_set("format", "raw"), "cannot resume"),
        (_set("state.phase", "footer"), "holds header, written and data_bytes"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_tampered_checkpoint_is_refused_and_switches_no_check_off(
    tmp_path: Path, tamper: Callable[[dict[str, Any]], None], why: str
) -> None:
    data, state, one = _checkpoint_after_two_grains(tmp_path)
    assert state["state"]["header"]["capacity"] == 128 * 64
    tamper(state)
    with pytest.raises(ValueError, match=why):
        VmdkStreamDecoder.restore(io.BytesIO(data[128 * 512 + 2 * 512 :]), state, one)
    # the parent's check of a checkpoint before it resumes anything says the same
    with pytest.raises(ValueError):
        check_checkpoint("vmdk-stream", state, one)


def test_a_checkpoint_that_checks_out_is_the_boundary_to_resume_from(tmp_path: Path) -> None:
    _data, state, one = _checkpoint_after_two_grains(tmp_path)
    assert check_checkpoint("vmdk-stream", state, one) == Boundary.from_dict(state)
    with pytest.raises(ValueError, match="not of vhd-fixed"):
        check_checkpoint("vhd-fixed", state, one)


def test_the_first_boundary_is_the_first_grain(corpus: dict[str, Path]) -> None:
    with open(corpus["mixed"], "rb") as f:
        dec = open_decoder("vmdk-stream", f, LIMITS)
        assert isinstance(dec, VmdkStreamDecoder)
        assert dec.boundary().input_offset == dec.header.overhead * 512


# -------------------------------------------------------------------------------------------- fuzzing

_SEED_STREAM = sf.build(
    sf.Stream(
        capacity=128 * 8,
        grains=[
            sf.Grain(0, b"a" * 100),
            sf.Grain(256, random.Random(9).randbytes(3000)),
            sf.Grain(896, b"z"),
        ],
    )
)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(_SEED_STREAM)
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            width = draw(st.sampled_from([1, 4, 8]))
            value = draw(st.integers(0, (1 << (8 * width)) - 1))
            data[at : at + width] = value.to_bytes(width, "little")
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 1024))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=600))
    return bytes(data)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_fuzzed_streams_only_ever_raise_the_coded_error(data: bytes) -> None:
    sink = _MemorySink()
    try:
        dec = open_decoder("vmdk-stream", io.BytesIO(data), DecodeLimits(1 << 30, 1 << 30, 2))
        result = dec.decode(sink)
    except ImageRejected as exc:
        assert exc.code in ("CorruptImage", "SizeLimitExceeded")
        assert "at input byte" in exc.message or exc.code == "SizeLimitExceeded"
        return
    assert result.virtual_size <= 1 << 30
    assert len(sink.buf) <= result.virtual_size


class _CountingSink:
    """A sink that notes the decoder's buffered bytes at every write (and writes nothing)."""

    def __init__(self, decoder: VmdkStreamDecoder) -> None:
        self.decoder = decoder
        self.seen: list[int] = []

    def write(self, offset: int, chunk: bytes) -> None:
        self.seen.append(self.decoder.buffered)

    def zero(self, offset: int, length: int) -> None:
        pass


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_the_bytes_the_decoder_holds_stay_under_its_bound(corpus: dict[str, Path], threads: int) -> None:
    """The decoder's buffered bytes (an instrumented count of compressed grains read and not yet
    written, plus the grain each inflates to; not RSS, not time) never pass ``buffer_bound()``: a few
    MiB whatever the disk's size, the window filling to its 2 x threads batches and no further."""
    with open(corpus["dense"], "rb") as f:
        dec = VmdkStreamDecoder(f, DecodeLimits(1 << 40, 1 << 40, threads))
        sink = _CountingSink(dec)
        dec.decode(sink)
    bound = dec.buffer_bound()
    assert bound <= (2 * threads + 1) * 24 * GRAIN  # 1.5 MiB a batch of 8 grains of 64 KiB
    assert 0 < dec.peak_buffered <= bound
    assert max(sink.seen) <= bound
    # random grains do not compress: the window held 2 x threads batches of 8 such grains at once
    assert dec.peak_buffered >= 2 * threads * 8 * (GRAIN + GRAIN)
    assert dec.buffered == 0  # every grain written
