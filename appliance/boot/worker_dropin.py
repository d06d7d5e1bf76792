"""The systemd drop-in that lets the appliance's worker mount guests, present only while it is needed.

``imaging-worker.service`` runs as ``imaging`` with no capabilities and no loop devices. Hooks that
mount the guest (:func:`appliance.hooks.privileges.privileged_hooks`) need root, ``CAP_SYS_ADMIN``
(losetup, partx, mount), ``CAP_SYS_CHROOT`` and, to write guest files owned by other users and to
read the ``imaging``-owned config, ``CAP_DAC_OVERRIDE``, ``CAP_CHOWN`` and ``CAP_FOWNER``. The
drop-in grants exactly that plus the loop devices; every other sandbox setting of the unit stays.

It lives under ``/run/systemd/system`` (volatile: each boot's ``imaging configure`` decides afresh,
and ``/run`` is writable under the configure unit's ``ProtectSystem=full``).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..atomicfile import write_atomic
from ..paths import IMAGE_STATE

log = logging.getLogger(__name__)

WORKER_UNIT = "imaging-worker.service"
DEFAULT_UNIT_DIR = Path("/run/systemd/system")
DROPIN_NAME = "guest-hooks.conf"
#: the task database of the appliance (state_dir of appliance.boot.userdata)
DEFAULT_DB = IMAGE_STATE.db
#: the capabilities the guest-mounting hooks need, and nothing else
CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_DAC_OVERRIDE", "CAP_CHOWN", "CAP_FOWNER")


def dropin_path(unit_dir: Path) -> Path:
    """Where the worker's drop-in goes under ``unit_dir``."""
    return unit_dir / f"{WORKER_UNIT}.d" / DROPIN_NAME


def render_dropin(reasons: list[str], db_path: Path | None = DEFAULT_DB) -> str:
    """The drop-in text; ``reasons`` (the hooks that need it) go into its header comment.
    ``db_path``: the SQLite task database (None: the tasks are in PostgreSQL, no file to create)."""
    # one comment line each whatever the names hold (a schema pattern's '$' lets a final newline through)
    why = "".join(f"#   {' '.join(r.split())}\n" for r in reasons)
    # a task database root created would be 0640 root:imaging and read-only to the API: create it
    # first (noclobber: never over the API's) as an empty file, which SQLite takes as a new database
    create_db = ""
    if db_path is not None:
        db = shlex.quote(str(db_path))
        create_db = (
            f"ExecStartPre=+-/bin/sh -c 'set -C; {{ : > {db}; }} 2>/dev/null && chown imaging:imaging {db}'\n"
        )
    return (
        "# Written by `imaging configure`; removed by it when no configured hook mounts the guest.\n"
        "# These hooks mount guest filesystems (loop devices, mount, chroot), which needs root:\n"
        f"{why}"
        # the kernel's loop driver may be a module, and ProtectKernelModules= keeps the worker from loading it
        "[Unit]\n"
        "Wants=modprobe@loop.service\n"
        "After=modprobe@loop.service\n"
        "[Service]\n"
        "User=root\n"
        # the API (user imaging) shares the state directory: keep what root creates there usable to it
        "Group=imaging\n"
        "UMask=0007\n"
        # the empty assignment resets the unit's (empty) set before adding exactly these
        "CapabilityBoundingSet=\n"
        f"CapabilityBoundingSet={' '.join(CAPABILITIES)}\n"
        f"{create_db}"
        "DeviceAllow=/dev/loop-control rw\n"
        "DeviceAllow=block-loop rw\n"
    )


def sync_dropin(unit_dir: Path, reasons: list[str], db_path: Path | None = DEFAULT_DB) -> bool:
    """Write the drop-in when ``reasons`` is non-empty, remove it otherwise; True when that changed
    a file (the caller then reloads systemd)."""
    path = dropin_path(unit_dir)
    if not reasons:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when empty: another drop-in may live there
        return True
    text = render_dropin(reasons, db_path)
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    write_atomic(path, text, 0o644)
    return True


def systemd_reload() -> None:
    """``systemctl daemon-reload`` when systemd runs this machine (a no-op elsewhere, e.g. a container)."""
    exe = shutil.which("systemctl")
    if exe is None or not Path("/run/systemd/system").is_dir():  # sd_booted()
        log.info("systemd is not running: not reloading units")
        return
    subprocess.run([exe, "daemon-reload"], check=True, timeout=120, capture_output=True)


Reload = Callable[[], None]
