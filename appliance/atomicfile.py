"""Writing a small text file atomically: a temporary file beside it, fsynced, renamed into place."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
from pathlib import Path

log = logging.getLogger(__name__)


def write_atomic(path: Path, text: str, mode: int, owner: str | None = None) -> None:
    """Write ``text`` to ``path`` with exactly ``mode`` (and ``owner``'s uid/gid when that user
    exists): readers see the old file or the whole new one, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed O_CREAT's mode; make it exact
        _chown(tmp, owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
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
