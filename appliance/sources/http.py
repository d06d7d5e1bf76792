"""HTTP(S) client for untrusted URLs: pinned addresses, re-validated redirects, bounded retries.

Every request goes through :meth:`UrlPolicy.check` first and then connects to the address that check resolved
(DNS pinning), while sending the URL's own ``Host`` header and, for https, SNI and certificate verification
for the URL's host name. Connections are kept alive and reused across requests in pools per checked address
(:mod:`.httppool`), so the ranges of one import share a few connections (and TLS handshakes) instead of
opening one each; the check still runs before every request. Redirects are never followed blindly: each
``Location`` is checked again (a redirect to 169.254.169.254 fails with ``UrlNotAllowed`` before anything
connects to it), at most :data:`MAX_REDIRECTS` hops. Connection errors and 5xx answers are retried with
exponential back-off and jitter; 4xx answers are returned to the caller, which knows what a 404 means for it.
Errors in the middle of a body raise :class:`TransferInterrupted` so callers can resume (Range) or retry.

Messages describe a network failure in fixed words (:func:`describe_network_error`: "connection
refused", "read timed out"…), never with the text of urllib3's, http.client's or botocore's
exceptions, which is written for programmers and ends up in the task's status message.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import threading
from collections.abc import Callable, Generator, Mapping
from urllib.parse import urljoin

import urllib3
from urllib3.exceptions import ConnectTimeoutError, ProtocolError, SSLError
from urllib3.exceptions import HTTPError as _Urllib3Error

from ..config import SourcesConfig
from ..errors import ImagingError
from ..redact import redact_url
from .httpio import (
    CHUNK_SIZE,
    FILL_STEP,
    direct_readinto,
    raise_if_cancelled,
    shutdown_on_cancel,
    sleep_or_cancel,
)
from .httppool import DEFAULT_POOL_SIZE, PinnedPools, finish
from .neterrors import describe_network_error
from .urlfilter import CheckedUrl, HostUnresolvable, UrlNotAllowed, UrlPolicy

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
USER_AGENT = "imaging-appliance/0.1"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Defaults match config.DEFAULTS["sources"]; used when the policy did not come from a configuration.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_RETRIES = 5
#: back-off before retry n (0-based) is in [d/2, d] with d = min(backoff_max, backoff * 2**n)
DEFAULT_BACKOFF = 0.5
DEFAULT_BACKOFF_MAX = 30.0


class SourceUnavailable(ImagingError):
    """The source could not be read: unreachable, refused, missing, or failed after every retry.

    ``status`` is the last HTTP status when there was one; ``transient`` says a retry may succeed.
    """

    code = "SourceUnavailable"

    def __init__(
        self, message: str, *, status: int | None = None, transient: bool = False, code: str | None = None
    ) -> None:
        super().__init__(message, code)
        self.status = status
        self.transient = transient


class TransferInterrupted(SourceUnavailable):
    """The connection broke, timed out or ended early in the middle of a body (retry or resume)."""

    def __init__(self, message: str, *, received: int = 0) -> None:
        super().__init__(message, transient=True)
        self.received = received


class SourceIntegrity(ImagingError):
    """The bytes received do not match what the source declared (length, MD5/ETag)."""

    code = "SourceIntegrity"


class BodyTooLong(SourceIntegrity):
    """A body went on past the buffer :meth:`HttpResponse.fill` was given (the bytes asked for)."""


def fill_pieces(
    readinto: Callable[[memoryview], int], view: memoryview, step: int, cancel: threading.Event | None
) -> Generator[int, None, None]:
    """``readinto`` (a body's) straight into ``view``, at most ``step`` bytes a call: the count of
    each piece as it lands, until ``view`` is full or the body ends; then :class:`BodyTooLong` when
    the body has a byte more. :class:`Cancelled` once ``cancel`` is set."""
    got, size = 0, len(view)
    while got < size:
        raise_if_cancelled(cancel, "download")
        n = readinto(view[got : min(got + step, size)])
        if not n:
            raise_if_cancelled(cancel, "download")  # a shut-down socket reads as the end
            return
        got += n
        yield n
    if readinto(memoryview(bytearray(1))):
        raise BodyTooLong(f"the body is longer than the {size} bytes asked for")


def format_range(start: int, end: int | None = None) -> str:
    """``Range`` header value for bytes ``start``..``end`` (inclusive; open-ended when ``end`` is None)."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"bad byte range {start}-{end}")
    return f"bytes={start}-" + ("" if end is None else str(end))


class HttpResponse:
    """A response whose body has not been read yet. Close it (or use ``with``) when done."""

    def __init__(self, raw: urllib3.BaseHTTPResponse, url: str, cancel: threading.Event | None) -> None:
        self._raw = raw
        self.status: int = raw.status
        #: case-insensitive header mapping
        self.headers: Mapping[str, str] = raw.headers
        #: the URL that answered (after redirects)
        self.url = url
        self._cancel = cancel
        self._received = 0

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def etag(self) -> str | None:
        """The ETag without quotes (and without a weak ``W/`` prefix), or None."""
        value = self.headers.get("ETag")
        if value is None:
            return None
        return value.removeprefix("W/").strip('"')

    def iter_chunks(self, chunk_size: int = CHUNK_SIZE) -> Generator[bytes, None, None]:
        """The body as raw bytes (no content decoding). Raises :class:`TransferInterrupted` when the
        connection breaks or the body is shorter than Content-Length, :class:`Cancelled` on cancel."""
        # A blocked read only ends at read_timeout; shutting the socket down ends it at once.
        with shutdown_on_cancel(self._cancel, self._raw.shutdown):
            while True:
                raise_if_cancelled(self._cancel, "download")
                try:
                    chunk = self._raw.read(chunk_size, decode_content=False)
                except (_Urllib3Error, OSError) as exc:
                    raise_if_cancelled(self._cancel, "download")
                    raise TransferInterrupted(
                        f"the transfer from {redact_url(self.url)} broke after {self._received} bytes: "
                        f"{describe_network_error(exc)}",
                        received=self._received,
                    ) from exc
                if not chunk:
                    break
                self._received += len(chunk)
                yield chunk
            raise_if_cancelled(self._cancel, "download")

    def fill(self, view: memoryview, step: int = FILL_STEP) -> Generator[int, None, None]:
        """Receive the body (raw, no content decoding) straight into ``view``: the count of each piece
        (at most ``step`` bytes) as it lands, until ``view`` is full or the body ends (the caller
        compares the total). Raises :class:`BodyTooLong` when the body goes on past ``view``,
        :class:`TransferInterrupted` when the connection breaks or stalls, :class:`Cancelled`."""
        readinto = direct_readinto(self._raw)
        with shutdown_on_cancel(self._cancel, self._raw.shutdown):
            pieces = fill_pieces(readinto, view, step, self._cancel)
            while True:
                try:
                    n = next(pieces, 0)
                except (_Urllib3Error, OSError, http.client.HTTPException) as exc:
                    raise_if_cancelled(self._cancel, "download")
                    raise TransferInterrupted(
                        f"the transfer from {redact_url(self.url)} broke after {self._received} bytes: "
                        f"{describe_network_error(exc)}",
                        received=self._received,
                    ) from exc
                if not n:
                    return
                self._received += n
                yield n

    def read(self, limit: int) -> bytes:
        """The body, or its first ``limit + 1`` bytes when it is longer (the caller checks the length)."""
        out = bytearray()
        with contextlib.closing(self.iter_chunks()) as chunks:
            for chunk in chunks:
                out += chunk
                if len(out) > limit:
                    break
        return bytes(out[: limit + 1])

    def close(self) -> None:
        """Done with the response: its connection goes back to its pool when the body was read to
        the end, else it is closed (a body left halfway must not reach the next request)."""
        finish(self._raw)

    def __enter__(self) -> HttpResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpClient:
    """Fetches policy-checked URLs. One instance may be shared by threads, and so may its copies
    (``copy.copy``, e.g. with another read timeout): they share its kept-alive connections."""

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        retries: int | None = None,
        backoff: float = DEFAULT_BACKOFF,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        max_redirects: int = MAX_REDIRECTS,
        ca_certs: str | None = None,
        pool_size: int | None = None,
    ) -> None:
        """Timeouts and retries default to ``policy.sources`` (the configuration the policy came from);
        ``pool_size``, the idle connections kept per address, to its ranges in flight + 2."""
        sources = policy.sources
        self.policy = policy
        self.connect_timeout = connect_timeout or (
            sources.connect_timeout if sources else DEFAULT_CONNECT_TIMEOUT
        )
        self.read_timeout = read_timeout or (sources.read_timeout if sources else DEFAULT_READ_TIMEOUT)
        self.retries = retries if retries is not None else (sources.retries if sources else DEFAULT_RETRIES)
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.max_redirects = max_redirects
        #: CA bundle for https (None: the system store)
        self.ca_certs = ca_certs
        if pool_size is None:
            pool_size = sources.parallel_ranges + 2 if sources else DEFAULT_POOL_SIZE
        self._pools = PinnedPools(pool_size)

    @property
    def connections_opened(self) -> int:
        """Connections this client (and its copies) opened so far; for https, TLS handshakes."""
        return self._pools.opened

    def close(self) -> None:
        """Close the kept-alive connections (the client still works: it opens new ones)."""
        self._pools.close()

    @classmethod
    def from_config(cls, sources: SourcesConfig, policy: UrlPolicy | None = None) -> HttpClient:
        """A client with the timeouts, retries and URL policy of ``config.sources``."""
        return cls(policy or UrlPolicy.from_config(sources))

    def head(self, url: str, *, cancel: threading.Event | None = None) -> HttpResponse:
        """HEAD ``url`` (redirects re-validated, 5xx/connection errors retried). 4xx are returned."""
        return self.request("HEAD", url, cancel=cancel)

    def get_stream(
        self,
        url: str,
        range: tuple[int, int | None] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        cancel: threading.Event | None = None,
    ) -> HttpResponse:
        """GET ``url`` without reading the body; ``range`` is ``(start, end_inclusive_or_None)``.

        The caller checks the status (a server may ignore Range and answer 200) and iterates
        :meth:`HttpResponse.iter_chunks`.
        """
        hdrs = dict(headers or {})
        if range is not None:
            hdrs["Range"] = format_range(*range)
        return self.request("GET", url, headers=hdrs, cancel=cancel)

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        cancel: threading.Event | None = None,
    ) -> HttpResponse:
        """Send ``method`` to ``url``, following up to ``max_redirects`` redirects, each re-checked.

        Raises :class:`UrlNotAllowed` (the URL or a redirect target), :class:`SourceUnavailable` (no
        answer or 5xx after every retry, too many redirects, TLS failure), :class:`Cancelled`.
        """
        current = url
        for hop in range(self.max_redirects + 1):
            try:
                checked = self.policy.check(current)
            except UrlNotAllowed as exc:
                if hop == 0:
                    raise
                # the same class: a redirect to a host that does not resolve stays Source.Unreachable
                what = (
                    "redirect to unreachable URL"
                    if isinstance(exc, HostUnresolvable)
                    else "redirect to disallowed URL"
                )
                raise type(exc)(
                    f"{what} {redact_url(current)} (from {redact_url(url)}): {exc.message}"
                ) from exc
            if checked.scheme not in ("http", "https"):
                what = "redirect to disallowed URL" if hop else "not an HTTP URL"
                raise UrlNotAllowed(f"{what} {redact_url(current)}: only http and https are fetched here")
            response = self._send_with_retries(method, checked, headers or {}, cancel)
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                return response
            response.close()
            current = urljoin(current, location)
            if response.status == 303 and method != "HEAD":
                method = "GET"
        raise SourceUnavailable(
            f"{redact_url(url)} redirected more than {self.max_redirects} times; give the final URL instead"
        )

    def _send_with_retries(
        self, method: str, checked: CheckedUrl, headers: Mapping[str, str], cancel: threading.Event | None
    ) -> HttpResponse:
        attempt = 0
        cause: BaseException | None
        while True:
            raise_if_cancelled(cancel, "request")
            try:
                response = self._send_once(method, checked, headers, cancel)
            except SSLError as exc:
                raise SourceUnavailable(
                    f"TLS connection to {checked.host}:{checked.port} failed (certificate or protocol): "
                    f"{describe_network_error(exc)}"
                ) from exc
            except (_Urllib3Error, OSError) as exc:
                status, problem, cause = None, describe_network_error(exc), exc
            else:
                if response.status < 500:
                    return response
                status, problem = response.status, f"HTTP {response.status} {response._raw.reason or ''}"
                cause = None
                response.close()
            if attempt >= self.retries:
                # chained, so a caller can tell a read timeout (a stall) from other failures
                raise SourceUnavailable(
                    f"{method} {redact_url(checked.url)} failed after {attempt + 1} attempts: "
                    f"{problem.strip()}",
                    status=status,
                    transient=True,
                ) from cause
            delay = min(self.backoff_max, self.backoff * 2**attempt)
            log.info(
                "%s %s: %s; retry %d of %d",
                method,
                redact_url(checked.url),
                problem.strip(),
                attempt + 1,
                self.retries,
            )
            sleep_or_cancel(delay / 2 + random.uniform(0, delay / 2), cancel, "request")
            attempt += 1

    def _send_once(
        self, method: str, checked: CheckedUrl, headers: Mapping[str, str], cancel: threading.Event | None
    ) -> HttpResponse:
        hdrs = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        hdrs["Host"] = checked.host_header
        # per request, not per pool: copies of this client with another read timeout share the pools
        timeout = urllib3.Timeout(connect=self.connect_timeout, read=self.read_timeout)
        last: BaseException | None = None
        for address in checked.addresses:
            pool = self._pools.get(checked, address, self.ca_certs)
            try:
                raw = self._urlopen(pool, method, checked.target, hdrs, timeout)
            except ConnectTimeoutError as exc:  # includes NewConnectionError (refused, unreachable)
                last = exc
                continue  # the next pinned address may answer
            return HttpResponse(raw, checked.url, cancel)
        assert last is not None
        raise last

    def _urlopen(
        self,
        pool: urllib3.HTTPConnectionPool,
        method: str,
        target: str,
        headers: Mapping[str, str],
        timeout: urllib3.Timeout,
    ) -> urllib3.BaseHTTPResponse:
        # A kept-alive connection the server closed while it sat idle fails before any answer; that
        # is no failure of the origin, so the request is sent again at once on another connection
        # (not counted as a retry): at most once per idle connection the pool can hold, and never
        # after a failure on a new connection.
        for attempt in range(self._pools.maxsize + 1):
            try:
                return pool.urlopen(
                    method,
                    target,
                    headers=headers,
                    redirect=False,
                    retries=False,
                    timeout=timeout,
                    preload_content=False,
                    decode_content=False,
                    assert_same_host=False,
                )
            except ProtocolError:
                if attempt == self._pools.maxsize or not self._pools.reused:
                    raise
                log.debug("%s: a kept-alive connection was closed by the server; sending again", pool.host)
        raise AssertionError("unreachable: the last attempt returns or raises")
