"""InOrderSink: decoder writes at ascending offsets become one byte stream with the gaps zero-filled; a
write behind the stream is ``UnsupportedFormat.GrainOrder``, one beyond the disk ``CorruptImage``."""

from __future__ import annotations

import pytest

from appliance.errors import ImageRejected
from appliance.targets.inorder import ZERO_CHUNK, InOrderSink


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()
        self.calls = 0

    def write(self, data: bytes) -> int:
        self.data += data
        self.calls += 1
        return len(data)


def test_writes_with_gaps_and_zero_ranges_become_the_disk_in_order_padded_to_its_size() -> None:
    out = Collect()
    sink = InOrderSink(out, capacity=10 * ZERO_CHUNK)
    sink.write(0, b"a" * 100)
    sink.zero(100, 3 * ZERO_CHUNK)  # nothing to send: the next write fills the gap
    sink.write(3 * ZERO_CHUNK + 7, b"b" * 10)
    sink.zero(0, 50)  # behind the stream: already zeros or data, nothing to do
    sink.finish(4 * ZERO_CHUNK)
    expected = bytearray(4 * ZERO_CHUNK)
    expected[0:100] = b"a" * 100
    expected[3 * ZERO_CHUNK + 7 : 3 * ZERO_CHUNK + 17] = b"b" * 10
    assert out.data == expected
    assert sink.position == 4 * ZERO_CHUNK and sink.data_bytes == 110


def test_a_write_behind_the_stream_is_grain_order_and_one_beyond_the_disk_corrupt() -> None:
    sink = InOrderSink(Collect(), capacity=4 * ZERO_CHUNK)
    sink.write(ZERO_CHUNK, b"x" * 512)
    with pytest.raises(ImageRejected) as behind:
        sink.write(0, b"y" * 512)
    assert behind.value.code == "UnsupportedFormat.GrainOrder"
    assert f"offset 0 after offset {ZERO_CHUNK + 512}" in behind.value.message
    with pytest.raises(ImageRejected) as beyond:
        sink.write(4 * ZERO_CHUNK, b"z")
    assert beyond.value.code == "CorruptImage"
    with pytest.raises(ImageRejected) as short:
        sink.finish(ZERO_CHUNK)  # data already past the size the decoder ends with
    assert short.value.code == "CorruptImage"
