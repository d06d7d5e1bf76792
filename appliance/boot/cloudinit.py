"""The instance's user data as cloud-init has it, for ``imaging configure`` (:mod:`.configure`):
cloud-init's copy on disk first (no second cloud-init process on the boot's path to the API),
``cloud-init query userdata`` only when that copy is missing or blank; and the wait until
cloud-init's init stage has stored this boot's copy (or finished without one, or does not run on
this boot), so that the configure unit can run beside that stage instead of after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: cloud-init's copy of the instance's user data
CLOUD_INIT_USER_DATA = Path("/var/lib/cloud/instance/user-data.txt")
#: written by cloud-init's init stage right after ``user-data.txt``, at every boot
CLOUD_INIT_PROCESSED = Path("/var/lib/cloud/instance/user-data.txt.i")
#: cloud-init's per-boot state (``/run``): absent when cloud-init does not run on this boot
CLOUD_INIT_RUN = Path("/run/cloud-init")


def boot_time() -> float:
    """When this machine booted (``btime`` of ``/proc/stat``, seconds since the epoch); 0 if unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _init_stage_finished() -> bool:
    try:
        status = json.loads((CLOUD_INIT_RUN / "status.json").read_text())
        return status["v1"]["init"]["finished"] is not None
    except (OSError, ValueError, KeyError, TypeError):
        return False


def wait_for_cloud_init(timeout: float, booted: float | None = None) -> bool:
    """Wait until cloud-init's init stage has stored this boot's user data (``user-data.txt.i``
    written since boot), or has finished without (no datasource), or does not run on this boot.
    False when ``timeout`` ran out first.

    This lets ``imaging-configure.service`` run beside the rest of that stage (host keys, growpart,
    users: many seconds under emulation) instead of after it. The user data is all it needs.
    """
    booted = boot_time() if booted is None else booted
    deadline = time.monotonic() + timeout
    while True:
        if not CLOUD_INIT_RUN.is_dir() or _init_stage_finished():
            return True
        with contextlib.suppress(OSError):
            if CLOUD_INIT_PROCESSED.stat().st_mtime >= booted:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def read_user_data(path: Path | None) -> bytes | None:
    """The instance's user data: ``path`` if given; else cloud-init's copy on disk (the unit runs after
    cloud-init's init stage, which writes it for this instance); else ``cloud-init query userdata``.
    None when there is none (or it is blank).

    The file comes first because it is the same bytes without a second cloud-init process: starting
    one costs seconds of a boot under emulation, on the path to the API being ready."""
    if path is not None:
        return path.read_bytes() if path.exists() else None
    with contextlib.suppress(OSError):
        raw = CLOUD_INIT_USER_DATA.read_bytes()
        if raw.strip():
            return raw
    exe = shutil.which("cloud-init")
    if exe is not None:
        try:
            out = subprocess.run([exe, "query", "userdata"], capture_output=True, timeout=60, check=False)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("cloud-init query failed: %s", exc)
    return None
