"""What the task store holds: task and step states, the legal transitions, and the records it returns."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

from ..database import (
    Row,
)
from ..errors import (
    ResourceLimitExceeded,
    UsageError,
)


class ActiveTaskLimit(ResourceLimitExceeded):
    """Creating the task would make more than ``limit`` tasks active; ``active`` were counted."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} tasks are active (pending, running or cancelling), the limit is {limit}")
        self.active = active
        self.limit = limit


class TaskState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})
#: The states that count against an active-task limit: every state that is not terminal. A
#: ``cancelling`` task still holds its worker slot and scratch until its undo has finished.
ACTIVE_STATES = frozenset(TaskState) - TERMINAL_STATES

#: The only legal task state changes. ``pending → failed`` covers a task whose workflow can no
#: longer be loaded when a worker picks it up; ``cancelling → failed`` a cancel whose undo failed.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.RUNNING, TaskState.CANCELLED, TaskState.FAILED}),
    TaskState.RUNNING: frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLING}),
    TaskState.CANCELLING: frozenset({TaskState.CANCELLED, TaskState.FAILED}),
    TaskState.COMPLETED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.CANCELLED: frozenset(),
}


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNDONE = "undone"
    UNDO_FAILED = "undo_failed"


STEP_FINISHED = frozenset(
    {StepState.COMPLETED, StepState.FAILED, StepState.SKIPPED, StepState.UNDONE, StepState.UNDO_FAILED}
)

LEDGER_ACTIONS = ("created", "removed", "leaked")

#: Caller-supplied task ids become scratch directory names, so they are restricted to a safe
#: alphabet (the same one :mod:`appliance.scratch` accepts).
TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


#: the task record (:meth:`~appliance.store.Store.record`) naming the appliance (``controller.appliance_id``)
#: whose run owns the task now: the one that reports it to the controller (push mode)
REPORTER_RECORD = "reporter"


def new_task_id() -> str:
    return "t-" + secrets.token_hex(6)


def dumps(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"value is not JSON-serialisable: {exc}") from exc


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class Task:
    """A snapshot of one task row (JSON columns decoded)."""

    id: str
    kind: str
    workflow: str | None
    params: dict[str, Any]
    state: TaskState
    status_message: str
    phase: str | None
    bytes_done: int | None
    bytes_total: int | None
    percent: float | None
    result: Any
    error_code: str | None
    error_message: str | None
    findings: list[dict[str, Any]]
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    owner: str | None
    lease_expires_at: str | None
    attempts: int
    cancel_reason: str | None = None
    bytes_converted: int = 0
    #: the account the task belongs to (its creator's); '' for none
    client_account: str = ""
    #: the fencing epoch: how many times the task was claimed (see :class:`Lease`)
    epoch: int = 0

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @property
    def lease(self) -> Lease | None:
        """The current owner's lease (None while nobody owns the task)."""
        return Lease(self.owner, self.epoch) if self.owner else None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; every field by name, ``state`` as its string."""
        d = asdict(self)
        d["state"] = str(self.state)
        return d

    @classmethod
    def from_row(cls, row: Row) -> Task:
        d = dict(row)
        d["state"] = TaskState(d["state"])
        for key in ("params", "result", "findings"):
            d[key] = loads(d[key])
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Lease:
    """A claim on a task: its owner and the task's fencing epoch the claim was granted.

    Every claim of a task (:meth:`Store.claim`, :meth:`Store.claim_pending`) increments the
    task's epoch. A write of a task run is made under a lease and the write statement itself
    checks it (``… WHERE id = ? AND owner = ? AND epoch = ?``): once another worker has claimed the
    task, the former owner's writes change nothing and raise :class:`LeaseLost`. A lease is never
    compared with a clock; its expiry only decides when another worker may claim the task.
    """

    owner: str
    epoch: int


@dataclass(frozen=True)
class StepRecord:
    """One executed (or skipped) step of a task; ``idx`` is its path, e.g. ``2.loop1`` or ``4/include/1``."""

    task_id: str
    seq: int
    idx: str
    name: str
    action: str
    state: StepState
    args: Any
    result: Any
    error: dict[str, Any] | None
    attempts: int
    undo: bool
    started_at: str | None
    finished_at: str | None
    #: the step's latest progress report (``phase``, ``done``, ``total``, ``percent``), None until it
    #: reported one (:meth:`~appliance.store.Store.update_progress` with ``step``)
    progress: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        return d

    @classmethod
    def from_row(cls, row: Row) -> StepRecord:
        d = dict(row)
        d["state"] = StepState(d["state"])
        d["undo"] = bool(d["undo"])
        for key in ("args", "result", "error", "progress"):
            d[key] = loads(d[key])
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Event:
    """One entry of the event queue; ``id`` increases monotonically across all tasks."""

    id: int
    task_id: str
    time: str
    kind: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LedgerEntry:
    """A resource a task created, removed, or could not remove (``leaked``)."""

    id: int
    task_id: str
    time: str
    action: str
    resource: str
    step: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
