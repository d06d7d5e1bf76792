"""Fixtures shared by the image tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.config import Config
from tests.ovaproducers import two_disks


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    """The embedded defaults, with the state (and so the scratch) under the test's directory."""
    return config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)


@pytest.fixture
def sources(tmp_path: Path) -> list[Path]:
    """A boot disk and a data disk as RAW (:func:`tests.ovaproducers.two_disks`), in their own directory."""
    return two_disks(tmp_path / "sources")
