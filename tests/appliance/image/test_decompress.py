"""Capped, sparse, streaming decompression of untrusted archives (appliance.image.decompress)."""

from __future__ import annotations

import hashlib
import lzma
import os
import threading
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance import confine
from appliance.errors import Cancelled, ImageRejected, UsageError
from appliance.image.decompress import BLOCK_SIZE, decompress, detect_compression
from tests import confinement
from tests import imagefactory as factory

KINDS = ["gzip", "xz", "zstd", "bzip2"]
MiB = factory.MiB


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return factory.raw_mbr(tmp_path, size=16 * MiB)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    return w


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_detects_each_compression_by_magic(raw: Path, kind: str) -> None:
    assert detect_compression(factory.compress(raw, kind)) == kind


@pytest.mark.parametrize("builder", [factory.raw_mbr, factory.qcow2, factory.iso])
def test_uncompressed_images_are_not_detected_as_compressed(tmp_path: Path, builder) -> None:
    assert detect_compression(builder(tmp_path)) is None


def test_text_starting_with_bzh_is_not_bzip2(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"BZh9 is how bzip2 files start, but this is text\n")
    assert detect_compression(path) is None


@pytest.mark.parametrize("kind", KINDS)
def test_decompresses_each_kind_exactly_and_sparsely(raw: Path, work: Path, kind: str) -> None:
    out = work / "disk.raw"
    progress: list[int] = []
    written = decompress(factory.compress(raw, kind), out, kind, 64 * MiB, on_progress=progress.append)
    assert written == raw.stat().st_size == out.stat().st_size
    assert sha(out) == sha(raw)
    # 16 MiB disk with ~256 KiB of data: zero blocks must have become holes
    assert out.stat().st_blocks * 512 <= 2 * MiB
    assert progress == sorted(progress) and progress[-1] == written


def test_trailing_zero_run_keeps_the_full_length(tmp_path: Path, work: Path) -> None:
    src = tmp_path / "tail.raw"
    src.write_bytes(b"x" * 1000 + bytes(5 * MiB + 123))
    out = work / "tail.raw"
    decompress(factory.compress(src, "gzip"), out, "gzip", 64 * MiB)
    assert out.stat().st_size == src.stat().st_size
    assert sha(out) == sha(src)


@pytest.mark.parametrize("kind", KINDS)
def test_concatenated_streams_decode_in_sequence(tmp_path: Path, work: Path, kind: str) -> None:
    first, second = b"first part " * 1000, b"second part " * 1000
    blob = tmp_path / "joined"
    blob.write_bytes(
        factory._compress_stream(kind, iter([first])) + factory._compress_stream(kind, iter([second]))
    )
    out = work / "joined.raw"
    assert decompress(blob, out, kind, MiB) == len(first) + len(second)
    assert out.read_bytes() == first + second


@pytest.mark.parametrize("kind", KINDS)
def test_rejects_decompression_bomb_without_writing_past_the_cap(
    tmp_path: Path, work: Path, kind: str
) -> None:
    total = 2 * factory.GiB if kind == "gzip" else 512 * MiB
    archive = factory.bomb(tmp_path, kind, total)
    cap = 64 * MiB
    progress: list[int] = []
    with pytest.raises(ImageRejected) as exc:
        decompress(archive, work / "bomb.raw", kind, cap, on_progress=progress.append)
    assert exc.value.code == "SizeLimitExceeded.Decompressed"
    assert "limits.max_decompressed_size" in exc.value.message
    assert progress and max(progress) <= cap  # never produced (let alone wrote) more than the cap
    assert max(progress) == cap  # ... and it did get right up to it, so the cap and not an error stopped it
    assert list(work.iterdir()) == []  # partial output removed


