"""Loop devices for tests: a backing file the test prepared, attached to a free loop device of its own and
always detached afterwards; the test is skipped where losetup is missing or cannot attach (a container
without loop devices)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def attached(backing: Path) -> Iterator[Path]:
    """The loop device over ``backing`` (read-write) while the block runs."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    proc = subprocess.run(["losetup", "--show", "-f", str(backing)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {proc.stderr.strip()}")
    dev = Path(proc.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)
