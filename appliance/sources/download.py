"""Download one source into a file with the ranged reader: parallel, capped, checkpointed, resumable.

:func:`download_to_file` is what ``source.fetch`` (ImportImage / ImportSnapshot: an S3 ``Url`` or
UserBucket, an https URL) uses. The bytes come from :class:`~.reader.RangeReader`: parallel ranged
GETs where the origin serves ranges (each verified, retried with back-off, the stall watchdog), one
stream where it does not, and the download limit (``max_bytes``) applied by the reader itself — from
the announced size before any body is read, and while a source without one streams.

Checkpoints. Every ``settings.checkpoint_every`` bytes (at a range boundary) the file is flushed
and fsynced, then ``checkpoint(state)`` is called with a plain-JSON state (the verified
:class:`~.ranges.ReadPosition`). The caller keeps it where a resumed task finds it (the task
store). ``resume=state`` continues from it when the file is still there and its bytes before the
position hash as they did (the last range is re-read from the source and compared too); otherwise
the download starts again from zero. A file resumed that way gets the same SHA-256 as a fresh one.

On a failure the file is removed — except on :class:`~appliance.errors.Cancelled` with
``keep_on_cancel`` (a suspended task resumes from its checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from .. import pagecache
from ..errors import Cancelled
from ..nospace import is_no_space, no_space_error
from .fetch import FetchResult, parse_source
from .http import HttpClient, SourceIntegrity
from .ranges import OnRetry, ReaderSettings, ReaderStats, ReadPosition
from .reader import RangeReader, open_reader
from .urlfilter import UrlPolicy

log = logging.getLogger(__name__)

#: bytes copied from the reader to the file at a time
_PIECE = 1 << 20
#: bytes read at a time when a resumed file's prefix is hashed again
_HASH_PIECE = 4 << 20


class _Hashes:
    """SHA-256 of everything written, and MD5 (checked against a single-part S3 ETag)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5()

    def update(self, data: bytes | memoryview) -> None:
        self.sha.update(data)
        self.md5.update(data)


def _prefix(out: BinaryIO, position: ReadPosition) -> _Hashes | None:
    """The hashes of the file's first ``position.offset`` bytes, or None when the file is shorter or
    its last range before the position does not hash as saved (then nothing of it is trusted)."""
    size = os.fstat(out.fileno()).st_size
    if size < position.offset:
        return None
    hashes, tail = _Hashes(), hashlib.sha256()
    tail_start = position.offset - position.tail
    out.seek(0)
    done = 0
    while done < position.offset:
        data = out.read(min(_HASH_PIECE, position.offset - done))
        if not data:
            return None
        hashes.update(data)
        if done + len(data) > tail_start:
            tail.update(data[max(0, tail_start - done) :])
        done += len(data)
    return hashes if tail.hexdigest() == position.tail_sha256 else None


def _saved_position(resume: Mapping[str, Any] | None) -> ReadPosition | None:
    if not resume:
        return None
    try:
        return ReadPosition.from_dict(resume["position"])
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring a download checkpoint that is not one (%s): starting from zero", exc)
        return None