def test_output_of_exactly_the_cap_is_accepted_and_one_byte_less_is_not(tmp_path: Path, work: Path) -> None:
    src = tmp_path / "exact.raw"
    src.write_bytes(b"\x01" * (3 * BLOCK_SIZE + 17))
    archive = factory.compress(src, "zstd")
    size = src.stat().st_size
    assert decompress(archive, work / "ok.raw", "zstd", size) == size
    with pytest.raises(ImageRejected) as exc:
        decompress(archive, work / "over.raw", "zstd", size - 1)
    assert exc.value.code == "SizeLimitExceeded.Decompressed"
    assert not (work / "over.raw").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_rejects_truncated_stream_and_removes_output(raw: Path, work: Path, kind: str) -> None:
    archive = factory.compress(raw, kind)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageRejected) as exc:
        decompress(archive, work / "out.raw", kind, 64 * MiB)
    assert exc.value.code == "CorruptImage"
    assert f"{kind} stream is corrupt or truncated" in exc.value.message
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz"])
def test_rejects_trailing_garbage(raw: Path, work: Path, kind: str) -> None:
    archive = factory.compress(raw, kind)
    archive.write_bytes(archive.read_bytes() + b"this is not compressed data")
    with pytest.raises(ImageRejected) as exc:
        decompress(archive, work / "out.raw", kind, 64 * MiB)
    assert exc.value.code == "CorruptImage"
    assert list(work.iterdir()) == []


def test_rejects_zstd_frame_failing_its_checksum(raw: Path, work: Path) -> None:
    # the zstd tool writes content checksums by default; so does the factory
    archive = factory.compress(raw, "zstd")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    archive.write_bytes(bytes(data))
    with pytest.raises(ImageRejected) as exc:
        decompress(archive, work / "out.raw", "zstd", 64 * MiB)
    assert exc.value.code == "CorruptImage"
    assert list(work.iterdir()) == []


def test_cancel_stops_decompression_and_removes_output(tmp_path: Path, work: Path) -> None:
    archive = factory.bomb(tmp_path, "gzip", 256 * MiB)
    cancel = threading.Event()
    seen: list[int] = []

    def progress(n: int) -> None:
        seen.append(n)
        if n >= 4 * MiB:
            cancel.set()

    with pytest.raises(Cancelled):
        decompress(archive, work / "out.raw", "gzip", 1 << 40, cancel=cancel, on_progress=progress)
    assert max(seen) < 8 * MiB
    assert list(work.iterdir()) == []


def test_refuses_to_overwrite_an_existing_destination(raw: Path, work: Path) -> None:
    archive = factory.compress(raw, "gzip")
    existing = work / "keep.raw"
    existing.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        decompress(archive, existing, "gzip", 64 * MiB)
    assert existing.read_bytes() == b"precious"


def test_unknown_compression_is_a_usage_error(raw: Path, work: Path) -> None:
    with pytest.raises(UsageError):
        decompress(raw, work / "out.raw", "zip", 64 * MiB)
    assert list(work.iterdir()) == []


