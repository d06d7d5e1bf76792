"""The saved chunked digest (:mod:`appliance.targets.savedchunks`): the same ``sha256-chunked`` as the
file image target's (:func:`~appliance.targets.chunkdigest.digest_file`), whether or not its state was
saved and loaded again in the middle, at any offset (inside a chunk, at its end, inside a hole)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from appliance.sources.savedhash import available
from appliance.targets.chunkdigest import digest_file
from appliance.targets.savedchunks import SavedChunkedSha256

pytestmark = pytest.mark.skipif(not available(), reason="libcrypto's saved hashes are not available")

MiB = 1 << 20
CHUNK = 4 * MiB


def disk(tmp_path: Path) -> bytes:
    """Data, a hole that fills whole chunks, data after zeros inside a chunk, a short last chunk."""
    rnd = random.Random(3)
    data = rnd.randbytes(5 * MiB) + bytes(9 * MiB) + rnd.randbytes(MiB + 7) + bytes(2 * MiB)
    (tmp_path / "disk.raw").write_bytes(data)
    return data


@pytest.mark.parametrize("cut", [0, 3 * MiB, 4 * MiB, 9 * MiB, 13 * MiB + 5, 15 * MiB, 17 * MiB + 1])
def test_a_chunked_digest_saved_and_loaded_at_any_offset_is_the_file_targets(
    tmp_path: Path, cut: int
) -> None:
    data = disk(tmp_path)
    expected = digest_file(tmp_path / "disk.raw", chunk_size=CHUNK)
    first = SavedChunkedSha256(CHUNK)
    for at in range(0, cut, MiB):  # written as the parts are cut
        first.update(data[at : min(at + MiB, cut)])
    state = json.loads(json.dumps(first.state()))  # as it goes through the task store
    second = SavedChunkedSha256.load(state, cut)
    second.update(data[cut:])
    got = second.result()
    assert (got.hexdigest, got.chunks, got.size) == (expected.hexdigest, expected.chunks, len(data))
    assert len(json.dumps(state)) < 700  # a state of constant size, whatever the offset


def test_a_state_loaded_at_another_offset_than_its_own_is_refused(tmp_path: Path) -> None:
    data = disk(tmp_path)
    h = SavedChunkedSha256(CHUNK)
    h.update(data[: 6 * MiB])
    for wrong in (6 * MiB - 1, 6 * MiB + 64, 10 * MiB):
        with pytest.raises(ValueError):
            SavedChunkedSha256.load(h.state(), wrong)
    assert SavedChunkedSha256.load(h.state(), 6 * MiB).size == 6 * MiB
