"""Where a ranged read gets its bytes: an http(s) URL or an S3 object, one GET at a time.

An :class:`Origin` sends one GET — of a byte range, conditional on a :class:`~.ranges.Validator` —
and returns the answer unread (a :class:`Response`). It neither retries nor verifies the body: the
reader (:mod:`.reader`) does, for every kind of origin alike. So the clients the origins use do not
retry either (``retries=0``) and wait at most ``stall_seconds`` for a byte: their read timeout is the
stall watchdog.

- :class:`HttpOrigin`: an http(s) URL (an ImportImage URL or a presigned manifest part) through
  :class:`~.http.HttpClient`, i.e. the SSRF policy, pinned addresses and every redirect re-checked.
  Ranged GETs carry ``If-Match`` with a strong ETag, else ``If-Unmodified-Since`` with Last-Modified.
- :class:`S3Origin`: an S3 object with boto3 and the appliance's credentials (``sources.s3``);
  ranged GETs carry ``IfMatch``.

- :class:`~.upload.UploadOrigin`: a staged upload (``upload://{id}``) of the task's account, read
  from the appliance's own disk.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Generator, Mapping
from typing import Any, Protocol

from ..redact import redact_url
from . import s3 as s3mod
from .fetch import Source, parse_source
from .http import HttpClient, SourceUnavailable
from .ranges import ReaderSettings, Validator
from .staged import UploadArea
from .upload import UploadOrigin
from .urlfilter import UrlPolicy

_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


class Response(Protocol):
    """An answer whose body has not been read (:class:`~.http.HttpResponse`, :class:`~.s3.S3Stream`)."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def etag(self) -> str | None: ...
    def iter_chunks(self, chunk_size: int = ...) -> Generator[bytes, None, None]: ...
    def fill(self, view: memoryview, step: int = ...) -> Generator[int, None, None]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> None: ...


class Origin(Protocol):
    """One source, read by GETs. ``where`` names it in messages, redacted."""

    @property
    def where(self) -> str: ...

    def get(
        self,
        start: int,
        end: int | None,
        *,
        if_match: Validator | None = None,
        if_range: Validator | None = None,
        cancel: threading.Event,
    ) -> Response:
        """GET bytes ``start``..``end`` (inclusive; ``end`` None: to the end; ``(0, None)``: the whole
        object, no Range header). ``if_match``: only if the object still matches (else
        :class:`SourceUnavailable` with ``status`` 412); ``if_range`` (http only): the whole object
        when it does not. Raises :class:`SourceUnavailable` for an answer that is not a body
        (``transient`` when a retry may help, ``status`` 416 for a range outside the object)."""
        ...

    def validator(self, response: Response) -> Validator:
        """What later GETs must match, from the first answer."""
        ...

    def md5_etag(self, response: Response) -> str | None:
        """The ETag when it is the MD5 of the whole object, else None."""
        ...


def http_unavailable(where: str, status: int) -> SourceUnavailable:
    """The coded error for an HTTP answer that is not the body (404, 403, …)."""
    if status == 404:
        why = "Reason 404 Not Found]; check the URL and that the image was uploaded"
    elif status in (401, 403):
        why = (
            f"We do not have access to the given resource. Reason {status} Forbidden]; check the URL (a "
            "presigned URL may have expired)"
        )
    else:
        why = f"Reason HTTP {status}]"
    transient = status in (408, 425, 429) or status >= 500
    return SourceUnavailable(f"Disk validation failed [{where}: {why}", status=status, transient=transient)


