"""The chunked SHA-256 (appliance.targets.chunkdigest): equal to the definition computed here with hashlib
for any split of the stream into writes and zero runs; whole-zero chunks are taken as zero chunks without
being hashed; a file's digest reads none of its holes."""

from __future__ import annotations

import base64
import hashlib
import os
import random
from pathlib import Path

import pytest

from appliance.errors import UsageError
from appliance.targets.chunkdigest import ChunkedSha256, digest_file

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
