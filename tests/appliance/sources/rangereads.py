"""What the tests of the ranged reader share (:mod:`appliance.sources.reader` and the modules it reads
with: :mod:`~appliance.sources.retrier`, :mod:`~appliance.sources.rangecheck`,
:mod:`~appliance.sources.rangebuffers`): the settings of these tests and reading a reader out. Their
servers are the fixtures of ``conftest.py``."""

from __future__ import annotations

import dataclasses

from appliance.sources.ranges import ReaderSettings
from appliance.sources.reader import RangeReader

RS = 64 * 1024  # range size of these tests
SETTINGS = ReaderSettings(
    parallel=3, range_size=RS, stall_seconds=5, retries=2, backoff=0.01, backoff_max=0.05
)
ONE_BY_ONE = dataclasses.replace(SETTINGS, parallel=1)  # requests in a known order, for scripted answers


def read_all(reader: RangeReader, n: int = 100_000) -> bytes:
    out = bytearray()
    with reader:
        while chunk := reader.read(n):
            out += chunk
    return bytes(out)


def hand_over(reader: RangeReader, got: bytearray) -> None:
    """Read everything into ``got`` (what was handed over stays there when the read fails)."""
    with reader:
        while chunk := reader.read(10_000):
            got += chunk
