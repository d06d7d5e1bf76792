"""The retry policy and stall watchdog of a read: a GET that fails transiently (broken, short, 5xx,
stalled) is retried with exponential back-off, up to ``settings.retries`` more times, each retry
logged and told to ``on_retry`` (:class:`~.ranges.RetryNotice`, a task event: a stall shows as it
happens).

The stall watchdog is the connection's read timeout: no byte for ``stall_seconds`` abandons the
attempt; when the last of the K attempts stalled, the read fails with ``Source.Stalled``
(:class:`~appliance.errors.SourceStalled`) naming the redacted URL and the offset of the first byte
not received. A failed precondition (412) is a change of the object, not retried
(:func:`.rangecheck.source_changed`). :class:`~.reader.RangeReader` retries its ranges with it,
:mod:`.single` its one stream, the preflight of a source (:mod:`appliance.steps.imports`) its two
ranged GETs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import SourceStalled
from .http import SourceUnavailable
from .neterrors import is_stall
from .origins import Response
from .rangecheck import source_changed
from .ranges import OnRetry, ReaderSettings, ReaderStats, RetryNotice, back_off

log = logging.getLogger(__name__)


class Retrier:
    """The retries of one read of ``where`` (the redacted source): failures are counted per range (or
    per stream) by the caller, retries and stalls in ``stats``; ``stop`` cuts a back-off short."""

    def __init__(
        self,
        where: str,
        settings: ReaderSettings,
        stop: threading.Event,
        *,
        stats: ReaderStats | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        self.where = where
        self.settings = settings
        self.stop = stop
        self.stats = stats if stats is not None else ReaderStats()
        #: told of every retry (a task event: a stall shows as it happens)
        self.on_retry = on_retry

    def failed(self, exc: SourceUnavailable, failures: int, offset: int) -> int:
        """Count a failed attempt that stopped at ``offset``: raise when it was the last one (a stall
        as :class:`SourceStalled`), else log, back off and return the new count."""
        stalled = is_stall(exc)
        failures += 1
        if failures > self.settings.retries:
            if stalled:
                raise SourceStalled(
                    f"{self.where} stalled at offset {offset}: no data for "
                    f"{self.settings.stall_seconds:g} seconds, {failures} times; check that the source "
                    "is reachable and serving, then import again"
                ) from exc
            raise exc
        self.stats.add(retries=1, stalls=int(stalled))
        notice = RetryNotice(
            where=self.where,
            offset=offset,
            message=f"no data for {self.settings.stall_seconds:g}s (stalled)" if stalled else exc.message,
            attempt=failures + 1,
            attempts=self.settings.retries + 1,
            stalled=stalled,
        )
        log.info("%s", notice.text())
        if self.on_retry is not None:
            try:
                self.on_retry(notice)
            except Exception:  # a notice that cannot be delivered must not break the read
                log.exception("the retry callback failed")
        back_off(self.settings, failures, self.stop)
        return failures

    def attempt(self, send: Callable[[], Response], offset: int) -> Response:
        """``send()`` (one GET), retried on transient failures; a failed precondition is a change."""
        failures = 0
        while True:
            try:
                self.stats.add(requests=1)
                return send()
            except SourceUnavailable as exc:
                if exc.status == 412:
                    raise source_changed(
                        self.where, offset, "it no longer matches what was read before"
                    ) from exc
                if not exc.transient:
                    raise
                failures = self.failed(exc, failures, offset)
