"""Progress of long-running work: a value type, a tracker that smooths and throttles, renderers.

Producers (the qemu-img reader in :mod:`appliance.image.convert`, copy loops, uploads) report raw byte
counts to a :class:`ProgressTracker`; the tracker turns them into monotonic :class:`Progress`
values with a smoothed rate and an ETA and hands them to one callback at a bounded frequency.
Consumers render them: :func:`progress_printer` draws a tqdm bar on a terminal and writes JSON
lines otherwise, so scripts and the task store read the same fields the user sees.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

log = logging.getLogger(__name__)

#: seconds of history the rate is averaged over: long enough to hide the burstiness of
#: qemu-img's per-percent reports, short enough to follow a real slowdown
RATE_WINDOW = 5.0


@dataclass(frozen=True)
class Progress:
    """One snapshot of a phase of work.

    ``done`` and ``total`` are bytes; ``percent`` (0 to 100), ``rate`` (bytes/s) and ``eta``
    (seconds) are ``None`` until they can be known (no total, no elapsed time yet).
    """

    phase: str
    done: int
    total: int | None
    percent: float | None
    rate: float | None
    eta: float | None

    @property
    def complete(self) -> bool:
        """Whether the phase has reached its total."""
        return self.total is not None and self.done >= self.total

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form with the keys ``phase, done, total, percent, rate, eta``."""
        return {
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "percent": None if self.percent is None else round(self.percent, 2),
            "rate": None if self.rate is None else round(self.rate, 1),
            "eta": None if self.eta is None else round(self.eta, 1),
        }


ProgressCallback = Callable[[Progress], None]


class ProgressTracker:
    """Turns raw ``done`` counts into smoothed, throttled :class:`Progress` callbacks.

    ``done`` never goes backwards and never exceeds ``total``: a producer that re-reports an
    older or an overshooting figure (qemu-img prints 100 % twice, percentages are rounded) does
    not make the bar jump. ``rate`` is the average over the last ``window`` seconds. Callbacks
    are at least ``min_interval`` seconds apart, except the first and the final one from
    :meth:`finish`. The tracker is thread-safe: the producer usually runs in a reader thread
    while the owner calls :meth:`finish`.
    """

    def __init__(
        self,
        phase: str,
        total: int | None,
        callback: ProgressCallback | None,
        clock: Callable[[], float] = time.monotonic,
        min_interval: float = 0.5,
        window: float = RATE_WINDOW,
        done: int = 0,
    ) -> None:
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0, not {total}")
        self.phase = phase
        self.total = total
        self._callback = callback
        self._clock = clock
        self._min_interval = min_interval
        self._lock = threading.Lock()
        self._start = clock()
        self._window = window
        #: ``done`` may start past 0 (work resumed): the rate counts only what is done from here
        self._done = done
        # (time, done) samples covering the last ``window`` seconds, oldest first
        self._samples: deque[tuple[float, int]] = deque([(self._start, done)])
        self._rate: float | None = None
        self._last_emit: float | None = None
        self._finished = False
        self._latest = self._snapshot()

    @property
    def latest(self) -> Progress:
        """The most recent snapshot, whether or not it was passed to the callback."""
        with self._lock:
            return self._latest

    def update(self, done: int) -> Progress:
        """Record that ``done`` bytes are finished; maybe call the callback; return the snapshot."""
        with self._lock:
            if self._finished:
                return self._latest
            now = self._clock()
            self._advance(now, done)
            self._latest = self._snapshot()
            emit = self._last_emit is None or now - self._last_emit >= self._min_interval
            if emit:
                self._last_emit = now
            snapshot = self._latest
        if emit:
            self._emit(snapshot)
        return snapshot

    def finish(self) -> Progress:
        """Mark the phase complete (100 %) and always emit that final snapshot, once."""
        with self._lock:
            if self._finished:
                return self._latest
            now = self._clock()
            if self.total is None:
                self.total = self._done
            self._advance(now, self.total)
            self._finished = True
            self._latest = self._snapshot(eta=0.0)
            self._last_emit = now
            snapshot = self._latest
        self._emit(snapshot)
        return snapshot

    def _advance(self, now: float, done: int) -> None:
        done = max(self._done, int(done))
        if self.total is not None:
            done = min(done, self.total)
        self._done = done
        samples = self._samples
        samples.append((now, done))
        # Keep one sample at or before the window's start so the average spans the whole window.
        while len(samples) > 2 and samples[1][0] <= now - self._window:
            samples.popleft()
        first_time, first_done = samples[0]
        if now > first_time:
            self._rate = (done - first_done) / (now - first_time)

    def _snapshot(self, eta: float | None = None) -> Progress:
        total = self.total
        percent = None
        if total is not None:
            percent = 100.0 if total == 0 else 100.0 * self._done / total
        rate = self._rate
        if eta is None and total is not None and rate is not None and rate > 0:
            eta = (total - self._done) / rate
        return Progress(self.phase, self._done, total, percent, rate, eta)

    def _emit(self, snapshot: Progress) -> None:
        if self._callback is None:
            return
        try:
            self._callback(snapshot)
        except Exception:
            # A broken renderer must not break the work it reports on (nor, in a reader
            # thread, stop the pipe from being drained): log once and stop calling it.
            log.exception("progress callback failed; progress reporting disabled for %s", self.phase)
            self._callback = None


#: a stage's progress is reported at least this often, also while no byte moves (a stall shows rate 0)
TICK_INTERVAL = 1.0
#: the percentage a stage shows at most until the step says its target is flushed
UNFLUSHED_PERCENT = 99.0