class HttpOrigin:
    """An http(s) URL under the SSRF policy (every redirect re-checked by :class:`HttpClient`)."""

    def __init__(self, http: HttpClient, url: str) -> None:
        self.http, self.url = http, url
        self.where = redact_url(url)

    def get(
        self,
        start: int,
        end: int | None,
        *,
        if_match: Validator | None = None,
        if_range: Validator | None = None,
        cancel: threading.Event,
    ) -> Response:
        headers: dict[str, str] = {}
        if if_range:
            value = f'"{if_range.etag}"' if if_range.etag else if_range.last_modified
            headers["If-Range"] = value or ""
        if if_match and if_match.etag:
            headers["If-Match"] = f'"{if_match.etag}"'
        elif if_match and if_match.last_modified:
            headers["If-Unmodified-Since"] = if_match.last_modified
        rng = None if start == 0 and end is None else (start, end)
        response = self.http.get_stream(self.url, rng, headers=headers, cancel=cancel)
        if response.status in (200, 206):
            return response
        response.close()
        if response.status in (412, 416):
            raise SourceUnavailable(f"{self.where} answered HTTP {response.status}", status=response.status)
        raise http_unavailable(self.where, response.status)

    def validator(self, response: Response) -> Validator:
        raw = response.headers.get("ETag")
        # If-Match and If-Range compare strongly: a weak ETag cannot be used, a date can
        if raw and not raw.startswith("W/"):
            return Validator(etag=raw.strip('"'))
        return Validator(last_modified=response.headers.get("Last-Modified"))

    def md5_etag(self, response: Response) -> str | None:
        return None  # only S3 says what its ETags are


class S3Origin:
    """An S3 object read with boto3 and the appliance's credentials."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.where = f"s3://{bucket}/{key}"

    def get(
        self,
        start: int,
        end: int | None,
        *,
        if_match: Validator | None = None,
        if_range: Validator | None = None,
        cancel: threading.Event,
    ) -> Response:
        # S3 has no If-Range; If-Match makes a resumed stream fail (412) instead of mixing versions
        validator = if_match or if_range
        rng = None if start == 0 and end is None else (start, end)
        etag = validator.etag if validator else None
        return s3mod.open_object(self.client, self.bucket, self.key, rng, if_match=etag, cancel=cancel)

    def validator(self, response: Response) -> Validator:
        return Validator(etag=response.etag)

    def md5_etag(self, response: Response) -> str | None:
        """The ETag of a single-part upload without SSE-KMS / SSE-C: the MD5 of the object."""
        if not isinstance(response, s3mod.S3Stream) or response.etag is None:
            return None
        if (response.sse or "").startswith("aws:kms") or response.sse_customer:
            return None
        etag = response.etag.lower()
        return etag if _PLAIN_MD5.match(etag) else None


def watchdog_http(http: HttpClient, settings: ReaderSettings) -> HttpClient:
    """A copy of ``http`` that waits at most ``stall_seconds`` for a byte and does not retry (the
    reader retries every failure itself, counting stalls)."""
    client = copy.copy(http)
    client.read_timeout = settings.stall_seconds
    client.retries = 0
    return client


def origin_for(
    source: Mapping[str, Any] | Source,
    policy: UrlPolicy,
    s3cfg: Mapping[str, Any] | None = None,
    *,
    settings: ReaderSettings,
    http: HttpClient | None = None,
) -> Origin:
    """The :class:`Origin` of a source mapping (``{"url": "https://…" | "s3://…" | "upload://…"}`` or
    ``{"bucket", "key"}``) or a parsed :class:`~.fetch.Source`. ``s3cfg`` defaults to ``policy.sources.s3``;
    ``http`` (default: a client of ``policy``) gives the https origin its CA bundle and timeouts."""
    src = source if isinstance(source, Source) else parse_source(source)
    if src.kind == "upload":
        assert src.upload_id
        return UploadOrigin(UploadArea.from_sources(policy.sources), src.account, src.upload_id)
    if src.kind == "s3":
        assert src.bucket and src.key
        cfg = s3cfg if s3cfg is not None else (policy.sources.s3 if policy.sources else {})
        client = s3mod.s3_client(
            cfg,
            policy,
            read_timeout=settings.stall_seconds,
            retries=0,
            max_pool_connections=max(10, settings.parallel + 2),
        )
        return S3Origin(client, src.bucket, src.key)
    assert src.url
    return HttpOrigin(watchdog_http(http or HttpClient(policy), settings), src.url)
