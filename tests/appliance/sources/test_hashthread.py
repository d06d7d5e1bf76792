"""The source digest hashed in a thread of its own: same digest as in line, states taken at exactly the
bytes put before them, errors brought back to the writer."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest

from appliance.sources.digest import StreamDigest
from appliance.sources.hashthread import HashingThread
from appliance.sources.savedhash import SavedHash, available


def pieces(seed: int = 1, count: int = 200) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(0, 300_000)) for _ in range(count)]


def test_a_digest_hashed_in_its_thread_equals_the_digest_of_the_stream_in_order() -> None:
    data = pieces()
    digest = StreamDigest()
    with HashingThread(digest.update, depth=2) as hasher:  # a short queue: the writer waits often
        for piece in data:
            hasher.put(piece)
        hasher.drain()
    assert digest.sha256 == hashlib.sha256(b"".join(data)).hexdigest()
    assert digest.size == sum(map(len, data))


def test_a_lagging_thread_still_hashes_every_piece_in_the_order_it_was_put() -> None:
    # the hashing thread is held while the writer puts everything: the queue must keep the order
    gate = threading.Event()
    seen: list[bytes] = []

    def slow(piece: bytes) -> None:
        gate.wait()
        seen.append(piece)

    data = [bytes([i]) * (i + 1) for i in range(20)]
    with HashingThread(slow, depth=64) as hasher:
        for piece in data:
            hasher.put(piece)
        gate.set()
        hasher.drain()
    assert seen == data


@pytest.mark.skipif(not available(), reason="libcrypto's SHA256 functions are not usable here")
def test_a_state_taken_by_call_covers_exactly_the_bytes_put_before_it() -> None:
    # what a checkpoint relies on: however far the thread lags, a state taken through call() is the
    # state after the pieces put before the call, and a resume from it gives the whole digest
    data = pieces(seed=2, count=60)
    sha = SavedHash("sha256")
    states: list[tuple[int, str]] = []
    offset = 0
    with HashingThread(sha.update, depth=4) as hasher:
        for i, piece in enumerate(data):
            hasher.put(piece)
            offset += len(piece)
            if i % 7 == 3:
                at = offset
                hasher.call(lambda at=at: states.append((at, sha.state())))
        hasher.drain()
    whole = b"".join(data)
    assert sha.hexdigest() == hashlib.sha256(whole).hexdigest()
    assert len(states) == len([i for i in range(len(data)) if i % 7 == 3])
    for at, state in states:
        resumed = SavedHash("sha256")
        resumed.load(state, at)  # refused unless the state's byte count is exactly ``at``
        resumed.update(whole[at:])
        assert resumed.hexdigest() == hashlib.sha256(whole).hexdigest()


def test_an_error_in_the_hashing_thread_is_raised_to_the_writer() -> None:
    def broken(piece: bytes) -> None:
        raise OSError("the digest broke")

    hasher = HashingThread(broken)
    try:
        hasher.put(b"x")
        with pytest.raises(OSError, match="the digest broke"):
            hasher.drain()
        with pytest.raises(OSError, match="the digest broke"):
            hasher.put(b"y")
    finally:
        hasher.close()


def test_a_view_of_a_reused_buffer_is_refused() -> None:
    buf = bytearray(b"abc")
    with HashingThread(lambda piece: None) as hasher, pytest.raises(TypeError):
        hasher.put(memoryview(buf))  # type: ignore[arg-type]
