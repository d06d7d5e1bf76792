"""The sequential decoders other than stream-VMDK (raw, gzip/xz/zstd/bzip2, fixed VHD), decoding into a
new file, and the decoder child (appliance.image.decoders.main) run as a process with stdin/stdout."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import ImageRejected, UsageError
from appliance.image import decoding
from appliance.image.decoders import (
    check_checkpoint,
    container_decoder,
    decode_file,
    open_decoder,
    resume_decoder,
)
from appliance.image.decoding import Boundary, DecodeLimits
from appliance.image.rawstream import RawDecoder
from appliance.image.vhdfixed import FORMAT as VHD_FIXED
from appliance.image.vhdfixed import footer_problem
from appliance.image.vmdkformat import FORMAT as VMDK_STREAM
from appliance.targets.rawio import RawWriter
from tests import imagefactory as factory
from tests import streamfactory as sf
from tests.preflights import IMAGES, verdict_of

MiB = factory.MiB
REPO = Path(__file__).resolve().parents[3]
LIMITS = DecodeLimits(max_virtual_size=1 << 40, max_decompressed_size=1 << 40, threads=2)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12 MiB raw disk with data and zero regions (not a multiple of 1 MiB at the end)."""
    path = tmp_path_factory.mktemp("decoders") / "disk.raw"
    rnd = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(12 * MiB + 4096)
        for at in (0, 3 * MiB + 17, 7 * MiB, 12 * MiB):
            f.seek(at)
            f.write(rnd.randbytes(300_000 if at < 12 * MiB else 4096))
    return path


def _same(a: Path, b: Path) -> bool:
    cmd = [factory.QEMU_IMG, "compare", "-f", "raw", "-F", "raw", str(a), str(b)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _decode(fmt: str, src: Path, out: Path, **kw: object) -> object:
    with open(src, "rb") as f:
        return decode_file(open_decoder(fmt, f, kw.pop("limits", LIMITS), **kw), out)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- raw


def test_raw_passes_through_and_stays_sparse(disk: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    result = _decode("raw", disk, out, input_size=disk.stat().st_size)
    assert out.read_bytes() == disk.read_bytes()
    assert out.stat().st_blocks * 512 <= result.data_bytes  # type: ignore[attr-defined]
    assert result.data_bytes == sf.nonzero_bytes(disk)  # type: ignore[attr-defined]


@pytest.mark.parametrize("delta", [-1, 1])
def test_a_raw_input_of_another_length_than_announced_is_corrupt(
    disk: Path, tmp_path: Path, delta: int
) -> None:
    out = tmp_path / "out.raw"
    with pytest.raises(ImageRejected) as err:
        _decode("raw", disk, out, input_size=disk.stat().st_size + delta)
    assert err.value.code == "CorruptImage"
    assert not out.exists()


def test_a_raw_decode_resumes_at_any_offset(disk: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    data = disk.read_bytes()
    b = Boundary.from_dict(json.loads(json.dumps(Boundary("raw", 5 * MiB + 3).to_dict())))
    with RawWriter(out, zeroed=True, error=lambda e: None, create=True) as w:
        w.write(0, data[: 5 * MiB + 3])
        resume_decoder(b, io.BytesIO(data[b.input_offset :]), LIMITS, input_size=len(data)).decode(w)
    assert out.read_bytes() == data


# ---------------------------------------------------------------------------------------- compressed


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "bzip2"])
def test_compressed_raw_decodes_to_the_disk(disk: Path, tmp_path: Path, kind: str) -> None:
    packed = factory.compress(disk, kind, name=str(tmp_path / f"disk.{factory.SUFFIXES[kind]}"))
    out = tmp_path / "out.raw"
    result = _decode(kind, packed, out)
    assert result.virtual_size == disk.stat().st_size  # type: ignore[attr-defined]
    assert out.read_bytes() == disk.read_bytes()
    assert out.stat().st_blocks * 512 <= sf.nonzero_bytes(disk) + 4096  # zero blocks stayed holes


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "bzip2"])
def test_a_compression_bomb_stops_at_the_cap_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    bomb = factory.bomb(tmp_path, kind, total=64 * MiB)
    out = tmp_path / "out.raw"
    with pytest.raises(ImageRejected) as err:
        _decode(kind, bomb, out, limits=DecodeLimits(1 << 40, 16 * MiB))
    assert err.value.code == "SizeLimitExceeded.Decompressed"
    assert not out.exists()


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "bzip2"])
def test_a_truncated_compressed_stream_is_corrupt(disk: Path, tmp_path: Path, kind: str) -> None:
    packed = factory.compress(disk, kind, name=str(tmp_path / f"disk.{factory.SUFFIXES[kind]}"))
    cut = tmp_path / "cut"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(ImageRejected) as err:
        _decode(kind, cut, tmp_path / "out.raw")
    assert err.value.code == "CorruptImage"
    assert not (tmp_path / "out.raw").exists()


