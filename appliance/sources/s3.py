"""S3 objects as sources: ``s3://bucket/key`` URLs and ImportImage's UserBucket {S3Bucket, S3Key}.

The client is boto3 with the operator's ``sources.s3`` settings (endpoint, region, credentials), SigV4,
and path-style addressing for non-AWS endpoints. The endpoint comes from configuration, not from the
user, but it is still checked against the :class:`UrlPolicy`, so an S3 endpoint on a private address must
be listed in ``sources.allowed_endpoints`` like any other internal service. Users only choose bucket and
key, which are path components (or, on AWS, a label under amazonaws.com).

Failures become :class:`SourceUnavailable` with messages in the style of AWS's own VM Import errors
("Disk validation failed [We do not have access to the given resource. Reason 403 Forbidden]") plus
what to do about them. botocore's own errors (a bucket name it refuses, missing credentials) become
coded errors too (:func:`_botocore_error`): their text, meant for programmers, never reaches the
task's status message.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import boto3
import botocore.config
import botocore.exceptions
import botocore.response
from urllib3 import HTTPHeaderDict

from ..errors import Cancelled, ImagingError
from .http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RETRIES,
    SourceUnavailable,
    TransferInterrupted,
    fill_pieces,
    format_range,
)
from .httpio import CHUNK_SIZE, FILL_STEP, direct_readinto, shutdown_on_cancel
from .neterrors import describe_network_error
from .s3names import InvalidS3Name
from .urlfilter import UrlPolicy, parse_s3_url, s3_endpoint_url

__all__ = ["ObjectInfo", "S3Stream", "head_object", "open_object", "parse_s3_url", "s3_client"]

# Errors in the middle of a streamed body; botocore wraps urllib3's in these.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ConnectionClosedError,
    OSError,
)
# http.client's own errors too when a body is read under urllib3 (S3Stream.fill)
_FILL_ERRORS: tuple[type[BaseException], ...] = (*_STREAM_ERRORS, http.client.HTTPException)
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)


def s3_client(
    s3cfg: Mapping[str, Any],
    policy: UrlPolicy,
    *,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    retries: int | None = None,
    max_pool_connections: int = 10,
) -> Any:
    """A boto3 S3 client for ``s3cfg`` (``config.sources.s3``: endpoint_url, region, access_key,
    secret_key, addressing_style). Raises :class:`UrlNotAllowed` when the endpoint fails ``policy``.

    Without access_key/secret_key boto3's default credential chain applies (environment, profile,
    instance role). Timeouts and retries default to ``policy.sources``; ``max_pool_connections``
    should cover the requests one caller makes at a time (parallel ranges).
    """
    endpoint = s3_endpoint_url(dict(s3cfg))
    policy.check(endpoint)
    sources = policy.sources
    style: Literal["auto", "virtual", "path"] = s3cfg.get("addressing_style") or "auto"
    if style == "auto" and s3cfg.get("endpoint_url") and not _is_aws(endpoint):
        style = "path"  # MinIO, Ceph RGW, moto, Eucalyptus Walrus: no wildcard DNS for virtual hosts
    attempts = (retries if retries is not None else (sources.retries if sources else DEFAULT_RETRIES)) + 1
    config = botocore.config.Config(
        signature_version="s3v4",
        s3={"addressing_style": style},
        connect_timeout=connect_timeout or (sources.connect_timeout if sources else DEFAULT_CONNECT_TIMEOUT),
        read_timeout=read_timeout or (sources.read_timeout if sources else DEFAULT_READ_TIMEOUT),
        retries={"max_attempts": attempts, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        user_agent_extra="imaging-appliance",
    )
    kwargs: dict[str, Any] = {"region_name": s3cfg.get("region") or "us-east-1", "config": config}
    if s3cfg.get("endpoint_url"):
        kwargs["endpoint_url"] = endpoint
    if s3cfg.get("access_key") and s3cfg.get("secret_key"):
        kwargs["aws_access_key_id"] = s3cfg["access_key"]
        kwargs["aws_secret_access_key"] = s3cfg["secret_key"]
    # A private session: the process-wide default session is not thread-safe to create clients from.
    return boto3.session.Session().client("s3", **kwargs)


def _is_aws(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    return host == "amazonaws.com" or host.endswith(".amazonaws.com")


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    #: without quotes
    etag: str | None
    #: ``ServerSideEncryption`` (``AES256``, ``aws:kms`` …) or None
    sse: str | None = None
    #: the object is encrypted with a customer key (SSE-C): its ETag is not an MD5
    sse_customer: bool = False


def _where(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _unavailable(exc: botocore.exceptions.ClientError, bucket: str, key: str) -> SourceUnavailable:
    """The coded error for an S3 error answer, with what to do about it."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "")
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) or None
    where = _where(bucket, key)
    if code == "NoSuchBucket":
        message = (
            f"Disk validation failed [The S3 bucket '{bucket}' does not exist. Reason 404 Not Found]; check "
            "the bucket name and that it is in the region the appliance uses (sources.s3.region)"
        )
    elif code in ("NoSuchKey", "404", "NotFound"):
        message = (
            f"Disk validation failed [The S3 object {where} does not exist. Reason 404 Not Found]; check the "
            "key, and upload the disk image before importing it"
        )
    elif status == 403 or code in (
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    ):
        message = (
            "Disk validation failed [We do not have access to the given resource. Reason 403 Forbidden]; "
            f"grant the appliance's credentials (sources.s3.access_key) s3:GetObject on {where}"
            + (f" (S3 said {code})" if code and code not in ("403", "AccessDenied") else "")
        )
    elif code in ("PreconditionFailed", "412"):
        message = f"the S3 object {where} changed while it was being read"
    elif status == 416 or code == "InvalidRange":
        message = f"the byte range requested from {where} is outside the object"
    else:
        # S3's own message (the object store's words), never botocore's exception text
        detail = f": {error['Message']}" if error.get("Message") else ""
        message = f"reading {where} failed: {code or 'HTTP ' + str(status)}{detail}"
    transient = status is not None and status >= 500
    return SourceUnavailable(message, status=status, transient=transient)


