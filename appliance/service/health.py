"""Self-checks behind ``GET /v1/health``: what load balancers and cloud-init probes see.

The overall status is the worst check: a *critical* check that fails (the task database is
unusable, ``qemu-img`` is missing) makes the service ``disabled`` (HTTP 503: nothing can be imported
here, take it out of rotation); any other problem (scratch short of space, no fresh worker
heartbeat, per-task caps that are configured but not enforced, untrusted-input parsers without a
private network namespace) makes it ``degraded`` (HTTP 200: requests are still accepted, tasks may wait).
Every failing check carries a ``reason`` a human can act on.

A task database that cannot be *reached* (PostgreSQL restarting or failing over, the network to it
down) is an outage, not a broken appliance: its check fails with ``transient: true`` and the service
is ``degraded``, not ``disabled``. The worker claims nothing meanwhile and its running tasks go on,
the API answers ``ServiceUnavailable`` to what needs the database, and nothing is lost: all of it
picks up when the database answers again. Taking every appliance of a fleet out of rotation because
their shared database blinked would turn a short outage into a long one. A database that answers
but cannot be used (written by newer code, corrupt, refusing the credentials) disables the service.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..config import Config
from ..errors import StoreUnavailable
from ..image.qemuimg import availability
from ..store import Store
from .heartbeat import heartbeat_age, read_heartbeat

OK, DEGRADED, DISABLED = "ok", "degraded", "disabled"
#: per-check statuses; ``unknown`` never changes the overall status
PASS, WARN, FAIL, UNKNOWN = "ok", "warning", "failed", "unknown"
#: checks whose failure disables the service (no task can run without them)
CRITICAL = frozenset({"store", "qemu_img"})


def check_store(open_store: Callable[[], Store]) -> dict[str, Any]:
    """The task database opens and answers a read."""
    try:
        store = open_store()
        version = store.schema_version  # a real read of the catalogue, not just an open handle
    except StoreUnavailable as exc:
        return {
            "status": FAIL,
            "transient": True,
            "reason": f"task database unreachable: {exc.message}; no task is claimed and writes are "
            "refused until it is back",
        }
    except Exception as exc:  # any other failure here means "cannot serve", whatever its type
        return {"status": FAIL, "reason": f"task database unusable: {exc}"}
    return {"status": PASS, "schema_version": version, "backend": store.dialect}


def check_qemu_img() -> dict[str, Any]:
    """``qemu-img`` is on PATH and runs."""
    path, version, problem = availability()
    if problem is not None:
        return {"status": FAIL, "reason": f"{problem}; no image can be converted"}
    return {"status": PASS, "path": path, "version": version}


def check_scratch(config: Config) -> dict[str, Any]:
    """The scratch root exists, a file can be created in it, and free space is above ``scratch.min_free``."""
    root = config.scratch.root
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A real create+delete: os.access() says nothing about read-only mounts or a full inode table.
        with tempfile.NamedTemporaryFile(dir=root, prefix=".health-"):
            pass
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return {"status": FAIL, "reason": f"scratch root {root} is not writable: {exc.strerror or exc}"}
    result: dict[str, Any] = {
        "status": PASS,
        "free_bytes": free,
        "min_free_bytes": config.scratch.min_free,
        "quota_bytes": config.scratch.quota,
    }
    if free < config.scratch.min_free:
        result.update(
            status=WARN,
            reason=f"scratch root {root} has {free} bytes free, below scratch.min_free "
            f"({config.scratch.min_free}); new conversions needing scratch will be refused",
        )
    return result


def check_worker(config: Config, now: datetime | None = None) -> dict[str, Any]:
    """The task worker wrote a heartbeat recently and reports itself ``ok``."""
    beat = read_heartbeat(config)
    if beat is None:
        return {"status": FAIL, "reason": "no worker heartbeat: is `imaging worker` running?"}
    poll = float(beat.get("poll_interval") or config.worker.poll_interval)
    # A worker silent for longer than a task lease has lost its tasks to recovery anyway.
    stale_after = max(float(config.lease_seconds), 3 * poll)
    try:
        age = heartbeat_age(beat, now)
    except ValueError:
        return {"status": FAIL, "reason": "worker heartbeat is unreadable"}
    result: dict[str, Any] = {
        "status": PASS,
        "age_seconds": round(age, 3),
        "stale_after_seconds": stale_after,
        "worker_status": beat.get("status"),
        "running": len(beat.get("running") or ()),
    }
    if age > stale_after:
        result.update(
            status=FAIL, reason=f"worker heartbeat is {age:.0f}s old (stale after {stale_after:.0f}s)"
        )
    elif beat.get("status") != "ok":
        reason = beat.get("reason") or f"worker status is {beat.get('status')!r}"
        result.update(status=FAIL, reason=f"worker: {reason}")
    return result


def check_task_limits(config: Config) -> dict[str, Any]:
    """The per-task caps (``worker.task_*``) are enforced, as the worker reports (``task_limits``)."""
    beat = read_heartbeat(config)
    limits = (beat or {}).get("task_limits")
    if not isinstance(limits, dict):
        return {"status": UNKNOWN, "reason": "no worker heartbeat says how tasks are capped"}
    caps = limits.get("caps") or {}
    result: dict[str, Any] = {"status": PASS, "caps": caps, "cgroup": limits.get("cgroup")}
    if caps and not limits.get("enforced"):
        result.update(
            status=WARN,
            reason=f"per-task caps {', '.join(caps)} are configured but not enforced: "
            f"{limits.get('reason') or 'unknown reason'}",
        )
    return result


def check_confinement(config: Config) -> dict[str, Any]:
    """Untrusted-input parsers run in a private network namespace, as the worker reports."""
    beat = read_heartbeat(config)
    confinement = (beat or {}).get("confinement")
    if not isinstance(confinement, dict):
        return {"status": UNKNOWN, "reason": "no worker heartbeat says how parsers are confined"}
    if confinement.get("network") is None:
        reason = confinement.get("reason") or "no network isolation"
        return {"status": WARN, "network": None, "reason": reason}
    return {"status": PASS, "network": confinement["network"]}


def overall(checks: dict[str, dict[str, Any]]) -> tuple[str, str | None]:
    """(``ok``|``degraded``|``disabled``, the first reason for it). A failed critical check marked
    ``transient`` (an outage) degrades the service instead of disabling it."""
    critical = [
        c["reason"]
        for n, c in checks.items()
        if n in CRITICAL and c["status"] == FAIL and not c.get("transient")
    ]
    if critical:
        return DISABLED, critical[0]
    others = [c["reason"] for c in checks.values() if c["status"] in (FAIL, WARN)]
    if others:
        return DEGRADED, others[0]
    return OK, None


def health(config: Config, open_store: Callable[[], Store], version: str) -> dict[str, Any]:
    """The health document (``status``, ``reason``, ``checks``, ``version``)."""
    checks = {
        "store": check_store(open_store),
        "qemu_img": check_qemu_img(),
        "scratch": check_scratch(config),
        "worker": check_worker(config),
        "task_limits": check_task_limits(config),
        "confinement": check_confinement(config),
    }
    status, reason = overall(checks)
    doc: dict[str, Any] = {"status": status, "checks": checks, "version": version}
    if reason is not None:
        doc["reason"] = reason
    return doc
