"""The RAW side of an export (appliance.targets.exportraw) on a real file: the source's next data ranges are
asked for ahead of the reads (``POSIX_FADV_WILLNEED``), across its holes, where the kernel's own read-ahead
stops at every hole."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import pytest

from appliance.progress import ProgressTracker
from appliance.targets.exportraw import READ_AHEAD, raw_producer

MiB = 1 << 20


class RecordingSink:
    """A file destination's kind of sink (``write`` and ``write_zeros``) that records its writes in
    ``events``, beside the read-ahead requests the test records there."""

    def __init__(self, events: list[tuple[str, int, int]]) -> None:
        self.events = events
        self.written = 0

    def write(self, data: bytes) -> int:
        self.events.append(("write", self.written, len(data)))
        self.written += len(data)
        return len(data)

    def write_zeros(self, n: int) -> None:
        self.written += n


def test_the_data_after_a_hole_is_asked_for_before_the_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # data at [0, 4 MiB) and [64 MiB, 72 MiB), a hole between: far beyond the kernel's own read-ahead of
    # the first range (it starts again only when the reads reach the second), within the export's
    source = tmp_path / "disk.raw"
    rnd = random.Random(3)
    second = (64 * MiB, 72 * MiB)
    assert 4 * MiB + (second[1] - second[0]) <= READ_AHEAD
    with open(source, "wb") as f:
        f.write(rnd.randbytes(4 * MiB))
        f.seek(second[0])
        f.write(rnd.randbytes(second[1] - second[0]))
        f.truncate(80 * MiB)
    events: list[tuple[str, int, int]] = []
    advise = os.posix_fadvise

    def recorded(fd: int, offset: int, length: int, advice: int) -> None:
        # the kernel is asked for real: only the order is recorded here
        if advice == os.POSIX_FADV_WILLNEED:
            events.append(("will-need", offset, length))
        advise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", recorded)
    sink = RecordingSink(events)
    fd = os.open(source, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        raw_producer(fd, size, ProgressTracker("exporting", size, None), None)(sink)
    finally:
        os.close(fd)
    assert sink.written == 80 * MiB
    first_write = events.index(("write", 0, 4 * MiB))
    asked = sorted((at, at + n) for kind, at, n in events[:first_write] if kind == "will-need")
    covered = sum(
        min(end, second[1]) - max(at, second[0]) for at, end in asked if end > second[0] and at < second[1]
    )
    assert covered == second[1] - second[0]  # the whole second range, before the first write


class _Stop(Exception):
    pass


class _FirstWrite:
    """An upload-like sink (no ``write_zeros``) that ends the export at its first write."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        raise _Stop


def test_an_upload_of_a_huge_sparse_disk_plans_its_chunks_as_it_goes(tmp_path: Path) -> None:
    """The chunks of a 4 TiB disk (a million of them, each sent to an upload as data or zeros) are not
    listed before the first one is written: the plan is walked as the export goes, whatever the size."""
    source = tmp_path / "huge.raw"
    with open(source, "wb") as f:
        f.truncate(4 << 40)
        f.write(b"x" * (1 << 20))
        f.seek(3 << 40)
        f.write(b"y" * (1 << 20))
    fd = os.open(source, os.O_RDONLY)
    sink = _FirstWrite()
    tracemalloc.start()
    try:
        with pytest.raises(_Stop):
            raw_producer(fd, 4 << 40, ProgressTracker("exporting", 4 << 40, None), None)(sink)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        os.close(fd)
    assert peak < 16 << 20  # a list of a million chunk tuples alone is ~80 MiB
