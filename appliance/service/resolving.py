"""The base of the task services whose requests name what this appliance stored (copies, exports,
bundles): a :class:`~appliance.service.taskservice.TaskService` with the resolver of ``ami-``/``snap-``/
``vol-``/``i-`` ids over the same store (:mod:`appliance.service.resolver`).

It is apart from :mod:`~appliance.service.taskservice` because the resolver reads the import service's
records: the plain base stays usable by the import service itself.
"""

from __future__ import annotations

from ..config import Config
from ..store import Store
from ..workflow.engine import Engine
from .resolver import Resolver
from .taskservice import TaskService


class ResolvingService(TaskService):
    """A task service with a :class:`Resolver` (shared with another service when passed)."""

    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        *,
        engine: Engine | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        super().__init__(config, store, engine=engine)
        self.resolver = resolver or Resolver(config, self.store)
