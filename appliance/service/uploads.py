"""Staged uploads and the tasks that read them: which uploads an active import still needs, and the
worker's sweep of expired ones (:mod:`appliance.sources.staged` keeps the bytes).

An upload an active task names (``upload://{id}`` anywhere in its parameters, in the task's account)
is in use: it is neither deleted through the API nor removed by the sweep, even once expired.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config
from ..sources.staged import UploadArea
from ..sources.stagedproto import upload_refs
from ..store import ACTIVE_STATES, Store

log = logging.getLogger(__name__)


def uploads_in_use(store: Store) -> set[tuple[str, str]]:
    """``(account, id)`` of every upload an active task names."""
    tasks = store.list_tasks(sorted(str(s) for s in ACTIVE_STATES), limit=None)
    return {(task.client_account, ref) for task in tasks for ref in upload_refs(task.params)}


class UsesUploads:
    """``(account, id) -> bool``: whether an active task names the upload (asks the store each time)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __call__(self, account: str, upload_id: str) -> bool:
        return (account, upload_id) in uploads_in_use(self.store)


def sweep_uploads(config: Config, store: Store) -> list[Path]:
    """Remove the expired uploads no active task reads (the worker's periodic sweep)."""
    if config.sources.upload is None:
        return []
    area = UploadArea(config.sources.upload)
    if not area.root.is_dir():
        return []
    used = uploads_in_use(store)  # once: an outage (StoreUnavailable) propagates and nothing is removed
    removed = area.sweep(lambda account, upload_id: (account, upload_id) in used)
    for path in removed:
        log.info("removed expired upload %s", path)
    return removed
