"""What each kind of live configuration change takes (:data:`CHANGES`, one entry per kind: the
user-data field, where it lands in the service configuration, the :class:`Effect` on each service),
which kinds differ between two configurations (:func:`changes`), and telling the services: the API's
graceful reload, a worker restart. Applying an update is :mod:`appliance.boot.live`'s.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

API_UNIT = "imaging-api.service"


class Effect(StrEnum):
    """What a service must do to take a change."""

    #: the worker re-reads the file between polls (nothing to send)
    WORKER_RELOADS = "worker re-reads between claims"
    #: gunicorn's graceful reload: new workers on the new file, in-flight requests finish
    API_RELOAD = "API graceful reload"
    #: the worker restarts: running tasks are suspended and resume (nothing undone)
    WORKER_RESTART = "worker restart"


@dataclass(frozen=True)
class Change:
    """One kind of change: the user-data field, where it lands in the service configuration, and
    what it takes to apply it."""

    field: str
    path: tuple[str, ...]
    effects: tuple[Effect, ...]
    note: str


W, A, R = Effect.WORKER_RELOADS, Effect.API_RELOAD, Effect.WORKER_RESTART

#: every kind of change, once; the README's table is this list
CHANGES: tuple[Change, ...] = (
    Change("api.credentials", ("api", "credentials"), (A,), "a rotated key works, a removed one is refused"),
    Change("api.bind", ("api", "bind"), (A,), "the arbiter re-binds"),
    Change("api.tls", ("api", "tls"), (A,), "certificate and key files rewritten, then reloaded"),
    Change("api.region", ("api", "region"), (A,), ""),
    Change(
        "limits.concurrent_tasks",
        ("worker", "concurrency"),
        (W, A),
        "new claims; running tasks are not stopped when it shrinks",
    ),
    Change(
        "limits.max_active_tasks",
        ("tasks", "max_active"),
        (A,),
        "the API refuses imports beyond it; tasks already accepted run",
    ),
    Change(
        "limits.task_*",
        ("worker", "task_*"),
        (R,),
        "the worker sets its task cgroups up once, at start",
    ),
    Change("limits.scratch", ("scratch",), (W, A), "new tasks reserve against the new quota"),
    Change("sources", ("sources",), (W, A), "new tasks"),
    Change("targets", ("targets",), (W, A), "new tasks"),
    Change("artifacts", ("artifacts",), (W, A), "new tasks"),
    Change(
        "hooks",
        ("hooks",),
        (W,),
        "new tasks; a worker restart too when the guest-mount privileges (systemd drop-in) change",
    ),
    Change(
        "controller",
        ("controller",),
        (W,),
        "endpoint rotation: the worker's reporter restarts; the next poll goes to the new URL "
        "(the secret is the registered one: rotating it is not supported)",
    ),
    Change("log_level", ("log_level",), (A,), "the API's; the worker's own from its next start"),
    Change(
        "store",
        ("store",),
        (A, R),
        "the task database: the worker's claims and leases live in the running one, so it restarts",
    ),
)


def _at(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = config
    for i, key in enumerate(path):
        if not isinstance(node, dict):
            return None
        if key.endswith("*"):
            return {k: v for k, v in node.items() if k.startswith(key[:-1])}
        node = node.get(key)
        if i == len(path) - 1:
            return node
    return node


def changes(
    old: dict[str, Any], new: dict[str, Any], old_files: dict[Path, str | None], new_files: dict[Path, str]
) -> list[Change]:
    """The kinds of change between two service configurations (and their TLS files)."""
    out = [c for c in CHANGES if _at(old, c.path) != _at(new, c.path)]
    tls = next(c for c in CHANGES if c.field == "api.tls")
    if tls not in out and any(old_files.get(p) != text for p, text in new_files.items()):
        out.append(tls)
    return out


def reload_api(api_pid_file: Path | None) -> str | None:
    """Ask the API for a graceful reload (SIGHUP to the pid in ``api_pid_file``, else ``systemctl
    reload``); None when done, else why not."""
    if api_pid_file is not None:
        try:
            pid = int(api_pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            return f"cannot signal the API ({api_pid_file}): {exc}"
        return None
    return systemctl("reload", API_UNIT)


def systemctl(verb: str, unit: str) -> str | None:
    """``systemctl VERB UNIT``; None when done, else why not (no systemd, or it failed)."""
    exe = shutil.which("systemctl")
    if exe is None or not Path("/run/systemd/system").is_dir():
        return f"systemd is not running: {unit} needs a {verb}"
    try:
        subprocess.run([exe, verb, unit], check=True, timeout=120, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"systemctl {verb} {unit} failed: {exc}"
    return None
