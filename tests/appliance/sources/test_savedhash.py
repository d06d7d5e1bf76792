"""Saved hashes (appliance.sources.savedhash): a digest carried across a saved state equals hashlib's
over the whole stream, and a state that does not fit its counters or its offset is refused."""

from __future__ import annotations

import hashlib
import itertools
import json
import random

import pytest

from appliance.sources.savedhash import SavedHash, available

pytestmark = pytest.mark.skipif(not available(), reason="libcrypto's SHA256_*/MD5_* are not available here")


@pytest.mark.parametrize("name", ["sha256", "md5"])
def test_a_digest_carried_across_saved_states_equals_hashlib_over_the_whole_stream(name: str) -> None:
    data = random.Random(7).randbytes(3 << 20)
    cuts = [0, 1, 63, 64, 65, 1000, 1 << 20, (1 << 20) + 7, len(data)]
    h = SavedHash(name)
    for a, b in itertools.pairwise(cuts):
        h.update(data[a:b])
        saved = json.loads(json.dumps(h.state()))  # as a checkpoint keeps it
        h = SavedHash(name)  # another process
        h.load(saved, b)
        assert h.length == b
        assert h.hexdigest() == hashlib.new(name, data[:b]).hexdigest()
    assert h.hexdigest() == hashlib.new(name, data).hexdigest()


def _tampered(state: str, offset: int, value: int) -> str:
    raw = bytearray.fromhex(state)
    raw[offset : offset + 4] = value.to_bytes(4, "little")
    return raw.hex()


@pytest.mark.parametrize(
    ("name", "field", "value", "why"),
    [
        ("sha256", 104, 64, "do not fit together"),  # num: the index OpenSSL writes its block buffer at
        ("sha256", 104, 1 << 31, "do not fit together"),
        ("md5", 88, 4096, "do not fit together"),
        ("sha256", 32, 8 * 99, "do not fit together"),  # Nl: a byte count that is not num's
        ("sha256", 108, 28, "another digest length"),  # md_len: a SHA-224 state
    ],
)
def test_a_tampered_state_is_refused_before_openssl_sees_it(
    name: str, field: int, value: int, why: str
) -> None:
    h = SavedHash(name)
    h.update(b"x" * 100)
    with pytest.raises(ValueError, match=why):
        SavedHash(name).load(_tampered(h.state(), field, value), 100)


def test_a_state_of_another_offset_or_shape_is_refused() -> None:
    h = SavedHash("sha256")
    h.update(b"x" * 100)
    with pytest.raises(ValueError, match="not of the 200 expected"):
        SavedHash("sha256").load(h.state(), 200)
    with pytest.raises(ValueError, match="not hex"):
        SavedHash("sha256").load("zz", 0)
    with pytest.raises(ValueError, match="bytes, not"):
        SavedHash("sha256").load(h.state()[:-2], 100)