def test_a_compressed_stream_has_no_boundary_after_its_start(disk: Path, tmp_path: Path) -> None:
    packed = factory.compress(disk, "gzip", name=str(tmp_path / "disk.gz"))
    with open(packed, "rb") as f:
        dec = open_decoder("gzip", f, LIMITS)
        assert dec.boundary() == Boundary("gzip", 0)
        decode_file(dec, tmp_path / "out.raw")
        assert dec.boundary() is None
    with pytest.raises(UsageError):
        resume_decoder(Boundary("gzip", 100), io.BytesIO(b""), LIMITS)


@pytest.mark.parametrize(
    ("fmt", "state", "input_size", "why"),
    [
        # a fixed VHD's footer is always read and checked: no checkpoint may skip past the data
        (
            "vhd-fixed",
            {"format": "vhd-fixed", "input_offset": 4 * MiB + 512, "state": {}},
            4 * MiB + 512,
            "outside",
        ),
        ("raw", {"format": "raw", "input_offset": 5 * MiB, "state": {}}, 4 * MiB, "outside"),
        ("raw", {"format": "raw", "input_offset": -512, "state": {}}, None, "outside"),
        ("raw", {"format": "raw", "input_offset": 100, "state": {"data_bytes": 200}}, None, "do not fit"),
        ("raw", {"format": "raw", "input_offset": 100, "state": {"data_bytes": "9"}}, None, "do not fit"),
        ("raw", {"format": "raw", "input_offset": 100, "state": {"extra": 1}}, None, "only data_bytes"),
        ("raw", {"format": "vhd-fixed", "input_offset": 100, "state": {}}, None, "not of raw"),
        ("raw", {"input_offset": 100}, None, "not a decoder checkpoint"),
        # a compressed stream has no state past its start
        ("gzip", {"format": "gzip", "input_offset": 100, "state": {}}, None, "cannot resume"),
    ],
)
def test_a_raw_vhd_or_compressed_checkpoint_that_is_not_one_is_refused(
    fmt: str, state: dict[str, object], input_size: int | None, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        check_checkpoint(fmt, state, LIMITS, input_size=input_size)


def test_a_raw_checkpoint_restores_a_decode_at_its_offset(disk: Path, tmp_path: Path) -> None:
    data = disk.read_bytes()
    out = tmp_path / "out.raw"
    with RawWriter(out, zeroed=True, error=lambda e: None, create=True) as w:
        first = open_decoder("raw", io.BytesIO(data[: 3 * MiB]), LIMITS)
        first.decode(w)
        state = json.loads(json.dumps(first.checkpoint()))
        assert state["input_offset"] == 3 * MiB
        assert check_checkpoint("raw", state, LIMITS) == Boundary.from_dict(state)
        rest = RawDecoder.restore(io.BytesIO(data[3 * MiB :]), state, LIMITS, input_size=len(data))
        result = rest.decode(w)
    assert out.read_bytes() == data
    assert result.data_bytes == sf.nonzero_bytes(disk)


# ---------------------------------------------------------------------------------------- fixed VHD


@pytest.fixture(scope="module")
def vhd(disk: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fixed VHD made by qemu-img from ``disk``, and qemu-img's RAW conversion of it."""
    d = tmp_path_factory.mktemp("vhd")
    vhd = d / "fixed.vhd"
    factory.qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", disk, vhd)
    ref = d / "ref.raw"
    factory.qemu_img("convert", "-f", "vpc", "-O", "raw", vhd, ref)
    return vhd, ref


@pytest.mark.parametrize("size_known", [True, False])
def test_a_fixed_vhd_decodes_to_what_qemu_img_produces(
    vhd: tuple[Path, Path], tmp_path: Path, size_known: bool
) -> None:
    src, ref = vhd
    out = tmp_path / "out.raw"
    with open(src, "rb") as f:
        dec = open_decoder("vhd-fixed", f, LIMITS, input_size=src.stat().st_size if size_known else None)
        assert dec.virtual_size == (ref.stat().st_size if size_known else None)
        result = decode_file(dec, out)
    assert result.virtual_size == ref.stat().st_size
    assert _same(out, ref)
    assert out.stat().st_blocks * 512 <= sf.nonzero_bytes(ref) + 4096


def _patched(src: Path, tmp_path: Path, at_from_end: int, data: bytes, fix_checksum: bool) -> Path:
    blob = bytearray(src.read_bytes())
    pos = len(blob) - 512 + at_from_end
    blob[pos : pos + len(data)] = data
    if fix_checksum:
        footer = blob[-512:]
        footer[64:68] = b"\0\0\0\0"
        blob[-512 + 64 : -512 + 68] = struct.pack(">I", ~sum(footer) & 0xFFFFFFFF)
    out = tmp_path / "bad.vhd"
    out.write_bytes(bytes(blob))
    return out


@pytest.mark.parametrize(
    ("name", "at", "data", "fix", "why"),
    [
        ("bad checksum", 64, b"\0\0\0\1", False, "checksum"),
        ("size mismatch", 48, struct.pack(">Q", 1 << 30), True, "differs from the"),
        ("dynamic disk type", 60, struct.pack(">I", 3), True, "not a fixed disk"),
        ("no cookie", 0, b"notvhd!!", True, "no footer cookie"),
    ],
)
@pytest.mark.parametrize("size_known", [True, False])
def test_a_bad_fixed_vhd_footer_is_refused_and_leaves_nothing(
    vhd: tuple[Path, Path],
    tmp_path: Path,
    name: str,
    at: int,
    data: bytes,
    fix: bool,
    why: str,
    size_known: bool,
) -> None:
    bad = _patched(vhd[0], tmp_path, at, data, fix)
    out = tmp_path / "out.raw"
    with pytest.raises(ImageRejected) as err:
        _decode("vhd-fixed", bad, out, input_size=bad.stat().st_size if size_known else None)
    assert err.value.code == "CorruptImage"
    assert why in err.value.message
    assert not out.exists()


def test_a_fixed_vhd_footer_read_ahead_is_checked_before_any_write(
    vhd: tuple[Path, Path], tmp_path: Path
) -> None:
    bad = _patched(vhd[0], tmp_path, 48, struct.pack(">Q", 5), True)
    with open(bad, "rb") as f, pytest.raises(ImageRejected, match="differs from the"):
        open_decoder("vhd-fixed", f, LIMITS, input_size=bad.stat().st_size, footer=bad.read_bytes()[-512:])
    assert footer_problem(vhd[0].read_bytes()[-512:], vhd[1].stat().st_size) is None


def test_a_fixed_vhd_decode_resumes_from_its_boundary(vhd: tuple[Path, Path], tmp_path: Path) -> None:
    src, ref = vhd
    data = src.read_bytes()
    out = tmp_path / "out.raw"
    with RawWriter(out, zeroed=True, error=lambda e: None, create=True) as w:
        w.write(0, data[: 6 * MiB])
        b = Boundary("vhd-fixed", 6 * MiB)
        result = resume_decoder(b, io.BytesIO(data[6 * MiB :]), LIMITS, input_size=len(data)).decode(w)
    assert result.virtual_size == ref.stat().st_size
    assert _same(out, ref)


# ------------------------------------------------------------------------------------------ the child


def _child(fmt: str, src: Path, out: Path, *extra: str) -> list[dict[str, object]]:
    code = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "from appliance.image.decoders import main; sys.exit(main())"
    )
    argv = [sys.executable, "-I", "-c", code, str(REPO), "--format", fmt]
    argv += ["--max-virtual-size", str(1 << 40), "--max-decompressed-size", str(1 << 40), *extra]
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(src, "rb") as fin:
        res = subprocess.run(argv, stdin=fin, stdout=fd, stderr=subprocess.PIPE, timeout=120)
    os.close(fd)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stderr.decode().splitlines()]


