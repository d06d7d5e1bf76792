"""The files a live configuration update keeps next to the running configuration: the applied
(or last refused) version (``imaging.yaml.version``), the configuration before the last update
(``imaging.yaml.prev``), and the version a report reply announced (``STATE_DIR/config-announced``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..atomicfile import write_atomic
from ..errors import ConfigError
from ..paths import StatePaths


def version_file(config: Path) -> Path:
    """Where the applied configuration version is recorded."""
    return config.with_name(config.name + ".version")


def previous_file(config: Path) -> Path:
    """The configuration before the last live update (for a rollback)."""
    return config.with_name(config.name + ".prev")


def applied_version(config: Path) -> int | None:
    """The version of the last configuration applied live; None when none was or the file is unreadable."""
    try:
        value = json.loads(version_file(config).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def refused_version(config: Path) -> int | None:
    """The version last refused (and told to the controller), if any."""
    try:
        value = json.loads(version_file(config).read_text()).get("refused")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def load_current(config: Path) -> dict[str, Any]:
    """The running configuration as a mapping (:class:`ConfigError` when it cannot be read)."""
    try:
        doc = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the running configuration {config}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"the running configuration {config} is not a mapping")
    return doc


def record(config: Path, data: dict[str, Any]) -> None:
    """Record the applied (and the refused) version next to the configuration."""
    write_atomic(version_file(config), json.dumps(data) + "\n", 0o644, None)


def announced_version(state_dir: Path) -> int | None:
    """The version a pushed report's reply announced (:mod:`appliance.report.push`), if any."""
    try:
        return int(StatePaths(state_dir).config_announced.read_text().strip())
    except (OSError, ValueError):
        return None
