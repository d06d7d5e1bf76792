"""Fixtures shared by the image tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.config import Config


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    """The embedded defaults, with the state (and so the scratch) under the test's directory."""
    return config_mod.from_dict({"state_dir": str(tmp_path / "state")}, base_dir=tmp_path)
