"""Sweeps of what crashed or killed task processes left behind: scratch directories of tasks that
are over, partial outputs, guest mounts and loop devices, the staging uploads of streamed imports into
the S3 image target. The worker runs them (at start; the mounts every poll, the S3 staging uploads
periodically); ``imaging tasks cleanup`` runs the scratch sweep too."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from .. import config as config_mod
from .. import partials
from ..errors import ImagingError, TaskNotFound
from ..guest.mountrecord import sweep_stale
from ..scratch import ScratchSpace
from ..store import Store, TaskState
from ..targets import get_image_target
from ..targets.base import remove_object
from ..targets.s3 import STAGING_SUFFIX, S3ImageTarget
from ..targets.s3staged import PUBLISH_KIND, adoptable
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


def _outstanding_staging(store: Store) -> dict[tuple[str, str], None]:
    """(task, ``s3://bucket/key.partial``) of the staging uploads cleanup ledgers name as created and
    not since removed."""
    outstanding: dict[tuple[str, str], None] = {}
    for e in store.ledger_containing(STAGING_SUFFIX):
        if not (e.resource.startswith("s3://") and e.resource.endswith(STAGING_SUFFIX)):
            continue
        if e.action == "created":
            outstanding[(e.task_id, e.resource)] = None
        else:
            outstanding.pop((e.task_id, e.resource), None)
    return outstanding


def sweep_s3_staging(config: config_mod.Config, store: Store) -> list[str]:
    """Remove what streamed imports into the S3 image target left at their staging keys
    (``<key>.partial``: incomplete multipart uploads, a completed staging object) when their task is
    over (completed, failed, cancelled) or unknown to the store, and — for a task that did not complete
    — the image an interrupted publish copied to its final key (its metadata names the staging
    object's ETag of the task's publish checkpoint: nothing else).

    Only keys a cleanup ledger names (what the appliance wrote), in the configured image target's
    bucket and prefix; never a listing of the bucket beyond those keys. The uploads of a task that may
    still run (pending, running, cancelling: leased by this or another appliance of the
    fleet, or waiting for a resume) are kept: their next run continues them. Each removal goes into the
    task's ledger (step ``recovery``). Returns the ``s3://`` URLs removed. A store outage propagates
    (nothing is removed); an S3 error is logged and the key left for the next sweep."""
    outstanding = _outstanding_staging(store)
    if not outstanding:
        return []
    target = get_image_target(config)
    if not isinstance(target, S3ImageTarget):
        return []
    removed: list[str] = []
    for owner, resource in outstanding:
        bucket, _, staging_key = resource.removeprefix("s3://").partition("/")
        if bucket != target.bucket or not staging_key.startswith(target.prefix):
            log.info("task %s: %s is not in the image target's bucket and prefix: left", owner, resource)
            continue
        try:
            state: TaskState | None = store.get_task(owner).state
        except TaskNotFound:
            state = None
        if state is not None and not state.terminal:
            continue  # it may still run: its next run continues the upload
        try:
            remove_object(target.client, target.bucket, staging_key)
            if state is not TaskState.COMPLETED:
                removed += _remove_unledgered(target, store, owner, staging_key)
        except Exception as exc:
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
            log.warning("task %s: cannot remove %s: %s", owner, resource, code or type(exc).__name__)
            continue
        _record(store, owner, resource)
        log.warning("task %s: removed the staging upload %s its killed process left", owner, resource)
        removed.append(resource)
    return removed


def _remove_unledgered(target: S3ImageTarget, store: Store, owner: str, staging_key: str) -> list[str]:
    """Delete the final image of a publish a killed run of ``owner`` began (its publish checkpoint)
    when the object is the one it copied (:func:`~appliance.targets.s3staged.adoptable`) and no
    ledger entry of the task names it (a published image's location is the step's to undo)."""
    removed: list[str] = []
    named: dict[str, None] = {}  # resources the task's ledger names as created and not since removed
    for e in store.ledger(owner):
        if e.action == "created":
            named[e.resource] = None
        else:
            named.pop(e.resource, None)
    for data in store.checkpoints(owner).values():
        if not isinstance(data, dict) or data.get("kind") != PUBLISH_KIND:
            continue
        if data.get("bucket") != target.bucket or data.get("staging_key") != staging_key:
            continue
        key, size = data.get("key"), data.get("size")
        if not isinstance(key, str) or staging_key != key + STAGING_SUFFIX or type(size) is not int:
            continue
        if any(f'"key": "{key}"' in resource for resource in named):
            continue  # published and ledgered: the engine's undo of the step owns it
        etag = adoptable(
            target.client, target.bucket, key, str(data.get("sha256")), str(data.get("staging_etag")), size
        )
        if etag is None:
            continue
        target.client.delete_object(Bucket=target.bucket, Key=key)
        url = f"s3://{target.bucket}/{key}"
        _record(store, owner, url)
        log.warning("task %s: deleted %s, published by a run killed before its ledger entry", owner, url)
        removed.append(url)
    return removed


def _record(store: Store, owner: str, resource: str) -> None:
    with contextlib.suppress(TaskNotFound):  # the task is gone from the store: the log line is the record
        store.add_ledger(owner, "removed", resource, partials.RECOVERY_STEP)
