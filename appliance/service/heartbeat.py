"""The worker's heartbeat file (``STATE_DIR/worker.json``): written by the worker every poll, read by
health checks and by the reports to the controller.

A heartbeat is a small JSON object: ``pid``, ``host``, ``started_at``, ``updated_at``, ``status``
(``starting``, ``ok``, ``disabled``, ``stopped``), ``reason``, ``concurrency``, ``running`` (task ids)
and ``poll_interval``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ..atomicfile import write_atomic
from ..config import Config
from ..timestamps import parse_time, utc_now


def heartbeat_path(config: Config) -> Path:
    return config.paths.worker_heartbeat


def read_heartbeat(config: Config) -> dict[str, Any] | None:
    """The worker's last heartbeat, or None when there is none (or it cannot be read)."""
    try:
        beat = json.loads(heartbeat_path(config).read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None


def write_heartbeat(config: Config, beat: dict[str, Any]) -> None:
    """Replace the heartbeat file atomically. Not fsynced: a heartbeat lost to a crash is rewritten by
    the next poll, and one fsync a second would be paid by every other writer on the disk. 0600 like
    everything in the state directory (it names the tasks running): its readers run as the worker's user."""
    write_atomic(heartbeat_path(config), json.dumps(beat), 0o600, durable=False)


def heartbeat_age(beat: dict[str, Any], now: datetime | None = None) -> float:
    """Seconds since the heartbeat was written (:class:`ValueError` when it has no valid time)."""
    try:
        updated = parse_time(str(beat["updated_at"]))
    except KeyError:
        raise ValueError("no updated_at") from None
    return ((now or utc_now()) - updated).total_seconds()