class StageMeter:
    """Bytes read from the source and written to the target by one stage of a task, as the step
    progress dict: ``phase``, ``read``, ``written``, ``done`` (= ``written``), ``total``, ``percent``,
    ``rate`` and ``eta`` (of the written bytes, smoothed over :data:`RATE_WINDOW` seconds) and
    ``converted`` (``base`` + ``written``: bytes of the disk written to the target over the task).

    ``percent`` stays at most :data:`UNFLUSHED_PERCENT` until :meth:`flushed`: only the step knows
    when the target is durable. Reported to ``report`` on every change at most every
    ``min_interval`` seconds and, while :meth:`ticking`, every ``interval`` seconds even when nothing
    moved: a stall shows as ``rate`` 0 (the window emptied) and no ``eta``, not as a frozen figure.
    Thread-safe (the ticker, a reader thread and the step's thread all call it).
    """

    def __init__(
        self,
        phase: str,
        total: int | None,
        report: Callable[[dict[str, Any]], None],
        *,
        base: int = 0,
        read: int = 0,
        written: int = 0,
        interval: float = TICK_INTERVAL,
        min_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.phase, self.total, self.base = phase, total, base
        self._report = report
        self._interval = interval
        self._lock = threading.Lock()
        #: where a resumed stage starts: its rate counts from there
        self._read = read
        self._written = written
        self._flushed = False
        self._tracker = ProgressTracker(phase, None, None, clock=clock, min_interval=0, done=written)
        self._clock = clock
        self._min_interval = min_interval
        self._last: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_total(self, total: int | None) -> None:
        with self._lock:
            self.total = total

    def read(self, total_read: int) -> None:
        """The source has handed over ``total_read`` bytes in all (never goes back)."""
        with self._lock:
            self._read = max(self._read, total_read)
        self._maybe_report()

    def wrote(self, total_written: int) -> None:
        """``total_written`` bytes of the target are written in all (never goes back)."""
        with self._lock:
            self._written = max(self._written, total_written)
        self._maybe_report()

    def flushed(self) -> dict[str, Any]:
        """The target is durable: report 100 % (with a known total), and return that snapshot."""
        with self._lock:
            self._flushed = True
        snap = self.snapshot()
        self._report(snap)
        return snap

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            read, written, total, flushed = self._read, self._written, self.total, self._flushed
        p = self._tracker.update(written)
        percent = None
        if total:
            percent = 100.0 * min(written, total) / total
            if not flushed:
                percent = min(percent, UNFLUSHED_PERCENT)
        elif total == 0 and flushed:
            percent = 100.0
        rate = p.rate
        eta = None
        if flushed:
            eta = 0.0
        elif total is not None and rate is not None and rate > 0:
            eta = max(0.0, (total - written) / rate)
        return {
            "phase": self.phase,
            "read": read,
            "written": written,
            "done": written,
            "total": total,
            "percent": None if percent is None else round(percent, 2),
            "rate": None if rate is None else round(rate, 1),
            "eta": None if eta is None else round(eta, 1),
            "converted": self.base + written,
        }

    def _maybe_report(self) -> None:
        now = self._clock()
        with self._lock:
            if self._last is not None and now - self._last < self._min_interval:
                return
            self._last = now
        self._report(self.snapshot())

    # -- the ticker -------------------------------------------------------------------------------

    def _tick(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                with self._lock:
                    self._last = self._clock()
                self._report(self.snapshot())
            except Exception:
                log.exception("progress report of %s failed; the ticker stops", self.phase)
                return

    def __enter__(self) -> StageMeter:
        """Start reporting every ``interval`` seconds (a daemon thread) until the ``with`` ends."""
        self._report(self.snapshot())
        self._thread = threading.Thread(target=self._tick, name=f"progress-{self.phase}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._report(self.snapshot())  # the last figures, which throttling may have held back


def progress_printer(stream: TextIO, *, json_lines: bool | None = None) -> ProgressCallback:
    """A callback that renders progress on ``stream``.

    On a terminal (``stream.isatty()``) it draws a tqdm bar per phase. Otherwise, or when
    ``json_lines`` is true, it writes one JSON object per update with the keys ``phase, done,
    total, percent, rate, eta`` and flushes, so a pipe reader sees each line as it happens.
    """
    if json_lines is None:
        isatty = getattr(stream, "isatty", None)
        json_lines = not (callable(isatty) and isatty())
    if json_lines:
        return _JsonLinesPrinter(stream)
    return _TqdmPrinter(stream)


class _JsonLinesPrinter:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, progress: Progress) -> None:
        line = json.dumps(progress.to_dict(), sort_keys=False)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class _TqdmPrinter:
    """One tqdm bar per phase; a bar closes when its phase completes or a new phase starts."""

    def __init__(self, stream: TextIO) -> None:
        from tqdm import tqdm  # imported lazily: only terminals need it

        self._tqdm = tqdm
        self._stream = stream
        self._lock = threading.Lock()
        self._bar: Any = None
        self._phase: str | None = None
        self._closed = False

    def __call__(self, progress: Progress) -> None:
        with self._lock:
            if progress.phase != self._phase:
                self._close()
                self._phase = progress.phase
                self._closed = False
                self._bar = self._tqdm(
                    total=progress.total,
                    desc=progress.phase,
                    file=self._stream,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    dynamic_ncols=True,
                    leave=True,
                )
            if self._closed:
                return
            if progress.total is not None and self._bar.total != progress.total:
                self._bar.total = progress.total
            self._bar.update(progress.done - self._bar.n)
            if progress.complete:
                self._close()
                self._closed = True

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
