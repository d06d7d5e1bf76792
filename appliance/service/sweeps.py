"""Sweeps of what crashed or killed task processes left behind: scratch directories of tasks that
are over, partial outputs, guest mounts and loop devices. The worker runs them (at start, and the
mounts every poll); ``imaging tasks cleanup`` runs the scratch sweep too."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import config as config_mod
from .. import partials
from ..errors import ImagingError, TaskNotFound
from ..guest.mountrecord import sweep_stale
from ..scratch import ScratchSpace
from ..store import Store, TaskState
from ..workflow.supervisor import orphan_reason

log = logging.getLogger(__name__)


def cleanup_scratch(config: config_mod.Config, store: Store) -> list[Path]:
    """Remove scratch directories whose task is over or unknown: leftovers of crashed runs.

    Directories of tasks that may still resume (pending, running, cancelling) are kept.
    """

    def live(task_id: str) -> bool:
        try:
            return not store.get_task(task_id).state.terminal
        except TaskNotFound:
            # only a task the database does not know is gone: an outage (StoreUnavailable) propagates,
            # so the sweep is retried instead of deleting the scratch of tasks that will resume
            return False

    removed = ScratchSpace.from_config(config).cleanup_orphans(keep=live)
    for path in removed:
        log.info("removed orphaned scratch directory %s", path)
    return removed


def sweep_partials(store: Store) -> list[Path]:
    """Remove the partial outputs (``.NAME.partial-XXXXXXXX``, named in cleanup ledgers) that killed
    task processes left, of every task no live process runs, but those kept for a task's resume (a
    step's checkpoint names them, the task is not over); each removal goes into its task's ledger."""

    def running(task_id: str) -> bool:
        try:
            task = store.get_task(task_id)
        except TaskNotFound:  # as in cleanup_scratch: an outage propagates
            return False
        return task.state in (TaskState.RUNNING, TaskState.CANCELLING) and orphan_reason(task) is None

    return partials.sweep(store, keep=running, resumable=True)


def sweep_mounts(config: config_mod.Config, store: Store) -> list[str]:
    """Unmount and detach what killed task processes left mounted (guest chroots, loop devices);
    each undone resource goes into its task's cleanup ledger as removed."""

    def ledger(owner: str, action: str, resource: str) -> None:
        try:
            store.get_task(owner)
        except ImagingError:
            return  # the owner was not a task (a CLI run): the log line is the record
        store.add_ledger(owner, action, resource, step="recovery")

    cleaned = sweep_stale(config.state_dir, ledger)
    for line in cleaned:
        log.warning("crash leftover cleaned: %s", line)
    return cleaned
