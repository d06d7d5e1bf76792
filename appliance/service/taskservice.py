"""The one base of the task services (imports, copies, exports, bundles).

A task service turns validated requests into tasks of its kinds in the task store, run by the worker
through the shipped workflow of each kind, and finds, lists and cancels them again for a caller.
:class:`TaskService` owns what all of them do alike:

- the store and the engine (one store per service, the engine created when first needed; a service
  built beside another shares its store and engine by passing them);
- submitting a task under the active-task limit (``tasks.max_active``: ``ResourceLimitExceeded``) with
  its client token and account;
- finding a task by id, kind and account (:meth:`TaskService.get_task`): a malformed id is
  ``InvalidTaskId``, an unknown task, a task of another kind and a task of an account the caller does
  not see are one and the same ``TaskNotFound`` (tenancy: another account's task does not exist);
- listing tasks of kinds (newest first; with ids, exactly those) and requesting a cancel (a task that
  is over is ``IncorrectState``).

What differs between services is data: the id form of each kind (:attr:`TaskService.id_patterns`,
:attr:`TaskService.id_prefixes`, and :meth:`TaskService.new_task_id` where a kind's new ids have a form
of their own, as the 8 alphanumerics of the conversion tasks) and the words of the messages
(:attr:`TaskService.noun`, :meth:`TaskService.not_found`), so each service keeps its own wire messages.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

from ..config import Config
from ..errors import IncorrectState, InvalidTaskId, ResourceLimitExceeded, TaskNotFound
from ..store import ActiveTaskLimit, Store, Task
from ..workflow.engine import Engine


class TaskService:
    """Store, engine, submit, and get/list/cancel by kind and account (module docstring)."""

    #: what the messages call one task of this service (``export task``, ``bundle task``)
    noun: ClassVar[str] = "task"
    #: kind → the form of its task ids
    id_patterns: ClassVar[Mapping[str, re.Pattern[str]]] = {}
    #: kind → what its task ids begin with (new ids, and the "expected …" of a malformed one)
    id_prefixes: ClassVar[Mapping[str, str]] = {}

    def __init__(self, config: Config, store: Store | None = None, *, engine: Engine | None = None) -> None:
        self.config = config
        self.store = store or Store(config.store)
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.config, self.store)
        return self._engine

    # -- ids and messages -----------------------------------------------------------------------

    def new_task_id(self, kind: str) -> str:
        """A fresh id of ``kind``: its prefix and 17 hex digits (AWS's newer form)."""
        return self.id_prefixes[kind] + secrets.token_hex(9)[:17]

    def kind_of(self, task_id: str) -> str | None:
        """The kind whose id form ``task_id`` has, or None."""
        for kind, pattern in self.id_patterns.items():
            if pattern.match(task_id or ""):
                return kind
        return None

    def not_found(self, task_id: str) -> str:
        """The message of ``TaskNotFound`` for ``task_id`` (the same for an unknown task and for one
        the caller may not see)."""
        return f"the {self.noun} {task_id!r} does not exist"

    # -- creating -------------------------------------------------------------------------------

    def submit_task(
        self,
        kind: str,
        params: dict[str, Any],
        *,
        task_id: str,
        account: str,
        client_token: str | None = None,
    ) -> Task:
        """Create the task unless ``tasks.max_active`` tasks are active (``ResourceLimitExceeded``);
        with a ``client_token`` that ``account`` already used for the same request, the task created
        then."""
        try:
            created = self.engine.submit(
                kind,
                params,
                task_id=task_id,
                kind=kind,
                max_active=self.config.max_active_tasks,
                client_token=client_token,
                client_account=account,
            )
        except ActiveTaskLimit as exc:
            raise ResourceLimitExceeded(
                f"{exc.message}; wait for one to finish or cancel one "
                "(tasks.max_active in the appliance configuration)"
            ) from exc
        return self.store.get_task(created)

    # -- reading and cancelling -----------------------------------------------------------------

    def get_task(self, task_id: str, kinds: Collection[str], accounts: Collection[str] | None = None) -> Task:
        """The task ``task_id`` if it is one of ``kinds`` and (``accounts`` given) belongs to one of
        ``accounts``; ``InvalidTaskId`` for a malformed id, ``TaskNotFound`` (:meth:`not_found`) for an
        unknown task, one of another kind and one of another account alike."""
        kind = self.kind_of(task_id)
        if kind is None or kind not in kinds:
            forms = ", ".join(self.id_prefixes[k] + "…" for k in kinds)
            raise InvalidTaskId(f"the {self.noun} id {task_id!r} is malformed; expected {forms}")
        try:
            task = self.store.get_task(task_id, account=accounts)
        except TaskNotFound:
            raise TaskNotFound(self.not_found(task_id)) from None
        if task.kind != kind:
            raise TaskNotFound(self.not_found(task_id))
        return task

    def list_tasks(
        self, kinds: Collection[str], ids: Sequence[str] = (), accounts: Collection[str] | None = None
    ) -> list[Task]:
        """Tasks of ``kinds`` (of ``accounts``, when given), newest first; with ``ids``, exactly those
        (each must exist, as :meth:`get_task` says)."""
        if ids:
            return [self.get_task(i, kinds, accounts) for i in dict.fromkeys(ids)]
        return self.store.list_tasks(kind=list(kinds), limit=None, account=accounts)

    def cancel_task(
        self,
        task_id: str,
        kinds: Collection[str],
        accounts: Collection[str] | None = None,
        reason: str | None = None,
    ) -> Task:
        """Request the cancel of an active task found as :meth:`get_task` finds it (its run stops,
        undoes what it did, and ends ``cancelled``); a task that is over is ``IncorrectState``."""
        task = self.get_task(task_id, kinds, accounts)
        if task.state.terminal:
            raise IncorrectState(f"the {self.noun} {task_id} is {task.state} and can no longer be cancelled")
        return self.store.request_cancel(task_id, reason=reason or "Cancelled by user")
