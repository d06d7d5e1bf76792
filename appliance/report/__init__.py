"""Reporting to the controlling cloud (``controller:`` in the configuration).

- ``mode: push``: signed, versioned JSON messages (heartbeats, task events) through a durable
  SQLite outbox to ``POST <url>/v1/reports`` (:mod:`.push`, wire format in :mod:`.messages`);
- ``mode: pull``: the Eucalyptus imaging-worker protocol, ``GetInstanceImportTask`` /
  ``PutInstanceImportTaskStatus`` at ``<url>/services/Imaging`` (:mod:`.pull`);
- ``mode: off``: nothing.

The worker starts the reporter in its own process (:func:`start_reporter`) and stops it on
shutdown. :mod:`.receiver` verifies reports and is a reference controller for labs and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..config import Config
from ..store import Store

if TYPE_CHECKING:
    from .pull import PullReporter
    from .push import PushReporter


class Reporter(Protocol):
    """A running reporter thread."""

    def stop(self, timeout: float = 15.0) -> None:
        """Stop reporting and wait for the thread (undelivered messages stay in the outbox)."""


def start_reporter(config: Config, store: Store) -> Reporter | None:
    """Start the reporter ``config.controller.mode`` asks for; None when reporting is off."""
    mode = config.controller.mode
    if mode == "off":
        return None
    if mode == "push":
        from .push import PushReporter

        reporter: PushReporter | PullReporter = PushReporter(config, store)
    else:
        from .pull import PullReporter

        reporter = PullReporter(config, store)
    reporter.start()
    return reporter