def download_to_file(
    source: Mapping[str, Any],
    dst: Path,
    policy: UrlPolicy,
    s3cfg: Mapping[str, Any] | None = None,
    *,
    max_bytes: int,
    settings: ReaderSettings | None = None,
    reserve: Callable[[int, bool], None] | None = None,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: Mapping[str, Any] | None = None,
    keep_on_cancel: bool = False,
    http: HttpClient | None = None,
    stats: ReaderStats | None = None,
    on_retry: OnRetry | None = None,
) -> FetchResult:
    """Download ``source`` (``{"url"}`` or ``{"bucket", "key"}``) into ``dst`` (see the module docstring).

    ``settings`` default to ``policy.sources``; their ``max_size`` is ``max_bytes``. ``reserve(n,
    whole)`` claims scratch before bytes are written (``whole``: the declared size, once); it raises
    ``InsufficientScratch`` to stop. ``on_progress(done, total_or_None)`` follows the writes. ``stats``,
    when given, receives the reader's counters at the end (requests, bytes received, retries);
    ``on_retry`` is told of every retry as it happens.

    Raises :class:`~appliance.errors.ImageRejected` (``SizeLimitExceeded.Download``),
    :class:`~.http.SourceUnavailable`, :class:`~appliance.errors.SourceChanged`,
    :class:`~appliance.errors.SourceStalled`, :class:`SourceIntegrity`, :class:`UrlNotAllowed`,
    :class:`Cancelled`, :class:`InsufficientScratch`.
    """
    src = parse_source(source)
    base = settings or ReaderSettings.from_sources(policy.sources)
    settings = dataclasses.replace(base, max_size=max_bytes)
    position = _saved_position(resume)
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    hashes: _Hashes | None = None
    out: BinaryIO | None = None
    if position is not None:
        try:
            out = os.fdopen(os.open(dst, flags), "r+b")
        except FileNotFoundError:
            out = None
        if out is not None:
            hashes = _prefix(out, position)
            if hashes is None:
                log.info("%s: the partial download does not match its checkpoint: starting from zero", src)
                out.close()
                out = None
    if out is None:
        position = None
        dst.unlink(missing_ok=True)
        out = os.fdopen(os.open(dst, flags | os.O_CREAT | os.O_EXCL, 0o600), "r+b")
        hashes = _Hashes()
    assert hashes is not None
    done = position.offset if position is not None else 0
    out.seek(done)
    out.truncate(done)
    reader: RangeReader | None = None
    outcome = "failed"  # "done", "kept" (cancelled, keep_on_cancel) or "failed" (the file goes)

    def saved(at: ReadPosition) -> None:
        assert out is not None
        out.flush()
        os.fsync(out.fileno())  # the bytes before the position are durable before it is recorded
        if checkpoint is not None:
            checkpoint({"position": at.to_dict()})

    # the download leaves the page cache as it is written (appliance.pagecache): the conversion
    # that follows reads it around the cache
    behind = pagecache.WriteBehind(out.fileno())
    try:
        with out:
            reader = open_reader(
                source,
                policy,
                s3cfg,
                cancel=cancel,
                start=position,
                checkpoint=saved,
                settings=settings,
                http=http,
                on_retry=on_retry,
            )
            with reader:
                total = reader.size
                if position is not None:
                    log.info("%s: resuming the download at byte %d of %s", src, done, total)
                if total is not None and reserve is not None:
                    reserve(total, True)
                # views of the reader's range buffers: written and hashed without a copy
                while piece := reader.readview(_PIECE):
                    with piece:
                        n = len(piece)
                        if reserve is not None and total is None:
                            reserve(done + n, False)
                        out.write(piece)
                        hashes.update(piece)
                    behind.wrote(n)
                    done += n
                    if on_progress is not None:
                        on_progress(done, total)
                md5_etag, etag = reader.md5_etag, reader.etag
            if total is not None and done != total:
                raise SourceIntegrity(f"{src}: received {done} bytes, the source declared {total}")
            if md5_etag is not None and hashes.md5.hexdigest() != md5_etag:
                raise SourceIntegrity(
                    f"{src}: the MD5 of the received bytes ({hashes.md5.hexdigest()}) does not match the "
                    f"ETag ({md5_etag}); the download was corrupted, try again"
                )
            out.flush()
            os.fsync(out.fileno())
            behind.done()
        outcome = "done"
        return FetchResult(dst, done, hashes.sha.hexdigest(), etag, md5_etag)
    except Cancelled:
        if keep_on_cancel:
            outcome = "kept"
        raise
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(dst.parent, f"downloading {src} ({done} bytes received)") from exc
        raise
    finally:
        if reader is not None and stats is not None:
            _copy_stats(reader.stats, stats)
        if outcome == "failed":
            dst.unlink(missing_ok=True)


def _copy_stats(got: ReaderStats, into: ReaderStats) -> None:
    into.add(requests=got.requests, received=got.received, retries=got.retries, stalls=got.stalls)
    into.peak_buffered = max(into.peak_buffered, got.peak_buffered)
