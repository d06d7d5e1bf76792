"""The early flush of a written volume (:mod:`appliance.targets.earlyflush`) on a real file: its error is
kept for every hand-over until the volume is discarded. The error is ``EIO`` raised in place of the
thread's ``fsync`` (a disk that fails its writeback is not something a test can borrow)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ImagingError
from appliance.targets import earlyflush


def test_a_failed_early_flush_fails_every_hand_over_until_the_volume_is_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = tmp_path / "vol.raw"
    volume.write_bytes(b"disk" * 1024)
    real = os.fsync

    def failing(fd: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing)
    fd = os.open(volume, os.O_RDWR)
    try:
        earlyflush.start(fd, volume)
    finally:
        os.close(fd)  # the flush has its own descriptor
    monkeypatch.setattr(os, "fsync", real)
    for _ in range(2):  # a hand-over tried again fails again: its own fsync would not see the error
        with pytest.raises(ImagingError) as exc:
            earlyflush.finish(volume, "volume vol-1")
        assert exc.value.code == "TargetWriteFailed"
    earlyflush.discard(volume)
    earlyflush.finish(volume, "volume vol-1")  # nothing pending any more: no error
