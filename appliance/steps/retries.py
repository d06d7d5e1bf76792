"""Retries of a download as task events (glue): what the readers retry, the task shows.

The readers of :mod:`appliance.sources` (manifest parts, ranged reads, the header-only preflight)
retry a failed or stalled range themselves and tell their ``on_retry`` callback of each retry
(:class:`~appliance.sources.ranges.RetryNotice`); :func:`retry_reporter` makes that callback emit a
``source.retry`` event of the running step, with ``stalled`` true when the stall watchdog (no byte
for ``sources.stall_seconds``) abandoned the attempt. So a stall shows in the task's events as it
happens, beside a progress whose rate fell to 0.
"""

from __future__ import annotations

from ..redact import redact_text
from ..sources.ranges import OnRetry, RetryNotice
from ..workflow.step import StepContext


def retry_reporter(ctx: StepContext) -> OnRetry:
    """The ``on_retry`` callback that turns each retry into a ``source.retry`` event of ``ctx``."""

    def report(notice: RetryNotice) -> None:
        ctx.event(
            "source.retry",
            message=redact_text(notice.text()),
            stalled=notice.stalled,
            offset=notice.offset,
            attempt=notice.attempt,
            attempts=notice.attempts,
        )

    return report
