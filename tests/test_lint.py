"""The code stays as `make lint` wants it: ruff's checks and format, and mypy's types.

`.ci/run` runs `make test`, so this is where a change that breaks lint fails CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PATHS = ["appliance", "api", "tests", "bench"]

pytestmark = pytest.mark.slow


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    checked = _run(str(BIN / "ruff"), "check", *PATHS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    formatted = _run(str(BIN / "ruff"), "format", "--check", *PATHS)
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr


def test_mypy_finds_nothing() -> None:
    # the files and options are in pyproject.toml ([tool.mypy]); the cache is the checkout's own
    typed = _run(str(BIN / "mypy"))
    assert typed.returncode == 0, typed.stdout + typed.stderr
