"""Staged uploads in the import steps (glue): whose uploads a task reads, and ``manifest.wait`` of an
ImportVolume/ImportInstance whose ``ImportManifestUrl`` is ``upload://{id}``.

A task reads the uploads of its own account (the account recorded with the task when the API created
it); an operator's task (``imaging run``, no account) names the account in the source's ``account``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any

from ..errors import TaskNotFound
from ..sources.httpio import sleep_or_cancel
from ..sources.manifest import ImportManifest
from ..sources.staged import UploadArea
from ..sources.stagedproto import UploadError, UploadInfo, parse_upload_url
from ..sources.upload import upload_manifest
from ..workflow.step import StepContext


def task_account(ctx: StepContext, fallback: str = "") -> str:
    """The account of the running task; ``fallback`` for a task without one (an operator's)."""
    account = ""
    if ctx.store is not None:
        with contextlib.suppress(TaskNotFound):
            account = ctx.store.get_task(ctx.task_id).client_account
    return account or fallback


def wait_for_upload(ctx: StepContext, url: str, deadline: dt.datetime, file_format: str) -> ImportManifest:
    """Wait (polling as for an import manifest) until the task account's upload ``url`` is complete,
    then the manifest of its bytes (:func:`~appliance.sources.upload.upload_manifest`). At
    ``deadline`` the last reason (``Upload.NotFound``, ``Upload.Incomplete``) fails the task."""
    upload_id = parse_upload_url(url)
    area = UploadArea.from_sources(ctx.config.sources)
    account = task_account(ctx)
    sources = ctx.config.sources
    delay, cap = sources.manifest_poll_interval, sources.manifest_poll_max_interval
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=dt.UTC)
    while True:
        try:
            info: UploadInfo = area.ready(account, upload_id)
            break
        except UploadError as exc:
            if exc.code not in ("Upload.NotFound", "Upload.Incomplete"):
                raise
            left = (deadline - dt.datetime.now(dt.UTC)).total_seconds()
            if left <= 0:
                raise UploadError(exc.code, f"{exc.message} (the task expired waiting for it)", 409) from exc
            ctx.event("waiting", message=f"waiting for upload://{upload_id}: {exc.message}")
            sleep_or_cancel(min(delay, left), ctx.cancel, "waiting for the upload")
            delay = min(cap, delay * 2)
    return upload_manifest(info, file_format)


def upload_params(ctx: StepContext, source: dict[str, Any]) -> dict[str, Any]:
    """``source`` naming the account whose upload it reads (:func:`task_account`)."""
    return dict(source, account=task_account(ctx, str(source.get("account") or "")))
