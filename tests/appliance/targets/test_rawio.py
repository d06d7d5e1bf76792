"""RawWriter (appliance.targets.rawio) on real files: what its zero detection keeps in memory."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.image import decoding
from appliance.targets import rawio
from tests.loopdevs import attached


def _cached_zero_bytes() -> int:
    """Bytes of zero buffers this process keeps for comparisons (rawio's own, if it has one, too)."""
    own = getattr(rawio, "_ZERO_BUFFERS", {})
    return sum(own) + sum(decoding._ZERO_BUFFERS)


def test_writes_of_many_lengths_keep_the_zero_buffers_bounded_and_leave_holes(tmp_path: Path) -> None:
    """A long-lived worker writes chunks of every length a decoder's zero runs make (each 4 KiB
    multiple up to 1 MiB: 128 MiB of zero buffers, one per length, before): the shared buffers stay
    under their 64 MiB bound, and every all-zero chunk is still a hole."""
    path = tmp_path / "disk.raw"
    size = 2 * (1 << 20) * 256
    with open(path, "wb") as f:
        f.truncate(size)
    with rawio.RawWriter(path, zeroed=True, error=lambda exc: None) as out:
        offset = 0
        for n in range(4096, (1 << 20) + 1, 4096):
            out.write(offset, bytes(n))  # all zeros: skipped
            out.write(offset + n, memoryview(b"\x01" * 4096))  # data
            offset += n + 4096
    assert _cached_zero_bytes() <= decoding._ZERO_CACHE_BYTES
    assert os.stat(path).st_blocks * 512 <= 256 * 4096 * 2  # only the data blocks are allocated


def test_a_caller_that_found_a_chunk_zero_or_not_is_taken_at_its_word(tmp_path: Path) -> None:
    """``zero=`` spares the writer a second pass over a chunk its caller checked already: ``zero=True``
    makes the range read as zeros on a target holding old data (nothing written), ``zero=False``
    writes the chunk as it is, even all-zero bytes (allocated, not a hole)."""
    path = tmp_path / "disk.raw"
    block = 1 << 16
    path.write_bytes(b"\xee" * (4 * block))  # stale data everywhere
    with rawio.RawWriter(path, zeroed=False, error=lambda exc: None) as out:
        out.write(0, b"\x01" * block, zero=True)  # the caller said zero: the range is zeroed
        out.write(block, bytes(block), zero=False)  # the caller said data: written out
        out.write(2 * block, b"\x02" * block)  # no hint: checked here, written
        out.flush()
    data = path.read_bytes()
    assert data[:block] == bytes(block)
    assert data[block : 2 * block] == bytes(block)
    assert data[2 * block : 3 * block] == b"\x02" * block
    assert data[3 * block :] == b"\xee" * block


def test_a_disk_size_is_the_whole_length_of_a_sparse_file_and_of_a_block_device(tmp_path: Path) -> None:
    # a disk is mostly holes: its size is its length, not the blocks it holds; a block device's st_size
    # is 0, so only its end tells
    backing = tmp_path / "disk.raw"
    with backing.open("wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"data")
    assert rawio.disk_size(backing) == 3 << 20
    assert os.stat(backing).st_blocks * 512 < 3 << 20
    with attached(backing) as dev:
        assert os.stat(dev).st_size == 0
        assert rawio.disk_size(dev) == 3 << 20
