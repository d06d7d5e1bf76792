"""Reused read buffers (appliance.image.readbuf) and the export producers that read into them: a buffer a
consumer still holds (as the digests' hashing threads hold what they were given) is never refilled, and the
RAW and VHD producers hand their sinks pooled buffers, a bounded set of them, instead of a fresh buffer
per read."""

from __future__ import annotations

import hashlib
import os
import random
from collections import deque
from pathlib import Path

from appliance.image.readbuf import ReadPool, is_pooled
from appliance.image.vhdwriter import write_dynamic_vhd
from appliance.progress import ProgressTracker
from appliance.targets.exportraw import CHUNK, POOL, raw_producer

MiB = 1 << 20


def test_a_buffer_a_consumer_still_holds_is_not_refilled(tmp_path: Path) -> None:
    path = tmp_path / "blocks"
    path.write_bytes(b"".join(bytes([i]) * 4096 for i in range(4)))
    pool = ReadPool(4096, 2)
    fd = os.open(path, os.O_RDONLY)
    try:
        first = pool.read(fd, 4096, 0)
        held = memoryview(first)[:16]  # a consumer's view of it, as a hashing queue keeps
        del first
        second = pool.read(fd, 4096, 4096)
        del second  # released: its buffer is free again
        third = pool.read(fd, 4096, 8192)
        fourth = pool.read(fd, 4096, 12288)  # both buffers held: a fresh one
    finally:
        os.close(fd)
    assert bytes(held) == b"\0" * 16
    assert is_pooled(held) and is_pooled(third) and not is_pooled(fourth)
    assert bytes(third) == b"\2" * 4096 and bytes(fourth) == b"\3" * 4096
    assert (pool.reused, pool.fresh) == (3, 1)


class HoldingSink:
    """A sink that keeps the last ``depth`` pieces it was given, as a hashing thread's queue does, with
    the sha256 each had when it was given, and counts the pooled buffers among them."""

    def __init__(self, depth: int) -> None:
        self.held: deque[tuple[bytes | bytearray, bytes]] = deque(maxlen=depth)
        self.pooled: set[int] = set()
        self.writes = self.fresh = 0
        self.seen: list[bytes] = []

    def write(self, data: bytes | bytearray) -> int:
        for piece, digest in self.held:  # nothing held was refilled since it was given
            assert hashlib.sha256(piece).digest() == digest
        self.held.append((data, hashlib.sha256(data).digest()))
        self.writes += 1
        if is_pooled(data):
            self.pooled.add(id(data))  # (the pool keeps its buffers alive: an id is one buffer)
        else:
            self.fresh += 1
        return len(data)


def _disk(path: Path, size: int, data: list[tuple[int, int]]) -> Path:
    rnd = random.Random(7)
    with open(path, "wb") as f:
        for at, n in data:
            f.seek(at)
            f.write(rnd.randbytes(n))
        f.truncate(size)
    return path


def test_the_raw_producer_reads_into_a_bounded_set_of_reused_buffers(tmp_path: Path) -> None:
    size = 96 * MiB
    source = _disk(tmp_path / "disk.raw", size, [(0, 40 * MiB), (64 * MiB, 24 * MiB)])
    sink = HoldingSink(depth=8)
    fd = os.open(source, os.O_RDONLY)
    try:
        raw_producer(fd, size, ProgressTracker("exporting", size, None), None)(sink)
    finally:
        os.close(fd)
    chunks = size // CHUNK
    assert sink.writes == chunks and sink.fresh == chunks - 16  # the holes are the cached zero chunk
    assert len(sink.pooled) <= min(POOL, 8 + 2)


def test_the_vhd_writer_reads_its_blocks_into_a_bounded_set_of_reused_buffers(tmp_path: Path) -> None:
    size = 64 * MiB
    source = _disk(tmp_path / "disk.raw", size, [(0, 20 * MiB), (40 * MiB, 12 * MiB)])
    sink = HoldingSink(depth=8)
    fd = os.open(source, os.O_RDONLY)
    try:
        result = write_dynamic_vhd(fd, size, sink)
    finally:
        os.close(fd)
    assert result.blocks == 16
    assert len(sink.pooled) <= 8 + 2 and sink.writes - sink.fresh == 16
