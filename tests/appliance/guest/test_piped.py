"""The guest probe served over its pipes (validate_ranges) reads a disk exactly as the probe reading the
file does (the real confined child, real disks from guestfactory), and a read failure on the parent's
side is raised, not turned into a finding about the image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.errors import ImagingError
from appliance.guest.validate import validate_image, validate_ranges
from tests import guestfactory

pytestmark = pytest.mark.slow


def file_reader(path: Path, reads: list[tuple[int, int]]) -> Callable[[int, int], bytes]:
    def read_at(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return read_at


@pytest.mark.parametrize("make", ["data_disk", "linux_disk"])
def test_the_piped_probe_reports_what_the_probe_reading_the_file_reports(make: str, tmp_path: Path) -> None:
    disk = getattr(guestfactory, make)(tmp_path)
    reads: list[tuple[int, int]] = []
    piped = validate_ranges(file_reader(disk, reads), disk.stat().st_size, "raw", workdir=tmp_path)
    direct = validate_image(disk, "raw", workdir=tmp_path)
    assert piped.to_dict() == direct.to_dict()
    # every read the parent answered lay inside the disk
    assert reads and all(o >= 0 and o + n <= disk.stat().st_size for o, n in reads)


def test_a_read_failure_of_the_parent_is_raised_not_reported_as_an_unreadable_guest(tmp_path: Path) -> None:
    def failing(offset: int, length: int) -> bytes:
        raise ImagingError("the object store went away", code="UploadFailed")

    with pytest.raises(ImagingError) as exc:
        validate_ranges(failing, 1 << 20, "raw", workdir=tmp_path)
    assert exc.value.code == "UploadFailed"
    assert list(tmp_path.iterdir()) == []  # the probe's private directory is gone
