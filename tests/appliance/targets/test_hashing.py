"""The SHA-256 thread of the export writers (appliance.targets.hashing): the digest of private and shared
chunks in order is hashlib's; a writer far ahead through shared chunks is not held back; a finished digest
takes no more data."""

from __future__ import annotations

import hashlib
import os

import pytest

from appliance.targets.hashing import QUEUE_CHUNKS, ThreadedSha256


def test_mixed_private_and_shared_chunks_hash_as_hashlib_does() -> None:
    zero = bytes(1 << 20)
    pieces = [os.urandom(1000), zero, bytearray(b"abc" * 999), zero, memoryview(os.urandom(70_000)), zero]
    threaded = ThreadedSha256()
    plain = hashlib.sha256()
    buffer = bytearray(4096)
    for piece in pieces:
        threaded.update(piece, shared=piece is zero)
        plain.update(piece)
    # a reused buffer: the thread hashes the bytes as they were when queued
    buffer[:] = b"x" * 4096
    threaded.update(buffer)
    plain.update(bytes(buffer))
    buffer[:] = b"y" * 4096
    # many shared chunks queue without waiting for the thread (more than QUEUE_CHUNKS private ones could)
    for _ in range(QUEUE_CHUNKS * 8):
        threaded.update(zero, shared=True)
        plain.update(zero)
    assert threaded.hexdigest() == plain.hexdigest()
    with pytest.raises(ValueError):
        threaded.update(b"late")
