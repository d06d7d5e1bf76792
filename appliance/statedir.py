"""The state directory kept private to the appliance's user.

``state_dir`` holds the task database (presigned URLs and findings of every task), staged uploads,
scratch copies of customers' disks and guest mount records: nothing another local user may read. Under
root's usual umask (022) a plain ``mkdir`` or SQLite's own file creation leaves them world-readable, so
the state directory and its subdirectories are made 0700 and the database (with its WAL and shared
memory files, which SQLite creates with the database file's mode) 0600 as they are created, and
:func:`secure_state_dir` tightens what an older installation left, each time a service starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from .paths import StatePaths

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
#: files SQLite keeps beside a database in WAL mode
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> Path:
    """``path`` (and missing parents) created 0700; an existing ``path`` is left as it is."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    return path


def private_file(path: Path) -> Path:
    """``path`` created empty and 0600 unless it exists, so whatever opens it next (SQLite) never
    creates it under the umask: no moment in which it is world-readable."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE))
    return path


def _tighten(path: Path, mode: int) -> None:
    """``path`` chmod-ed to ``mode`` when it has more permissions (a symlink is not followed)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) & ~mode == 0:
        return
    try:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
    except PermissionError:
        # another user's file (an operator's own directory): said, not fatal
        log.warning("cannot make %s private (mode %o): not its owner", path, stat.S_IMODE(st.st_mode))


def secure_state_dir(root: Path) -> Path:
    """``root`` created 0700, and what an older installation left there made private: the directory and
    its known subdirectories 0700, the task database and its side files and the worker's own files 0600."""
    private_dir(root)
    paths = StatePaths(root)
    for directory in (
        root,
        paths.scratch,
        paths.uploads,
        paths.mounts,
        paths.cache,
        paths.volumes,
        paths.images,
    ):
        _tighten(directory, PRIVATE_DIR)
    for file in (
        paths.db,
        *(paths.db.with_name(paths.db.name + side) for side in SQLITE_SIDE_FILES),
        paths.worker_heartbeat,
        paths.config_announced,
    ):
        _tighten(file, PRIVATE_FILE)
    return root
