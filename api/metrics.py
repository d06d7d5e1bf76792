"""``GET /metrics``: task metrics in the Prometheus text exposition format (version 0.0.4).

Written by hand rather than with ``prometheus_client``: every value is read fresh from the task
database by one aggregate query (:meth:`appliance.store.Store.task_summary`), so there is no
in-process registry to keep, and several gunicorn workers need no multiprocess-mode directory.
The format for three gauges, a counter and a histogram is a few lines.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Sequence
from typing import Any

from appliance.store import TERMINAL_STATES, Store, TaskState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: upper bounds (seconds) of the task-duration histogram: imports take seconds to hours
DURATION_BUCKETS: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, float) and value == float("inf"):
        return "+Inf"
    return repr(value) if isinstance(value, float) else str(value)


class _Doc:
    """Collects metric families in exposition order."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(
    summary: Iterable[dict[str, Any]], version: str, buckets: Sequence[float] = DURATION_BUCKETS
) -> str:
    """The exposition text for ``summary`` rows (as returned by ``Store.task_summary(buckets)``)."""
    rows = list(summary)
    doc = _Doc()
    doc.family("imaging_build_info", "gauge", "Build information; the value is always 1.")
    doc.sample("imaging_build_info", {"version": version, "python": platform.python_version()}, 1)

    doc.family("imaging_tasks", "gauge", "Tasks in the state database by kind and state.")
    counts = {(r["kind"], r["state"]): r["count"] for r in rows}
    # Every state for every kind seen, zeros included, so a state that empties shows 0 rather than vanishing.
    for kind in sorted({r["kind"] for r in rows}):
        for state in TaskState:
            doc.sample(
                "imaging_tasks", {"kind": kind, "state": str(state)}, counts.get((kind, str(state)), 0)
            )

    doc.family(
        "imaging_converted_bytes_total",
        "counter",
        "Bytes converted or written to targets by completed tasks.",
    )
    completed = {r["kind"]: r["bytes_converted"] for r in rows if r["state"] == TaskState.COMPLETED}
    for kind in sorted({r["kind"] for r in rows}):
        doc.sample("imaging_converted_bytes_total", {"kind": kind}, completed.get(kind, 0))

    doc.family(
        "imaging_task_duration_seconds",
        "histogram",
        "Run time (start to finish) of finished tasks by outcome.",
    )
    terminal = {str(s) for s in TERMINAL_STATES}
    for r in rows:
        if r["state"] not in terminal or not r["durations"]:
            continue
        labels = {"kind": r["kind"], "state": r["state"]}
        for bound, count in zip(buckets, r["buckets"], strict=True):
            doc.sample("imaging_task_duration_seconds_bucket", {**labels, "le": _number(float(bound))}, count)
        doc.sample("imaging_task_duration_seconds_bucket", {**labels, "le": "+Inf"}, r["durations"])
        doc.sample("imaging_task_duration_seconds_sum", labels, r["duration_sum"])
        doc.sample("imaging_task_duration_seconds_count", labels, r["durations"])
    return doc.text()


def metrics_text(store: Store, version: str) -> str:
    """Current metrics from ``store`` (one aggregate query)."""
    return render(store.task_summary(DURATION_BUCKETS), version)
