"""Starting the reporter the configuration asks for (``controller.mode``)."""

from __future__ import annotations

from typing import Protocol

from ..config import Config
from ..store import Store
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
    reporter: PushReporter | PullReporter
    reporter = PushReporter(config, store) if mode == "push" else PullReporter(config, store)
    reporter.start()
    return reporter
