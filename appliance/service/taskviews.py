"""Views of a task as the admin API shows it: :func:`task_summary` (the list view) and
:func:`task_detail` (the row, progress with its per-step :func:`stages`, steps, findings, guest
report, boot settings, encryption, provenance, cleanup ledger and recent events), both redacted.

The HTTP layer adds its links (the views know no URL); nothing here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..redact import redact
from ..store import Store, Task
from .importviews import boot_settings, encryption_report, guest_report, validated_report
from .provenance import provenance_of

#: how many of a task's latest events its detail shows
RECENT_EVENTS = 50


def account_of(task: Task) -> str | None:
    """The account the task belongs to; None for a task recorded without one."""
    return task.client_account or None


def task_summary(task: Task) -> dict[str, Any]:
    """The list view of a task (redacted, see :mod:`appliance.redact`)."""
    view = {
        "id": task.id,
        "kind": task.kind,
        "account": account_of(task),
        "state": str(task.state),
        "phase": task.phase,
        "percent": task.percent,
        "bytes_done": task.bytes_done,
        "bytes_total": task.bytes_total,
        "bytes_converted": task.bytes_converted,
        "status_message": task.status_message,
        "error_code": task.error_code,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
    }
    return redact(view)


def task_detail(store: Store, task: Task) -> dict[str, Any]:
    """The full view of a task: the row, progress, steps, findings, the guest validation report and
    boot settings (image and instance imports), the encryption asked for and applied (image and
    snapshot imports), cleanup ledger, recent events — redacted: params and step arguments hold
    presigned URLs (bearer credentials until they expire) and hook arguments."""
    row = task.to_dict()
    row.pop("findings")
    row.pop("client_account")  # shown as ``account``
    all_events = store.events(task_id=task.id, limit=100_000)
    events = all_events[-RECENT_EVENTS:]
    # not outcome(): any workflow may run as a task, and only imports' results have its layout;
    # a task that validation failed has no result, but its guest.validated event holds the report
    guest = guest_report(task.result) or validated_report(all_events)
    view = {
        "task": row,
        "account": account_of(task),
        "progress": {
            "phase": task.phase,
            "percent": task.percent,
            "bytes_done": task.bytes_done,
            "bytes_total": task.bytes_total,
            "bytes_converted": task.bytes_converted,
            "stages": stages(all_events),
        },
        "steps": [s.to_dict() for s in store.step_results(task.id)],
        "findings": task.findings,
        "guest": guest,
        "boot": boot_settings(task, guest),
        "encryption": encryption_report(task),
        "provenance": provenance_of(task),
        "ledger": [e.to_dict() for e in store.ledger(task.id)],
        "events": [e.to_dict() for e in events],
    }
    return redact(view)


#: what a stage of :func:`stages` shows, from the step's progress reports
_STAGE_FIELDS = ("phase", "read", "written", "done", "total", "percent", "rate", "eta")


def stages(events: Sequence[Any]) -> list[dict[str, Any]]:
    """Per step that reported progress (``step.progress`` events), its latest figures: ``phase``,
    bytes ``read`` from the source and ``written`` to the target, ``done``/``total``, ``percent``,
    ``rate`` (bytes/s; 0 while nothing moves) and ``eta`` (seconds), each None when the step did
    not say; ``retries``: the ``source.retry`` events of the step so far; ``at``: when reported."""
    latest: dict[str, dict[str, Any]] = {}
    retries: dict[str, int] = {}
    for event in events:
        step = str(event.data.get("step"))
        if event.kind == "step.progress":
            latest.pop(step, None)  # re-inserted: the order is that of the latest reports
            latest[step] = {"step": step, **{f: event.data.get(f) for f in _STAGE_FIELDS}, "at": event.time}
        elif event.kind == "source.retry":
            retries[step] = retries.get(step, 0) + 1
    return [stage | {"retries": retries.get(step, 0)} for step, stage in latest.items()]
