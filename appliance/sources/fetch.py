"""Fetch one disk image (ImportImage / ImportSnapshot DiskContainer) to a local file, safely.

A source is ``{"url": "https://…" | "s3://bucket/key"}`` or ``{"bucket": …, "key": …}`` (UserBucket).
:func:`fetch_to_file` streams it to a new file, hashing (SHA-256) as it goes, never writing more than
``max_bytes`` (``SizeLimitExceeded.Download``) nor more than the caller's scratch reservation
admits (``InsufficientScratch``), and resumes with a Range request from the bytes already
written when the connection breaks — guarded by If-Range / If-Match so a changed object is never
stitched onto an old prefix (the download restarts from zero instead). On any failure or cancel the
partial file is removed. :func:`open_stream` hands a raw stream to consumers that do their own writing.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import Finding, ImageRejected, UsageError
from ..nospace import is_no_space, no_space_error
from ..redact import redact_url
from . import s3 as s3mod
from .http import HttpClient, HttpResponse, SourceIntegrity, SourceUnavailable, TransferInterrupted
from .httpio import sleep_or_cancel
from .methods import is_upload_url
from .ranges import Validator
from .s3names import check_bucket, check_key
from .staged import UploadArea
from .stagedproto import parse_upload_url
from .upload import UploadOrigin
from .urlfilter import UrlPolicy, parse_s3_url

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class FetchResult:
    path: Path
    size: int
    sha256: str
    #: the source's ETag (no quotes), when it sent one
    etag: str | None
    #: the MD5 the ETag carried and the received bytes matched (None: the ETag is not an MD5)
    md5_checked: str | None = None


@dataclass(frozen=True)
class Source:
    """A parsed source: ``kind`` is ``http`` (``url``), ``s3`` (``bucket`` and ``key``) or
    ``upload`` (``upload_id`` of ``account``: a staged upload, :mod:`.staged`)."""

    kind: str
    url: str | None = None
    bucket: str | None = None
    key: str | None = None
    upload_id: str | None = None
    account: str = ""

    def __str__(self) -> str:
        if self.kind == "upload":
            return f"upload://{self.upload_id}"
        return redact_url(self.url) if self.kind == "http" and self.url else f"s3://{self.bucket}/{self.key}"


def parse_source(source: Mapping[str, Any]) -> Source:
    """``{"url": ...}`` (http, https, s3:// or upload://) or ``{"bucket": ..., "key": ...}``; UsageError
    otherwise."""
    url = source.get("url")
    if url:
        if is_upload_url(str(url)):
            # the account is the task's (the step that fetches puts it in), never the request's
            return Source(
                "upload", upload_id=parse_upload_url(str(url)), account=str(source.get("account") or "")
            )
        if str(url).lower().startswith("s3://"):
            url_bucket, url_key = parse_s3_url(str(url))
            return Source("s3", bucket=url_bucket, key=url_key)
        return Source("http", url=str(url))
    bucket, key = source.get("bucket"), source.get("key")
    if bucket and key:
        # checked at submit too; a task submitted otherwise (imaging run) gets the same message
        return Source("s3", bucket=check_bucket(str(bucket)), key=check_key(str(key)))
    raise UsageError("a disk container needs either Url or UserBucket (S3Bucket and S3Key)")


class _Reader:
    """Opens the source at an offset, with the client it needs (built once)."""

    def __init__(
        self,
        src: Source,
        policy: UrlPolicy,
        s3cfg: Mapping[str, Any] | None,
        http: HttpClient | None,
        s3_client: Any,
        cancel: threading.Event | None,
    ) -> None:
        self.src, self.cancel = src, cancel
        self.http = http or HttpClient(policy)
        self.s3 = s3_client
        self.upload: UploadOrigin | None = None
        if src.kind == "upload":
            assert src.upload_id
            self.upload = UploadOrigin(UploadArea.from_sources(policy.sources), src.account, src.upload_id)
        if src.kind == "s3" and self.s3 is None:
            cfg = s3cfg if s3cfg is not None else (policy.sources.s3 if policy.sources else {})
            self.s3 = s3mod.s3_client(cfg, policy)

    def open(self, start: int = 0, validator: str | None = None) -> HttpResponse | s3mod.S3Stream:
        """The stream from byte ``start``; ``validator`` (ETag) makes a resumed read conditional."""
        rng = (start, None) if start else None
        if self.upload is not None:
            etag = validator.strip('"') if start and validator else None
            return self.upload.get(  # type: ignore[return-value]
                start,
                None,
                if_match=Validator(etag=etag) if etag else None,
                cancel=self.cancel or threading.Event(),
            )
        if self.src.kind == "s3":
            assert self.s3 is not None and self.src.bucket and self.src.key
            return s3mod.open_object(
                self.s3,
                self.src.bucket,
                self.src.key,
                rng,
                if_match=validator if start else None,
                cancel=self.cancel,
            )
        assert self.src.url
        headers = {"If-Range": validator} if start and validator else {}
        response = self.http.get_stream(self.src.url, rng, headers=headers, cancel=self.cancel)
        if response.status in (200, 206):
            return response
        response.close()
        raise _http_unavailable(self.src, response.status)


def _http_unavailable(src: Source, status: int) -> SourceUnavailable:
    if status == 404:
        why = "Reason 404 Not Found]; check the URL and that the image was uploaded"
    elif status in (401, 403):
        why = (
            f"We do not have access to the given resource. Reason {status} Forbidden]; check the URL (a "
            + ("presigned URL may have expired)")
        )
    else:
        why = f"Reason HTTP {status}]"
    return SourceUnavailable(f"Disk validation failed [{src}: {why}", status=status)


def open_stream(
    source: Mapping[str, Any],
    policy: UrlPolicy,
    s3cfg: Mapping[str, Any] | None = None,
    *,
    cancel: threading.Event | None = None,
    http: HttpClient | None = None,
    s3_client: Any = None,
) -> HttpResponse | s3mod.S3Stream:
    """An open stream of the whole source (``status``, ``content_length``, ``etag``, ``iter_chunks()``,
    ``close()``; use it in ``with``). No size cap, hashing or resume: the consumer does its own.
    Raises :class:`SourceUnavailable`, :class:`UrlNotAllowed`, :class:`UsageError`."""
    return _Reader(parse_source(source), policy, s3cfg, http, s3_client, cancel).open()


def _too_large(src: Source, max_bytes: int, size: int | None = None) -> ImageRejected:
    told = f" ({size} bytes)" if size is not None else ""
    return ImageRejected(
        [
            Finding.error(
                "SizeLimitExceeded.Download",
                f"{src} is larger{told} than the download limit of {max_bytes} bytes; nothing was kept. "
                "Import a smaller or compressed image, or raise the limit",
            )
        ]
    )


def _range_start(stream: HttpResponse | s3mod.S3Stream) -> tuple[int, int | None] | None:
    """(first byte, total size or None) from Content-Range, or None when the answer is not partial."""
    value = stream.headers.get("Content-Range")
    m = _CONTENT_RANGE.match(value.strip()) if value else None
    if stream.status != 206 or m is None:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _md5_etag(stream: HttpResponse | s3mod.S3Stream) -> str | None:
    """The ETag when it is the MD5 of the object: S3 single-part uploads without SSE-KMS / SSE-C."""
    if not isinstance(stream, s3mod.S3Stream) or stream.etag is None:
        return None
    if (stream.sse or "").startswith("aws:kms") or stream.sse_customer:
        return None
    etag = stream.etag.lower()
    return etag if _PLAIN_MD5.match(etag) else None


def fetch_to_file(
    source: Mapping[str, Any],
    dst: Path,
    policy: UrlPolicy,
    s3cfg: Mapping[str, Any] | None = None,
    *,
    max_bytes: int,
    reserve: Callable[[int, bool], None] | None = None,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
    retries: int | None = None,
    http: HttpClient | None = None,
    s3_client: Any = None,
) -> FetchResult:
    """Download ``source`` into the new file ``dst`` (created exclusively, never through a symlink).

    ``on_progress(bytes_done, total_or_None)`` follows every chunk. A transfer that breaks is resumed
    with a Range request from the bytes written so far, up to ``retries`` times (default
    ``sources.retries``). For S3 single-part objects the MD5 is checked against the ETag.

    ``max_bytes`` is the download limit. ``reserve(n, whole)`` claims room for the file before bytes are
    written: once with the declared size (``whole`` True) when the source sends one, and with the bytes
    received so far before each chunk (a no-op while they are covered; this is how a chunked source
    without Content-Length is reserved, as it arrives). It raises ``InsufficientScratch`` to stop the
    download (see :class:`appliance.allowance.Allowance`).

    Raises :class:`ImageRejected` (``SizeLimitExceeded.Download``) past ``max_bytes``,
    :class:`SourceUnavailable`, :class:`SourceIntegrity`, :class:`UrlNotAllowed`, :class:`Cancelled`,
    :class:`InsufficientScratch` (no room, reserved or on disk); ``dst`` is removed on every failure.
    """
    src = parse_source(source)
    reader = _Reader(src, policy, s3cfg, http, s3_client, cancel)
    allowed_failures = retries if retries is not None else reader.http.retries
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    progress = _Progress()
    failures = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                if progress.done and progress.validator is None:
                    progress.restart(out)  # nothing guarantees the object is unchanged: never stitch
                try:
                    stream = reader.open(progress.done, progress.validator)
                except SourceUnavailable as exc:
                    if progress.done and exc.status == 412:  # If-Match failed: the object changed
                        progress.restart(out)
                        continue
                    if not exc.transient or failures >= allowed_failures:
                        raise
                    failures += 1
                    _back_off(reader.http, failures, cancel)
                    continue
                try:
                    with stream:
                        if progress.done and _range_start(stream) is None:
                            # a full answer (If-Range saw a changed object, or Range is not supported)
                            progress.restart(out)
                        if progress.done == 0:
                            progress.begin(stream, src)
                            if progress.total is not None and progress.total > max_bytes:
                                raise _too_large(src, max_bytes, progress.total)
                            if progress.total is not None and reserve is not None:
                                reserve(progress.total, True)
                        else:
                            first = _range_start(stream)
                            if first is None or first[0] != progress.done:
                                raise SourceIntegrity(
                                    f"{src} resumed at the wrong offset ({first}), not at {progress.done}"
                                )
                        for chunk in stream.iter_chunks():
                            if progress.done + len(chunk) > max_bytes:
                                raise _too_large(src, max_bytes)
                            if reserve is not None:
                                reserve(progress.done + len(chunk), False)
                            out.write(chunk)
                            progress.add(chunk)
                            if on_progress is not None:
                                on_progress(progress.done, progress.total)
                    if progress.total is not None and progress.done < progress.total:
                        raise TransferInterrupted(
                            f"{src} ended after {progress.done} of {progress.total} bytes",
                            received=progress.done,
                        )
                    break
                except TransferInterrupted:
                    if failures >= allowed_failures:
                        raise
                    failures += 1
                    _back_off(reader.http, failures, cancel)
            progress.verify(src)
            out.flush()
            os.fsync(out.fileno())
        return FetchResult(dst, progress.done, progress.sha.hexdigest(), progress.etag)
    except OSError as exc:
        dst.unlink(missing_ok=True)
        if is_no_space(exc):
            raise no_space_error(dst.parent, f"downloading {src} ({progress.done} bytes received)") from exc
        raise
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


class _Progress:
    """What has been written so far, and what a resumed request must match."""

    def __init__(self) -> None:
        self.done = 0
        self.total: int | None = None
        self.etag: str | None = None
        #: If-Range (http: strong ETag or Last-Modified) / If-Match (s3: ETag) value for a resume
        self.validator: str | None = None
        self.md5_etag: str | None = None
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5()

    def restart(self, out: BinaryIO) -> None:
        out.seek(0)
        out.truncate()
        self.__init__()  # type: ignore[misc]

    def begin(self, stream: HttpResponse | s3mod.S3Stream, src: Source) -> None:
        self.total = stream.content_length
        self.etag = stream.etag
        self.md5_etag = _md5_etag(stream)
        if src.kind == "s3":
            self.validator = stream.etag
        else:
            raw = stream.headers.get("ETag")
            # If-Range needs a strong validator; a weak ETag cannot be used, a date can
            self.validator = raw if raw and not raw.startswith("W/") else stream.headers.get("Last-Modified")

    def add(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        self.md5.update(chunk)
        self.done += len(chunk)

    def verify(self, src: Source) -> None:
        if self.total is not None and self.done != self.total:
            raise SourceIntegrity(f"{src}: received {self.done} bytes, the source declared {self.total}")
        if self.md5_etag is not None and self.md5.hexdigest() != self.md5_etag:
            raise SourceIntegrity(
                f"{src}: the MD5 of the received bytes ({self.md5.hexdigest()}) does not match the ETag "
                f"({self.md5_etag}); the download was corrupted, try again"
            )


def _back_off(http: HttpClient, failures: int, cancel: threading.Event | None) -> None:
    delay = min(http.backoff_max, http.backoff * 2 ** (failures - 1))
    sleep_or_cancel(delay / 2 + random.uniform(0, delay / 2), cancel, "download")