def _botocore_error(exc: botocore.exceptions.BotoCoreError, bucket: str, key: str) -> ImagingError:
    """The coded error for a request botocore would not make (raised before anything is sent)."""
    where = _where(bucket, key)
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return InvalidS3Name(
            f"Disk validation failed [Invalid S3 source location {where}]; the bucket name or the key "
            "breaks S3's naming rules"
        )
    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return SourceUnavailable(
            f"reading {where} failed: the appliance has no complete credentials for the object store; "
            "set sources.s3.access_key and sources.s3.secret_key"
        )
    return SourceUnavailable(
        f"reading {where} failed: the S3 request could not be made ({type(exc).__name__}); check "
        "sources.s3 in the appliance configuration"
    )


def _connect_error(exc: BaseException, client: Any) -> SourceUnavailable:
    return SourceUnavailable(
        f"cannot reach the object store at {client.meta.endpoint_url}: {describe_network_error(exc)}; "
        "check sources.s3.endpoint_url and that the object store is running",
        transient=True,
    )


def head_object(client: Any, bucket: str, key: str) -> ObjectInfo:
    """Size, ETag and encryption of ``bucket/key``. Raises :class:`SourceUnavailable` (404 tells a
    missing bucket from a missing key with one more HEAD on the bucket)."""
    try:
        out = client.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404 and not _bucket_exists(client, bucket):
            raise _unavailable(
                botocore.exceptions.ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadObject"),
                bucket,
                key,
            ) from exc
        raise _unavailable(exc, bucket, key) from exc
    except _CONNECT_ERRORS as exc:
        raise _connect_error(exc, client) from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise _botocore_error(exc, bucket, key) from exc
    return ObjectInfo(
        bucket=bucket,
        key=key,
        size=int(out["ContentLength"]),
        etag=(out.get("ETag") or "").strip('"') or None,
        sse=out.get("ServerSideEncryption"),
        sse_customer=bool(out.get("SSECustomerAlgorithm")),
    )


def checksum_sha256(client: Any, bucket: str, key: str) -> str | None:
    """The ``x-amz-checksum-sha256`` S3 keeps for ``bucket/key`` (base64, as S3 sends it), asked by one
    HEAD with ``ChecksumMode=ENABLED``; None when the object has none (it was uploaded without a
    SHA-256 checksum). A checksum of a multipart upload ends ``-N`` (a digest of the parts' digests,
    not of the object). Raises :class:`SourceUnavailable` as :func:`head_object` does."""
    try:
        out = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except botocore.exceptions.ClientError as exc:
        raise _unavailable(exc, bucket, key) from exc
    except _CONNECT_ERRORS as exc:
        raise _connect_error(exc, client) from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise _botocore_error(exc, bucket, key) from exc
    value = out.get("ChecksumSHA256")
    return str(value) if value else None


def _bucket_exists(client: Any, bucket: str) -> bool:
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404
    # mypy types a starred tuple of exception classes as tuple[type, ...]: a false positive
    except (*_CONNECT_ERRORS, botocore.exceptions.BotoCoreError):  # type: ignore[misc]
        return True  # the HEAD of the object already failed; let its error speak
    return True


