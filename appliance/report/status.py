"""What the appliance says about itself and its tasks: health, capacity, task progress snapshots."""

from __future__ import annotations

import time
from typing import Any

from .. import __version__
from ..boot.rendezvous import local_addresses
from ..config import Config
from ..database import POSTGRESQL
from ..scratch import ScratchSpace
from ..service import health as health_mod
from ..service.importviews import boot_settings, guest_report
from ..service.provenance import provenance_of
from ..store import REPORTER_RECORD, Store, Task, TaskState

ACTIVE = (TaskState.RUNNING, TaskState.CANCELLING)


class RateTracker:
    """Transfer rate and ETA per task from successive samples of its byte counters."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, str | None, int]] = {}

    def sample(
        self, task_id: str, phase: str | None, done: int | None, total: int | None, now: float | None = None
    ) -> tuple[float | None, float | None]:
        """(bytes per second, seconds left) since the previous sample of the same phase, else Nones."""
        now = time.monotonic() if now is None else now
        if done is None:
            return None, None
        previous = self._last.get(task_id)
        self._last[task_id] = (now, phase, done)
        if previous is None or previous[1] != phase or now <= previous[0]:
            return None, None
        rate = max(0.0, (done - previous[2]) / (now - previous[0]))
        eta = (total - done) / rate if rate > 0 and total is not None and total >= done else None
        return round(rate, 1), None if eta is None else round(eta, 1)

    def forget(self, task_id: str) -> None:
        self._last.pop(task_id, None)


def task_snapshot(task: Task, rates: RateTracker | None = None) -> dict[str, Any]:
    """The reportable state of a task: progress, sub-state (phase), error, findings, boot settings and
    (once recorded: a completed import or export) its provenance record."""
    rate, eta = (None, None)
    if rates is not None:
        rate, eta = rates.sample(task.id, task.phase, task.bytes_done, task.bytes_total)
    error = {"code": task.error_code, "message": task.error_message} if task.error_code else None
    return {
        "id": task.id,
        "kind": task.kind,
        "state": str(task.state),
        "phase": task.phase,
        "status_message": task.status_message,
        "bytes_done": task.bytes_done,
        "bytes_total": task.bytes_total,
        "bytes_converted": task.bytes_converted,
        "percent": task.percent,
        "rate": rate,
        "eta": eta,
        "error": error,
        "findings": task.findings,
        "cancel_reason": task.cancel_reason,
        # kernel/ramdisk/virtualization type and guest layout to register an imported image with
        "boot": boot_settings(task, guest_report(task.result)),
        # added in ver 1 (optional, additive): null until the task recorded one
        "provenance": provenance_of(task),
    }


def health(config: Config, store: Store) -> tuple[str, str | None]:
    """``ok``, ``degraded`` or ``disabled`` with the first reason: the checks of ``GET /v1/health``."""
    doc = health_mod.health(config, lambda: store, __version__)
    return doc["status"], doc.get("reason")


def scratch_free(config: Config) -> int | None:
    """Bytes of scratch that tasks could still reserve, or None when scratch cannot be measured."""
    try:
        return ScratchSpace.from_config(config).free()
    except Exception:  # a missing or broken scratch root must not stop the heartbeat
        return None


def heartbeat(
    config: Config, store: Store, rates: RateTracker, backlog: int, *, appliance: str | None = None
) -> dict[str, Any]:
    """The payload of a heartbeat message. With ``appliance`` on a store appliances share
    (PostgreSQL), its tasks are those that appliance runs: its own heartbeat, not the fleet's."""
    status, reason = health(config, store)
    running = store.list_tasks(list(ACTIVE), limit=None)
    if appliance is not None and store.dialect == POSTGRESQL:
        running = [t for t in running if store.record(t.id, REPORTER_RECORD) == appliance]
    slots = config.worker.concurrency
    return {
        "type": "heartbeat",
        "health": status,
        "reason": reason,
        # every heartbeat: the controller records a change of address (DHCP, a new interface)
        "addresses": local_addresses(config.controller.url),
        "version": __version__,
        "capacity": {
            "task_slots": slots,
            "free_task_slots": max(0, slots - len(running)),
            "scratch_free": scratch_free(config),
        },
        "tasks": [task_snapshot(t, rates) for t in running],
        "outbox_backlog": backlog,
    }
