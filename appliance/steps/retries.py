"""Retries of a download as task events (glue): what the readers log, the task shows.

The readers of :mod:`appliance.sources` (manifest parts, ranged reads) retry a failed or stalled
range themselves and log each retry (``… attempt N of K``); :func:`retry_events` turns those log
records into ``source.retry`` events of the running step, with ``stalled`` true when the stall
watchdog (no byte for ``sources.stall_seconds``) abandoned the attempt. So a stall shows in the
task's events as it happens, beside a progress whose rate fell to 0.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from ..redact import redact_text
from ..workflow.step import StepContext

#: the loggers of the readers whose retries become events
READER_LOGGERS = ("appliance.sources.parts", "appliance.sources.reader", "appliance.sources.single")
_STALL_WORDS = ("stalled", "timed out", "no data for")


class _RetryHandler(logging.Handler):
    def __init__(self, ctx: StepContext) -> None:
        super().__init__(logging.INFO)
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        if "attempt" not in str(record.msg):
            return
        try:
            message = redact_text(record.getMessage())
            stalled = any(word in message.lower() for word in _STALL_WORDS)
            self.ctx.event("source.retry", message=message, stalled=stalled)
        except Exception:  # an event that cannot be written must not break the download
            self.handleError(record)


@contextlib.contextmanager
def retry_events(ctx: StepContext) -> Iterator[None]:
    """While the block runs, every retry a reader logs is a ``source.retry`` event of ``ctx``'s step."""
    handler = _RetryHandler(ctx)
    loggers = [logging.getLogger(name) for name in READER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
