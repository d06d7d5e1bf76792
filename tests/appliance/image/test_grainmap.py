"""The bitmap of grains (appliance.image.grainmap): the runs of grains never written, and the
checkpoint form read back as untrusted (the decoder's tampered-checkpoint cases are in
test_vmdkstream)."""

from __future__ import annotations

import base64
import zlib

import pytest

from appliance.image.grainmap import pack, unpack, unset_runs


def test_the_runs_of_unwritten_grains_cover_every_clear_bit_and_stop_at_the_last_grain() -> None:
    bitmap = bytearray(4)  # 32 bits, a disk of 27 grains
    for g in (0, 1, 5, 8, 9, 10, 11, 12, 13, 14, 15, 26):
        bitmap[g >> 3] |= 1 << (g & 7)
    assert unset_runs(bitmap, 27) == [(2, 5), (6, 8), (16, 26)]
    assert unset_runs(bytearray(2), 13) == [(0, 13)]
    assert unset_runs(bytearray(b"\xff\x01"), 9) == []


def test_a_packed_bitmap_unpacks_to_itself_for_its_disk_and_to_nothing_else() -> None:
    bitmap = bytearray(b"\x01\x00\xf0\x07")  # 27 grains: the top bits of the last byte clear
    assert unpack(pack(bitmap), 27) == bitmap
    with pytest.raises(ValueError, match="does not fit the header"):
        unpack(pack(bitmap), 40)  # another disk's length
    with pytest.raises(ValueError, match="beyond the capacity"):
        unpack(pack(bitmap), 26)  # grain 26 is set: past a disk of 26 grains
    with pytest.raises(ValueError, match="does not decode"):
        unpack("not base64!", 27)
    trailing = base64.b64encode(zlib.compress(bytes(bitmap)) + b"x").decode()
    with pytest.raises(ValueError, match="does not fit the header"):
        unpack(trailing, 27)