def test_the_decoder_child_decodes_stdin_to_stdout_and_reports_json_lines(tmp_path: Path) -> None:
    vmdk = tmp_path / "s.vmdk"
    raw = tmp_path / "src.raw"
    raw.write_bytes(random.Random(5).randbytes(3 * MiB) + bytes(14 * MiB) + b"tail")
    factory.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, vmdk)
    out = tmp_path / "out.raw"
    lines = _child("vmdk-stream", vmdk, out)
    assert lines[0] == {"virtual_size": 17 * MiB + 512}
    assert lines[-1]["total"] == 17 * MiB + 512
    boundaries = [line["boundary"] for line in lines if "boundary" in line]
    assert boundaries and boundaries[-1]["format"] == "vmdk-stream"  # type: ignore[index]
    os.truncate(out, int(lines[-1]["total"]))  # type: ignore[call-overload]
    assert _same(out, _qemu_raw(vmdk, tmp_path))


def _qemu_raw(vmdk: Path, tmp_path: Path) -> Path:
    ref = tmp_path / "ref.raw"
    factory.qemu_img("convert", "-f", "vmdk", "-O", "raw", vmdk, ref)
    return ref


def test_the_decoder_child_reports_a_hostile_stream_as_a_coded_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.vmdk"
    bad.write_bytes(sf.build(sf.Stream(capacity=1024, grains=[sf.Grain(2048, b"x")])))
    lines = _child("vmdk-stream", bad, tmp_path / "out.raw")
    assert lines[-1]["error"] == "CorruptImage"
    assert "grain LBA 2048" in str(lines[-1]["message"])


