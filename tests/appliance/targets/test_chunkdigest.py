"""The chunked SHA-256 (appliance.targets.chunkdigest): equal to the definition computed here with hashlib
for any split of the stream into writes and zero runs; whole-zero chunks are taken as zero chunks without
being hashed; a file's digest reads none of its holes."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from appliance.errors import UsageError
from appliance.targets.chunkdigest import (
    QUEUE_BYTES,
    ByteBudget,
    ChunkedSha256,
    digest_file,
    range_digest,
)
from appliance.targets.offsetdigest import OffsetChunkedSha256

MiB = 1 << 20


def reference(data: bytes, chunk: int) -> tuple[str, int]:
    """The definition, written out: sha256 over the concatenated sha256 digests of the chunks."""
    digests = [hashlib.sha256(data[i : i + chunk]).digest() for i in range(0, len(data), chunk)] or [
        hashlib.sha256(b"").digest()
    ]
    return hashlib.sha256(b"".join(digests)).hexdigest(), len(digests)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_split_into_writes_and_zero_runs_gives_the_definitions_value(seed: int) -> None:
    rnd = random.Random(seed)
    chunk = MiB
    stream = bytearray()
    hasher = ChunkedSha256(chunk, threads=2)
    try:
        for _ in range(60):
            n = rnd.choice([1, 511, 4096, 70_000, MiB - 3, MiB, 2 * MiB + 7])
            if rnd.random() < 0.4:
                hasher.zeros(n)
                stream += bytes(n)
            else:
                piece = rnd.randbytes(n)
                # bytes, a reused bytearray, a memoryview: all copied or held as needed
                hasher.update(rnd.choice([piece, bytearray(piece), memoryview(piece)]))
                stream += piece
        got = hasher.result()
    finally:
        hasher.close()
    value, chunks = reference(bytes(stream), chunk)
    assert got.hexdigest == value and got.chunks == chunks and got.size == len(stream)
    assert got.s3_checksum == f"{base64.b64encode(bytes.fromhex(value)).decode()}-{chunks}"


def test_whole_zero_chunks_are_not_hashed_and_partial_ones_are() -> None:
    hasher = ChunkedSha256(MiB, threads=2)
    try:
        hasher.zeros(5 * MiB)  # five zero chunks
        hasher.update(b"x" * 100)  # chunk 6: data, then zeros up to its end (hashed)
        hasher.zeros(MiB - 100 + 3 * MiB + 10)  # three more zero chunks, and a short last one
        got = hasher.result()
    finally:
        hasher.close()
    data = bytes(5 * MiB) + b"x" * 100 + bytes(MiB - 100 + 3 * MiB + 10)
    assert got.hexdigest == reference(data, MiB)[0]
    assert got.chunks == 10 and got.zero_chunks == 9 and got.hashed_bytes == MiB


def test_an_empty_stream_is_one_empty_chunk_as_s3_computes_an_empty_part() -> None:
    hasher = ChunkedSha256(MiB)
    got = hasher.result()
    assert got.chunks == 1 and got.hexdigest == reference(b"", MiB)[0]
    with pytest.raises(ValueError):
        hasher.update(b"late")


def test_a_chunk_below_the_minimum_is_refused() -> None:
    with pytest.raises(UsageError):
        ChunkedSha256(4096)


def test_a_file_digest_reads_no_hole(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    data = os.urandom(3 * MiB)
    with open(path, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB: hashing its zeros would take many minutes
        f.seek(700 * MiB + 5)
        f.write(data)
    got = digest_file(path, 64 * MiB)
    # the definition, from the one chunk with data and the digest of a zero chunk
    zero = hashlib.sha256(bytes(64 * MiB)).digest()
    with open(path, "rb") as f:
        f.seek(640 * MiB)
        chunk10 = f.read(64 * MiB)
    assert chunk10[60 * MiB + 5 : 60 * MiB + 5 + len(data)] == data
    digests = [zero] * 16384
    digests[10] = hashlib.sha256(chunk10).digest()
    assert got.hexdigest == hashlib.sha256(b"".join(digests)).hexdigest()
    assert got.zero_chunks == 16383 and got.hashed_bytes == 64 * MiB


# -- writes at offsets (the import side: decoders, RAW parts, the export's source reads) ---------------


def _offset_writes(tmp_path: Path, seed: int, *, shuffle: bool) -> tuple[Path, list[tuple[str, int, bytes]]]:
    """A sparse file written by grain-like pieces at their offsets (some skipped as holes, some zero),
    ``shuffle``: in a random order; the writes as they were applied."""
    rnd = random.Random(seed)
    size = 9 * MiB + 12345
    ops: list[tuple[str, int, bytes]] = []
    at = 0
    while at < size:
        n = min(rnd.choice([4096, 65536, 300_000, MiB]), size - at)
        kind = rnd.random()
        if kind < 0.3:
            pass  # a hole: never written
        elif kind < 0.4:
            ops.append(("write", at, bytes(n)))  # zeros written as data
        else:
            ops.append(("write", at, rnd.randbytes(n)))
        at += n
    if shuffle:
        rnd.shuffle(ops)
    path = tmp_path / f"out-{seed}.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for kind, offset, data in ops:
            if kind == "write":
                os.pwrite(fd, data, offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path, ops


@pytest.mark.parametrize(("seed", "shuffle"), [(1, False), (2, False), (3, True), (4, True)])
def test_writes_at_offsets_in_any_order_give_the_written_files_digest(
    tmp_path: Path, seed: int, shuffle: bool
) -> None:
    path, ops = _offset_writes(tmp_path, seed, shuffle=shuffle)
    # apply the zero ranges to the file for real (the helper wrote only the data)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        # ranges zeroed after the writes (the VMDK decoder's unset grains; over data too, which undoes it)
        zero_ranges = [(2 * MiB, 100_000), (5 * MiB + 1, 3 * MiB)]
        for offset, length in zero_ranges:
            os.pwrite(fd, bytes(length), offset)
        reread: list[int] = []

        def read_back(start: int, end: int) -> bytes:
            reread.append(start)
            return range_digest(fd, start, end)

        hasher = OffsetChunkedSha256(MiB, reread=read_back, threads=2)
        for kind, offset, data in ops:
            if kind == "write":
                hasher.write(offset, data)
        for offset, length in zero_ranges:
            hasher.zero(offset, length)
        got = hasher.result(size)
    finally:
        os.close(fd)
    assert got is not None
    value, chunks = reference(path.read_bytes(), MiB)
    assert got.hexdigest == value and got.chunks == chunks
    assert got.hexdigest == digest_file(path, MiB).hexdigest
    if not shuffle:
        # in order, only the chunks a zero range took data from are read back (2 MiB: data there)
        assert set(reread) <= {2 * MiB, 5 * MiB, 6 * MiB, 7 * MiB, 8 * MiB}
        assert got.reread_chunks == len(reread)


def test_writes_in_ascending_order_with_holes_read_nothing_back() -> None:
    data = random.Random(7).randbytes(3 * MiB)
    hasher = OffsetChunkedSha256(MiB, reread=None, threads=2)
    hasher.write(100, data[:5000])
    hasher.write(2 * MiB, data[: MiB // 2])  # a hole before it
    hasher.zero(0, 100)  # zeros where nothing was written: nothing to undo
    hasher.zero(MiB, MiB)
    got = hasher.result(4 * MiB + 1)
    expected = bytearray(4 * MiB + 1)
    expected[100:5100] = data[:5000]
    expected[2 * MiB : 2 * MiB + MiB // 2] = data[: MiB // 2]
    assert got is not None and got.hexdigest == reference(bytes(expected), MiB)[0]
    assert got.reread_chunks == 0


def test_a_writer_that_missed_bytes_has_no_digest() -> None:
    hasher = OffsetChunkedSha256(MiB)
    hasher.unknown("resumed")
    hasher.write(0, b"x")
    assert hasher.result(MiB) is None and hasher.gap == "resumed"


def runs_with_gaps(count: int, run: int, gap: int) -> list[tuple[int, bytes]]:
    """``count`` data runs of ``run`` bytes, ``gap`` bytes apart (a fragmented filesystem's data)."""
    rnd = random.Random(count)
    return [(i * (run + gap), rnd.randbytes(run)) for i in range(count)]


def test_a_fragmented_image_of_many_data_runs_is_not_read_back_for_its_holes() -> None:
    # more runs than the 65,536 the digest remembered: the decoder's zero ranges for the holes behind
    # the position then marked every chunk, and the whole image was read again at the end
    runs, run, gap = runs_with_gaps(70_000, 512, 4096), 512, 4096
    hasher = OffsetChunkedSha256(MiB, reread=None, threads=2)
    for offset, data in runs:
        hasher.write(offset, data)
    for offset, _ in runs:
        hasher.zero(offset + run, gap)  # the holes, said to read as zeros (unset grains)
    size = len(runs) * (run + gap)
    got = hasher.result(size)
    assert got is not None and got.reread_chunks == 0
    expected = bytearray(size)
    for offset, data in runs:
        expected[offset : offset + run] = data
    assert got.hexdigest == reference(bytes(expected), MiB)[0]


def test_beyond_the_ranges_it_remembers_the_digest_merges_them_and_reads_back_only_what_that_costs(
    tmp_path: Path,
) -> None:
    runs, run, gap = runs_with_gaps(64, 1000, 200_000), 1000, 200_000
    size = len(runs) * (run + gap)  # 13 chunks of 1 MiB
    path = tmp_path / "out.raw"
    with path.open("wb") as f:
        for offset, data in runs:
            f.seek(offset)
            f.write(data)
        f.truncate(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        hasher = OffsetChunkedSha256(MiB, reread=lambda s, e: range_digest(fd, s, e), threads=2)
        hasher.MAX_SPANS = 8  # merged across their gaps into at most 4: zero ranges there are hashed again
        for offset, data in runs:
            hasher.write(offset, data)
        for offset, _ in runs:
            hasher.zero(offset + run, gap)
        got = hasher.result(size)
    finally:
        os.close(fd)
    assert got is not None and got.hexdigest == digest_file(path, MiB).hexdigest
    assert got.reread_chunks > 0  # the merged ranges cover the holes: those chunks were hashed again


def test_the_hashing_queue_is_bounded_in_bytes_not_in_pieces() -> None:
    budget = ByteBudget(QUEUE_BYTES)
    # a VHD writer's 512-byte bitmaps beside its 2 MiB blocks: many small pieces go without waiting
    for _ in range(64):
        budget.take(512)
    budget.take(QUEUE_BYTES - 64 * 512)
    took = threading.Event()
    waiter = threading.Thread(target=lambda: (budget.take(1), took.set()))
    waiter.start()
    assert not took.wait(0.2)  # full: the writer waits for the hashing thread
    budget.give(512)
    waiter.join()
    assert took.is_set() and budget.used == QUEUE_BYTES - 511
    # a piece bigger than the whole budget still goes once nothing is queued
    empty = ByteBudget(QUEUE_BYTES)
    empty.take(2 * QUEUE_BYTES)
    assert empty.used == 2 * QUEUE_BYTES


def test_small_and_big_pieces_mixed_digest_as_their_concatenation() -> None:
    rnd = random.Random(5)
    pieces = [rnd.randbytes(n) for n in (512, 2 << 20, 512, 2 << 20, 100, 5 << 20, 512)]
    digest = ChunkedSha256(1 << 20, threads=2)
    try:
        for piece in pieces:
            digest.update(piece)
        found = digest.result()
    finally:
        digest.close()
    whole = b"".join(pieces)
    chunks = [hashlib.sha256(whole[i : i + (1 << 20)]).digest() for i in range(0, len(whole), 1 << 20)]
    assert found.value == hashlib.sha256(b"".join(chunks)).digest()


def test_chunks_of_a_little_data_and_zeros_at_every_other_index_are_hashed_by_both_threads() -> None:
    # An ext4 disk's backup superblocks: a few KiB of data every other chunk, zeros to the chunk's end
    # (hashed: the chunk holds data) and whole zero chunks between (not hashed). Given out by chunk index
    # modulo the threads, every such chunk went to the first thread, and the export waited for it alone.
    chunk = 1 << 20
    rnd = random.Random(11)
    digest = ChunkedSha256(chunk, threads=2)
    stream = bytearray()
    try:
        for _ in range(8):
            data = rnd.randbytes(4096)
            digest.update(data)
            digest.zeros(chunk - len(data))  # the rest of this chunk
            digest.zeros(chunk)  # a whole zero chunk
            stream += data + bytes(2 * chunk - len(data))
        found = digest.result()
    finally:
        digest.close()
    assert found.hexdigest == reference(bytes(stream), chunk)[0]
    assert found.zero_chunks == 8
    # each thread hashed at least one of the eight chunks that hold data (how many more depends on which
    # thread is busier at each chunk's start: the second always goes to the second thread, busy or not)
    assert sum(digest.hashed_by_thread) == 8 * chunk
    assert min(digest.hashed_by_thread) >= chunk, digest.hashed_by_thread
