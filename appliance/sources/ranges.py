"""The plain parts of a ranged read: settings, the plan of ranges, counters, and saved positions.

Nothing here does I/O. :mod:`.reader` reads a source with them, :mod:`.origins` fetches one range.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import SourcesConfig
from ..errors import Finding, ImageRejected
from .http import DEFAULT_BACKOFF, DEFAULT_BACKOFF_MAX, DEFAULT_RETRIES
from .httpio import sleep_or_cancel

MiB = 1 << 20
DEFAULT_PARALLEL = 4
DEFAULT_RANGE_SIZE = 8 * MiB
DEFAULT_STALL_SECONDS = 60.0
DEFAULT_CHECKPOINT_EVERY = 64 * MiB
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ReaderSettings:
    """How one source is read (defaults: ``sources.parallel_ranges``, ``range_size``,
    ``stall_seconds``, ``retries``; see :meth:`from_sources`)."""

    #: ranges in flight (fetched or waiting to be read) besides the one being read
    parallel: int = DEFAULT_PARALLEL
    range_size: int = DEFAULT_RANGE_SIZE
    #: seconds without a byte after which a range (or the single stream) is abandoned and retried
    stall_seconds: float = DEFAULT_STALL_SECONDS
    #: further attempts of one range after a failure (K = retries + 1 attempts in all)
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    backoff_max: float = DEFAULT_BACKOFF_MAX
    #: bytes between two calls of the checkpoint callback (at range boundaries)
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    #: the largest source read (None: no cap): a larger one is refused from its declared size before
    #: its body is read, and a source without one as soon as its bytes pass the cap
    max_size: int | None = None

    def __post_init__(self) -> None:
        if self.parallel < 1 or self.range_size < 1 or self.stall_seconds <= 0 or self.retries < 0:
            raise ValueError(f"bad reader settings {self}")
        if self.max_size is not None and self.max_size < 0:
            raise ValueError(f"bad reader settings {self}")

    @classmethod
    def from_sources(cls, sources: SourcesConfig | None, **overrides: Any) -> ReaderSettings:
        """The settings of ``config.sources`` (the defaults without one), then ``overrides``
        (``max_size``, the download limit, is the caller's: no cap unless given)."""
        values: dict[str, Any] = {}
        if sources is not None:
            values.update(
                parallel=sources.parallel_ranges,
                range_size=sources.range_size,
                stall_seconds=sources.stall_seconds,
                retries=sources.retries,
                checkpoint_every=sources.checkpoint_every,
            )
        values.update(overrides)
        return cls(**values)


def too_large(where: str, max_size: int, size: int | None = None) -> ImageRejected:
    """``SizeLimitExceeded.Download``: ``where`` is larger (``size`` bytes, when it said so) than the
    limit ``max_size``."""
    told = f" ({size} bytes)" if size is not None else ""
    return ImageRejected(
        [
            Finding.error(
                "SizeLimitExceeded.Download",
                f"{where} is larger{told} than the download limit of {max_size} bytes; nothing was kept. "
                "Import a smaller or compressed image, or raise the limit",
            )
        ]
    )


@dataclass(frozen=True)
class RetryNotice:
    """One retry of a read, as the reader decided it: ``where`` names the source (redacted) or the
    part, ``offset`` the first byte not received, ``message`` why the attempt failed, ``attempt`` the
    number of the attempt about to be made of ``attempts`` in all, ``stalled`` whether the stall
    watchdog (no byte for ``stall_seconds``) abandoned it."""

    where: str
    offset: int
    message: str
    attempt: int
    attempts: int
    stalled: bool

    def text(self) -> str:
        return (
            f"{self.where} at offset {self.offset}: {self.message}; attempt {self.attempt} of {self.attempts}"
        )


#: what a reader calls on every retry (in the thread that retries; it must not raise)
OnRetry = Callable[[RetryNotice], None]


def back_off(settings: ReaderSettings, failures: int, cancel: threading.Event | None) -> None:
    """Sleep before attempt ``failures`` + 1 (exponential, jittered); Cancelled on cancel."""
    delay = min(settings.backoff_max, settings.backoff * 2 ** (failures - 1))
    sleep_or_cancel(delay / 2 + random.uniform(0, delay / 2), cancel, "download")


@dataclass(frozen=True)
class Span:
    """Bytes ``[start, end)`` of the object, the ``index``-th range of the read."""

    index: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def plan(begin: int, size: int, range_size: int) -> list[Span]:
    """The ranges covering ``[begin, size)``, ``range_size`` bytes each (the last one shorter)."""
    return [Span(i, s, min(s + range_size, size)) for i, s in enumerate(range(begin, size, range_size))]


def parse_content_range(status: int, value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total or None) of a 206 answer's ``Content-Range``, else None."""
    m = _CONTENT_RANGE.match(value.strip()) if value else None
    if status != 206 or m is None:
        return None
    return int(m.group(1)), int(m.group(2)), None if m.group(3) == "*" else int(m.group(3))


@dataclass(frozen=True)
class Validator:
    """What every ranged GET must still match: a strong ETag (no quotes), else a Last-Modified
    date. False when the source gave neither (then nothing tells two versions apart)."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)


@dataclass
class ReaderStats:
    """Counters of one read, updated by every thread through :meth:`add`."""

    #: GETs sent
    requests: int = 0
    #: body bytes received (re-read and thrown-away bytes included)
    received: int = 0
    #: bytes held in range buffers now: received, not yet read by the consumer
    buffered: int = 0
    #: the most ``buffered`` ever was (the memory bound: about (parallel + 1) x range_size)
    peak_buffered: int = 0
    #: failed attempts that were retried, and how many of them were stalls
    retries: int = 0
    stalls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)
            self.peak_buffered = max(self.peak_buffered, self.buffered)


@dataclass(frozen=True)
class ReadPosition:
    """A verified high-water mark to resume from; plain JSON with :meth:`to_dict` / :meth:`from_dict`.

    Every byte before ``offset`` was read by the consumer. The last range before it,
    ``[offset - tail, offset)``, hashes to ``tail_sha256``: a resumed read fetches it again and
    compares before it goes on, and requires the same size and validator.
    """

    offset: int
    size: int | None
    etag: str | None
    last_modified: str | None
    tail: int
    tail_sha256: str

    def __post_init__(self) -> None:
        if not 0 < self.tail <= self.offset or (self.size is not None and self.offset > self.size):
            raise ValueError(f"not a read position: offset {self.offset}, tail {self.tail}, size {self.size}")
        if not _SHA256.match(self.tail_sha256):
            raise ValueError("not a read position: tail_sha256 is not a SHA-256")

    @property
    def validator(self) -> Validator:
        return Validator(self.etag, self.last_modified)

    def to_dict(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "size": self.size,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "tail": self.tail,
            "tail_sha256": self.tail_sha256,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReadPosition:
        """Raises ValueError for anything that is not a saved position."""
        try:
            size, etag, modified = data["size"], data.get("etag"), data.get("last_modified")
            return cls(
                offset=int(data["offset"]),
                size=None if size is None else int(size),
                etag=None if etag is None else str(etag),
                last_modified=None if modified is None else str(modified),
                tail=int(data["tail"]),
                tail_sha256=str(data["tail_sha256"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a read position: {exc}") from exc