def test_the_shared_zero_buffers_stay_bounded_whatever_lengths_are_asked_for() -> None:
    # gap and extent remainders: every 4 KiB multiple up to 1 MiB (128 MiB in all), as a long-lived
    # worker may see
    for n in range(4096, (1 << 20) + 1, 4096):
        z = decoding.zeros(n)
        assert len(z) == n and not any(z[:: 1 << 16])
    assert sum(decoding._ZERO_BUFFERS) <= decoding._ZERO_CACHE_BYTES
    assert decoding.zeros(4096) is decoding.zeros(4096)  # a common length is still shared


# ------------------------------------------------------------------------ the decoder of a container
#
# What an ImportVolume upload streams onto its volume (a RAW upload is written as it is, before this is
# asked), and what source.route streams after RAW and compressed RAW: a stream-optimized VMDK and a
# fixed VHD are decoded as they arrive, any other format goes through scratch.

CONTAINER_DECODERS = {
    "raw": None,
    "gzip-raw": None,
    "vmdk-stream": VMDK_STREAM,
    # the upload's preflight does not decompress: a verdict of a compressed stream never comes here
    "gzip-vmdk-stream": VMDK_STREAM,
    "vmdk-sparse": None,
    "vhd-fixed": VHD_FIXED,
    "vhd-dynamic": None,
    "qcow2": None,
    "qcow2-claimed-vmdk": None,
}


@pytest.mark.parametrize("name", IMAGES)
def test_an_upload_streams_onto_its_volume_only_as_a_stream_vmdk_or_a_fixed_vhd(
    name: str, tmp_path: Path
) -> None:
    assert container_decoder(verdict_of(name, tmp_path)) == CONTAINER_DECODERS[name]