def test_the_decoder_runs_in_a_confined_child(raw: Path, tmp_path: Path, work: Path) -> None:
    data = factory.compress(raw, "gzip").read_bytes()
    fifo = tmp_path / "upload.gz"
    os.mkfifo(fifo)
    limits = config_mod.from_dict({}).limits
    sentinel = tmp_path / "inherited-secret"
    sentinel.write_text("not for the decoder")
    inherited = os.open(sentinel, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    results: list[int] = []
    runner = threading.Thread(
        target=lambda: results.append(decompress(fifo, work / "disk.raw", "gzip", 64 * MiB, limits=limits))
    )
    runner.start()
    try:
        writer = os.open(fifo, os.O_WRONLY)  # the parent opened the input for the child
        pid = confinement.find_descendant(confinement.is_python_module("appliance.image.compressed"))
        confinement.wait_reading(pid, 0)  # the child waits for the compressed bytes on its stdin
        seen = confinement.observe(pid)
        os.write(writer, data)
        os.close(writer)
        runner.join(60)
    finally:
        os.close(inherited)
    assert results == [raw.stat().st_size] and sha(work / "disk.raw") == sha(raw)
    confinement.assert_confined(
        seen, confine.decompressor(limits, 64 * MiB), cwd_entries=[], forbidden_fd_targets={str(sentinel)}
    )
    # exactly three descriptors: the input, a pipe for the decoded bytes, the status pipe; no writable file
    assert seen.fds[0] == str(fifo)
    assert seen.fds[1].startswith("pipe:") and seen.fds[2].startswith("pipe:") and seen.files() == {}


def test_a_decoder_over_its_cpu_limit_is_rejected_and_leaves_nothing(tmp_path: Path, work: Path) -> None:
    # 1 GiB of zeros as bzip2: ~5 CPU seconds to decode (measured), far below the output cap
    archive = factory.bomb(tmp_path, "bzip2", factory.GiB)
    limits = config_mod.from_dict(
        {"limits": {"decompress_cpu_seconds": 1, "decompress_cpu_seconds_per_gib": 0}}
    ).limits
    with pytest.raises(ImageRejected) as exc:
        decompress(archive, work / "out.raw", "bzip2", 2 * factory.GiB, limits=limits)
    assert exc.value.code == "UnsafeImage.ResourceLimit"
    # killed by a signal, and the message names the policy it ran under: the configured CPU limit
    assert "bzip2 decoder was killed by SIG" in exc.value.message
    assert confine.decompressor(limits, 2 * factory.GiB).describe() in exc.value.message
    assert list(work.iterdir()) == []


def test_a_decoder_over_its_address_space_limit_is_rejected_and_leaves_nothing(
    tmp_path: Path, work: Path
) -> None:
    # the stream declares a 256 MiB dictionary, which the decoder allocates before the first byte of output:
    # more than a 200 MiB address space holds next to Python (~30 MiB)
    archive = tmp_path / "big-dictionary.xz"
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 0, "dict_size": 256 * MiB}]
    archive.write_bytes(lzma.compress(os.urandom(2 * MiB), format=lzma.FORMAT_XZ, filters=filters))
    limits = config_mod.from_dict({"limits": {"decompress_address_space": "200MiB"}}).limits
    with pytest.raises(ImageRejected) as exc:
        decompress(archive, work / "out.raw", "xz", 1 << 30, limits=limits)
    assert exc.value.code == "UnsafeImage.ResourceLimit"
    assert "memory" in exc.value.message
    assert list(work.iterdir()) == []
    # the same archive decodes with the default limits
    assert decompress(archive, work / "ok.raw", "xz", 1 << 30) == 2 * MiB


class Ledger:
    """What a step's context records, and what the directory held each time it was told something."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.entries: list[tuple[str, str, list[str]]] = []

    def _record(self, action: str, resource: str | Path) -> None:
        self.entries.append((action, str(resource), sorted(p.name for p in self.directory.iterdir())))

    def ledger_created(self, resource: str | Path) -> None:
        self._record("created", resource)

    def ledger_removed(self, resource: str | Path) -> None:
        self._record("removed", resource)


@pytest.mark.parametrize("outcome", ["complete", "cancelled"])
def test_output_is_a_partial_named_in_the_ledger_before_it_exists(
    raw: Path, work: Path, outcome: str
) -> None:
    # A process killed mid-decompression leaves a partial its task's ledger names (swept on resume),
    # never a file under the final name that only the end of the task would remove.
    archive = factory.compress(raw, "gzip")
    ledger = Ledger(work)
    cancel = threading.Event()
    seen: set[tuple[str, int]] = set()

    def progress(_n: int) -> None:
        seen.update((p.name, p.stat().st_mode & 0o777) for p in work.iterdir())
        if outcome == "cancelled":
            cancel.set()

    out = work / "disk.raw"
    if outcome == "cancelled":
        with pytest.raises(Cancelled):
            decompress(archive, out, "gzip", 64 * MiB, on_progress=progress, cancel=cancel, ledger=ledger)
    else:
        decompress(archive, out, "gzip", 64 * MiB, on_progress=progress, ledger=ledger)
    [(created, partial, before), (removed, same, after)] = ledger.entries
    assert (created, removed, same) == ("created", "removed", partial)
    assert Path(partial).parent == work and Path(partial).name.startswith(".disk.raw.partial-")
    assert before == []  # announced before it existed
    assert seen == {(Path(partial).name, 0o600)}  # while it was written: only the partial, 0600
    assert after == ([] if outcome == "cancelled" else ["disk.raw"])
    assert sorted(p.name for p in work.iterdir()) == after
