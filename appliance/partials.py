"""Partial outputs: files written under a temporary name next to their final one, then renamed.

Every writer that publishes a file by rename (qemu-img conversions, the file image target,
``file.copy``) makes its partial with :func:`partial_file`: ``.<final name>.partial-<8 hex>`` in the
final name's directory, created exclusively (never through a symlink) with mode 0600 whatever the
umask, and announced to the task's cleanup ledger (``created``) *before* the file exists. When the
writer is done the name is gone (renamed into place with :func:`publish`, or removed on failure) and
the ledger says ``removed``.

A process killed mid-write leaves its partial behind, named in its task's ledger. :func:`sweep`
removes the partials of tasks that no live process owns, and records each removal in that task's
ledger (step ``recovery``): the engine sweeps a task's partials when it resumes it, the worker sweeps
every task's at start-up, and a task that fails or is cancelled sweeps what it left.

A writer that can continue where it got to (a streamed import, :mod:`appliance.steps.image_stream`)
names its partial in its step checkpoint (:data:`CHECKPOINT_KEY`) and keeps it when it is stopped
(``keep_on``); the sweeps of a task that may still resume leave such a partial (``resumable``), and the
step's next run takes it again (``reuse``). The task's end removes it if no run published it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from .errors import TaskNotFound
from .store import Store

log = logging.getLogger(__name__)

#: what every partial's name contains, and the whole name
MARKER = ".partial-"
PARTIAL_NAME = re.compile(r"^\..+\.partial-[0-9a-f]{8}$")
#: the ledger's step for removals by a sweep
RECOVERY_STEP = "recovery"
#: the key of a step checkpoint that names a partial kept for the step's next run
CHECKPOINT_KEY = "partial"


class Ledger(Protocol):
    """Where a writer announces its partial (a workflow step's context is one)."""

    def ledger_created(self, resource: str | Path) -> None: ...

    def ledger_removed(self, resource: str | Path) -> None: ...


def is_partial(path: str | Path) -> bool:
    """Whether ``path`` is named like a partial output."""
    return bool(PARTIAL_NAME.match(Path(path).name))


def _umask() -> int:
    # Reading the umask with os.umask() means setting it, which races with other threads.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def reusable(partial: Path | None, final: Path) -> bool:
    """Whether ``partial`` is a partial of ``final`` that a writer may take again: in ``final``'s
    directory, named as its partials are, a regular file (not through a symlink)."""
    if partial is None:
        return False
    partial = Path(partial)
    if partial.parent != final.parent or not is_partial(partial):
        return False
    if not partial.name.startswith(f".{final.name}{MARKER}"):
        return False
    try:
        return stat.S_ISREG(os.lstat(partial).st_mode)
    except OSError:
        return False


@contextmanager
def partial_file(
    final: Path,
    ledger: Ledger | None = None,
    *,
    reuse: Path | None = None,
    keep_on: tuple[type[BaseException], ...] = (),
) -> Iterator[Path]:
    """An empty new partial of ``final`` (mode 0600), announced to ``ledger`` before it is created.

    The body writes the partial and renames it into place (:func:`publish`). On leaving, the partial
    is removed if it is still there (a failure, a cancel), and ``ledger`` is told the name is gone.
    Raises ``OSError`` when the partial cannot be created (the ledger entry is closed again).

    ``reuse``: a partial of ``final`` an earlier run of the same task kept (its ledger names it already):
    yielded as it is when it is one (:func:`reusable`), else a new one is made. ``keep_on``: exceptions
    that leave the partial where it is (still ledgered as created) for a later run to take again.
    """
    final = Path(final)
    if reuse is not None and reusable(reuse, final):
        yield from _kept(Path(reuse), ledger, keep_on)
        return
    path = final.with_name(f".{final.name}{MARKER}{secrets.token_hex(4)}")
    while os.path.lexists(path):  # never announce a name someone else holds
        path = final.with_name(f".{final.name}{MARKER}{secrets.token_hex(4)}")
    if ledger is not None:
        ledger.ledger_created(path)
    try:
        # If this fails nothing of ours is there (a file that took the name meanwhile is not ours).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except BaseException:
        _settled(ledger, path)
        raise
    try:
        os.fchmod(fd, 0o600)  # a umask such as 0277 would leave it unwritable
    except BaseException:
        os.close(fd)
        _remove(path, ledger)
        raise
    os.close(fd)
    yield from _kept(path, ledger, keep_on)


def _kept(path: Path, ledger: Ledger | None, keep_on: tuple[type[BaseException], ...]) -> Iterator[Path]:
    """Yield ``path``; on leaving remove it (and tell ``ledger``) unless a ``keep_on`` error left."""
    try:
        yield path
    except keep_on:
        log.info("keeping the partial output %s for the task's next run", path)
        raise
    except BaseException:
        _remove(path, ledger)
        raise
    _remove(path, ledger)


def _remove(path: Path, ledger: Ledger | None) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        log.exception("could not remove the partial output %s", path)
    else:
        _settled(ledger, path)


def _settled(ledger: Ledger | None, path: Path) -> None:
    """Tell ``ledger`` that the partial name is gone (an error here must not hide the writer's own)."""
    if ledger is None:
        return
    try:
        ledger.ledger_removed(path)
    except Exception:  # a sweep finds the entry settled: the file is not there
        log.exception("could not record the removal of %s", path)


def publish(partial: Path, final: Path, mode: int | None = None) -> None:
    """Rename the finished ``partial`` to ``final``, first giving it ``mode``: by default the mode of
    the regular file it replaces, else what a new file gets under the umask."""
    if mode is None:
        try:
            st = os.stat(final)
            mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
        except FileNotFoundError:
            pass
    os.chmod(partial, 0o666 & ~_umask() if mode is None else mode)
    os.replace(partial, final)


def kept_for_resume(store: Store, task_id: str) -> set[str]:
    """The partials ``task_id``'s step checkpoints name (:data:`CHECKPOINT_KEY`) while the task may still
    run (it is not over): kept by a ``resumable`` sweep for the step that takes them again."""
    try:
        if store.get_task(task_id).state.terminal:
            return set()
    except TaskNotFound:
        return set()
    return {
        str(data[CHECKPOINT_KEY])
        for data in store.checkpoints(task_id).values()
        if isinstance(data, dict) and isinstance(data.get(CHECKPOINT_KEY), str)
    }


def sweep(
    store: Store,
    keep: Callable[[str], bool] = lambda _task_id: False,
    *,
    task_id: str | None = None,
    resumable: bool = False,
) -> list[Path]:
    """Remove the partials named in cleanup ledgers as created and not since removed, that are still on
    disk, of every task (or of ``task_id``) that ``keep`` rejects. Each removal goes into the task's
    ledger (step :data:`RECOVERY_STEP`). Returns the paths removed. ``resumable``: leave the partials
    a task that may still run keeps for a resume (:func:`kept_for_resume`).

    Only a regular file with a partial's name at the absolute path the ledger holds is removed.
    """
    entries = store.ledger(task_id) if task_id is not None else store.ledger_containing(MARKER)
    outstanding: dict[tuple[str, str], None] = {}
    for e in entries:
        if e.action == "created":
            outstanding[(e.task_id, e.resource)] = None
        else:
            outstanding.pop((e.task_id, e.resource), None)
    removed = []
    kept: dict[str, set[str]] = {}
    for owner, resource in outstanding:
        path = Path(resource)
        if not path.is_absolute() or not is_partial(path) or keep(owner):
            continue
        if resumable:
            if owner not in kept:
                kept[owner] = kept_for_resume(store, owner)
            if resource in kept[owner]:
                log.info("task %s: keeping the partial output %s for its resume", owner, path)
                continue
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            path.unlink()
        except FileNotFoundError:
            continue  # renamed into place or removed by its writer
        except OSError as exc:  # left for the next sweep; the others are still swept
            log.warning("task %s: cannot remove the partial output %s: %s", owner, path, exc)
            continue
        store.add_ledger(owner, "removed", resource, RECOVERY_STEP)
        log.warning("task %s: removed the partial output %s left by a killed process", owner, path)
        removed.append(path)
    return removed
