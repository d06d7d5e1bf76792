"""The moto server the tests run (:mod:`tests.motoserver`): a part's ETag hashed while another request
hashes it too is still the part's MD5."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from moto.s3.models import FakeKey

from tests import motoserver


class _PausingBuffer(io.BytesIO):
    """A key's buffer whose first read waits, once ``reading`` is set, until ``go`` is set: the first hash
    of the key is caught between its seek and its read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reading, self.go = threading.Event(), threading.Event()

    def read(self, size: int | None = -1) -> bytes:
        if not self.reading.is_set():
            self.reading.set()
            assert self.go.wait(30)
        return super().read(size)


def _etags_of_two_overlapping_hashes(
    etag: Callable[[Any], str], *, second_may_finish: float
) -> tuple[str, str, bytes]:
    """The ETags two threads answer for one part when the second asks while the first is hashing, and the
    part's bytes. The first resumes once the second has finished, or after ``second_may_finish`` seconds
    (a second that waits for the first never finishes before it)."""
    data = os.urandom(1 << 20)
    key = FakeKey("part", b"", account_id="123456789012", region_name="us-east-1")
    buffer = _PausingBuffer(data)
    key._value_buffer = buffer  # (the attribute moto hashes: what makes the pause reachable)
    answers: dict[str, str] = {}
    first = threading.Thread(target=lambda: answers.__setitem__("first", etag(key)))
    second = threading.Thread(target=lambda: answers.__setitem__("second", etag(key)))
    first.start()
    assert buffer.reading.wait(30)
    second.start()
    # the second hash either waits for the first (locked) or runs through the buffer meanwhile (moto's own)
    second.join(second_may_finish)
    buffer.go.set()
    first.join(30)
    second.join(30)
    return answers["first"], answers["second"], data


def test_a_part_hashed_by_two_requests_at_once_answers_its_md5_to_both() -> None:
    # (whether the second has begun when the first resumes does not matter: under the lock it cannot
    # move the first's read position either way)
    first, second, data = _etags_of_two_overlapping_hashes(motoserver.locked_etag, second_may_finish=0.5)
    assert first == second == f'"{hashlib.md5(data).hexdigest()}"'


def test_moto_s_own_etag_still_loses_its_place_when_two_requests_hash_at_once() -> None:
    """The reason :mod:`tests.motoserver` exists. When this fails, moto hashes safely by itself and the
    wrapper can go."""
    unlocked = FakeKey.etag.fget
    assert unlocked is not None
    # the second runs through the buffer while the first is paused, however loaded the machine (moto's own
    # hash takes no lock: the second finishes at once; one that locked would hold the test 30 s, then fail)
    first, second, data = _etags_of_two_overlapping_hashes(unlocked, second_may_finish=30)
    if first == second == f'"{hashlib.md5(data).hexdigest()}"':
        pytest.fail("moto hashed both at once correctly: tests/motoserver.py is no longer needed")
