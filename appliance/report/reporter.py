"""Starting the reporter the configuration asks for (``controller.mode``)."""

from __future__ import annotations

from ..config import Config
from ..store import Store
from .pull import PullReporter
from .push import PushReporter


def start_reporter(config: Config, store: Store) -> PushReporter | PullReporter | None:
    """Start the reporter ``config.controller.mode`` asks for; None when reporting is off."""
    mode = config.controller.mode
    if mode == "off":
        return None
    reporter: PushReporter | PullReporter
    reporter = PushReporter(config, store) if mode == "push" else PullReporter(config, store)
    reporter.start()
    return reporter
