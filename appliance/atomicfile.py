"""Writing a small file atomically: a temporary file beside it, fsynced, renamed into place.

The one writer for every file that readers may see while it changes (configuration, drop-ins,
records, checkpoints, heartbeats): a reader sees the old file or the whole new one, never a part.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_atomic(
    path: Path, text: str | bytes, mode: int = 0o600, owner: str | None = None, *, durable: bool = True
) -> None:
    """Write ``text`` to ``path`` with exactly ``mode`` (and ``owner``'s uid/gid when that user
    exists): readers see the old file or the whole new one, never a partial file. ``durable=False``
    skips the fsyncs, for files that are rewritten soon anyway (a lost write only loses news)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed O_CREAT's mode; make it exact
        _chown(tmp, owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _chown(path: Path, owner: str | None) -> None:
    if not owner:
        return
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        log.debug("user %s does not exist; %s stays owned by %d", owner, path, os.getuid())
        return
    os.chown(path, pw.pw_uid, pw.pw_gid)


def write_json_atomic(path: Path, data: Any, mode: int = 0o600, *, durable: bool = True) -> None:
    """:func:`write_atomic` of ``data`` as JSON."""
    write_atomic(path, json.dumps(data, sort_keys=True), mode, durable=durable)
