"""Page-cache residency for the tests of appliance.pagecache and its users: util-linux ``fincore``
against the real kernel."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

MiB = 1 << 20


def cached(path: Path) -> int:
    """Bytes of ``path`` in the page cache now."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


def evict(path: Path) -> None:
    """Write ``path`` out and drop it from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert cached(path) == 0


def read_all(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(4 * MiB):
            pass


def random_file(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    return path