class S3Stream:
    """An open GET of an S3 object, with the same reading interface as :class:`HttpResponse`."""

    def __init__(self, out: Mapping[str, Any], bucket: str, key: str, cancel: threading.Event | None) -> None:
        self._body = out["Body"]
        self.bucket, self.key = bucket, key
        meta = out.get("ResponseMetadata", {})
        self.status: int = int(meta.get("HTTPStatusCode") or 200)
        #: case-insensitive
        self.headers: Mapping[str, str] = HTTPHeaderDict(meta.get("HTTPHeaders") or {})
        self.content_length: int | None = out.get("ContentLength")
        self.etag: str | None = (out.get("ETag") or "").strip('"') or None
        self.sse: str | None = out.get("ServerSideEncryption")
        self.sse_customer = bool(out.get("SSECustomerAlgorithm"))
        self.url = _where(bucket, key)
        self._cancel = cancel
        self._received = 0

    def iter_chunks(self, chunk_size: int = CHUNK_SIZE) -> Generator[bytes, None, None]:
        """The body; raises :class:`TransferInterrupted` when it breaks, :class:`Cancelled` on cancel.

        A read blocked on an object store that sends nothing more ends as soon as ``cancel`` is set
        (the connection's socket is shut down), not at ``sources.read_timeout``: a worker shutting
        down must be able to suspend the task within its grace period.
        """
        with shutdown_on_cancel(self._cancel, self._shutdown):
            while True:
                self._raise_if_cancelled()
                try:
                    chunk = self._body.read(chunk_size)
                except _STREAM_ERRORS as exc:
                    self._raise_if_cancelled()
                    raise self._broken(exc) from exc
                if not chunk:
                    break
                self._received += len(chunk)
                yield chunk
            self._raise_if_cancelled()  # a shut-down socket reads as the end of the body

    def _broken(self, exc: BaseException) -> TransferInterrupted:
        """The error of a body that broke off (the connection dropped or stalled) after what came."""
        return TransferInterrupted(
            f"the transfer of {self.url} broke after {self._received} bytes: {describe_network_error(exc)}",
            received=self._received,
        )

    def fill(self, view: memoryview, step: int = FILL_STEP) -> Generator[int, None, None]:
        """Receive the body straight into ``view``, as :meth:`.http.HttpResponse.fill` does (the
        count of each piece as it lands; :class:`~.http.BodyTooLong` past ``view``).

        A plain botocore body is read through the http.client response under it (botocore's
        ``readinto`` is urllib3's, a read plus a copy); a body botocore checks a checksum of goes
        through botocore. Read to its end, the connection goes back to the client's pool, as
        urllib3 does when it reads a body to its end itself (no new connection per range)."""
        raw = getattr(self._body, "_raw_stream", None)
        plain = type(self._body) is botocore.response.StreamingBody and raw is not None
        readinto = direct_readinto(raw) if plain else self._body.readinto
        with shutdown_on_cancel(self._cancel, self._shutdown):
            pieces = fill_pieces(readinto, view, step, self._cancel)
            while True:
                try:
                    n = next(pieces, 0)
                except _FILL_ERRORS as exc:
                    self._raise_if_cancelled()
                    raise self._broken(exc) from exc
                if not n:
                    break
                self._received += n
                yield n
        fp = getattr(raw, "_fp", None)
        if raw is not None and plain and isinstance(fp, http.client.HTTPResponse) and fp.isclosed():
            raw.release_conn()

    def _raise_if_cancelled(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("download cancelled")

    def _shutdown(self) -> None:
        """Shut down the socket under the body (botocore's StreamingBody over urllib3's response)."""
        raw = getattr(self._body, "_raw_stream", None)  # botocore keeps urllib3's response here
        if raw is None or not hasattr(raw, "shutdown"):
            raise RuntimeError("this body has no connection to shut down")
        raw.shutdown()

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> S3Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_object(
    client: Any,
    bucket: str,
    key: str,
    range: tuple[int, int | None] | None = None,
    *,
    if_match: str | None = None,
    cancel: threading.Event | None = None,
) -> S3Stream:
    """GET ``bucket/key`` (optionally bytes ``range`` = (start, end_inclusive_or_None), and only if the
    ETag is still ``if_match``) without reading the body. Raises :class:`SourceUnavailable`."""
    params: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if range is not None:
        params["Range"] = format_range(*range)
    if if_match:
        params["IfMatch"] = f'"{if_match}"'
    try:
        out = client.get_object(**params)
    except botocore.exceptions.ClientError as exc:
        raise _unavailable(exc, bucket, key) from exc
    except _CONNECT_ERRORS as exc:
        raise _connect_error(exc, client) from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise _botocore_error(exc, bucket, key) from exc
    return S3Stream(out, bucket, key, cancel)
