"""What a copy of a stored image reads, and with which S3 settings (:mod:`appliance.targets.copy`).

- **Endpoints**: a copy reaches S3 through one of the configuration's S3 endpoints (:data:`ENDPOINTS`):
  ``image`` (the image target, when it is ``s3``) or ``sources`` (``sources.s3``, the user buckets').
  A stored location names the one it is read with (:func:`location_endpoint`).
- **Reading**: :func:`read_stored` gives a stored image's bytes in order, a file read from its start or
  one S3 GET read as it arrives, with its size (and the ETag of the object that was read).
- **Digests**: :class:`Digests` hashes what is read (:meth:`Digests.hashed`, which also checks the
  cancel between chunks) and compares it with the sha256 recorded when the image was stored
  (``Source.DigestMismatch``) before anything is published.
- **Results and leaving nothing**: :func:`s3_copied` is what a copy into S3 returns, however its bytes
  moved; :func:`discard_upload` aborts a multipart upload a copy started, or deletes the
  object it completed, whichever is the case; it never raises (the failure that led there matters more).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import Config, parse_size
from ..errors import UsageError
from .base import TargetError, boto_client, check_cancel
from .chunkdigest import ALGORITHM, DEFAULT_CHUNK, ChunkedSha256, is_zero
from .s3parts import MIN_PART

log = logging.getLogger(__name__)

CHUNK = 4 << 20
#: the configuration's S3 endpoints a copy may use: ``image`` (``targets.image`` of type s3),
#: ``sources`` (``sources.s3``, the settings of user buckets)
ENDPOINTS = ("image", "sources")


class SourceDigestMismatch(TargetError):
    """The stored image no longer has the digest recorded when it was stored."""

    code = "Source.DigestMismatch"


# -- endpoints --------------------------------------------------------------------------------------


def image_target(config: Config) -> dict[str, Any]:
    """The settings of the configured image target (a file target when none is configured)."""
    return dict(config.targets.get("image") or {"type": "file"})


def endpoint_settings(config: Config, endpoint: str) -> dict[str, Any]:
    """The boto3 settings (``endpoint_url``, ``region``, keys, ``part_size``, ``threads``…) of the named
    S3 endpoint (:data:`ENDPOINTS`)."""
    if endpoint == "image":
        image = image_target(config)
        if image.get("type") != "s3":
            raise UsageError("the endpoint image names the s3 image target, but targets.image is not s3")
        return image
    if endpoint == "sources":
        return dict(config.sources.s3)
    raise UsageError(f"unknown S3 endpoint {endpoint!r} (known: {', '.join(ENDPOINTS)})")


def default_endpoint(config: Config, bucket: str) -> str:
    """``image`` for the image target's own bucket, else ``sources`` (user buckets)."""
    image = image_target(config)
    return "image" if image.get("type") == "s3" and image.get("bucket") == bucket else "sources"


def location_endpoint(config: Config, location: Mapping[str, Any]) -> str:
    """The endpoint a stored S3 location is read with: the one its copy recorded, else the image
    target's (an import stored it) when it is that bucket, else the user buckets'."""
    return str(location.get("endpoint") or default_endpoint(config, str(location.get("bucket"))))


def s3_client(settings: Mapping[str, Any], threads: int) -> Any:
    """A boto3 S3 client for an endpoint's settings, with a connection per thread (and two spare)."""
    return boto_client(
        "s3",
        settings,
        max_pool_connections=threads + 2,
        s3={"addressing_style": settings.get("addressing_style", "auto")},
    )


def transfer(settings: Mapping[str, Any]) -> tuple[int, int]:
    """``(part_size, threads)`` of an endpoint's settings (a part of at least S3's 5 MiB)."""
    part_size = parse_size(settings.get("part_size", "64MiB"))
    if part_size < MIN_PART:
        raise UsageError(f"part_size {part_size} is below S3's minimum of 5 MiB")
    return part_size, int(settings.get("threads", 4))


def s3_failure(operation: str, exc: Exception) -> TargetError:
    """``CopyFailed`` naming the operation and S3's error code, never a library's whole text."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return TargetError(f"{operation} failed: {err.get('Code')}: {err.get('Message')}", "CopyFailed")
    return TargetError(f"{operation} failed: {type(exc).__name__}", "CopyFailed")


# -- reading the source -----------------------------------------------------------------------------


def describe_location(location: Mapping[str, Any]) -> str:
    """``s3://bucket/key`` or the path: how a stored location is named in messages."""
    if location.get("type") == "s3":
        return f"s3://{location.get('bucket')}/{location.get('key')}"
    return str(location.get("path"))


@contextmanager
def read_stored(
    config: Config, location: Mapping[str, Any]
) -> Iterator[tuple[Iterator[bytes], int, str | None]]:
    """``(chunks, size, etag)`` of a stored image: a file read in order or one S3 GET read as it
    arrives (``etag`` None for a file). A source that cannot be read is ``Source.Unavailable``."""
    if location.get("type") == "s3":
        settings = endpoint_settings(config, location_endpoint(config, location))
        client = s3_client(settings, 1)
        try:
            resp = client.get_object(Bucket=location["bucket"], Key=location["key"])
        except Exception as exc:
            raise TargetError(
                f"the stored image {describe_location(location)} cannot be read: "
                f"{s3_failure('GetObject', exc).message}",
                "Source.Unavailable",
            ) from exc
        body = resp["Body"]
        try:
            yield body.iter_chunks(CHUNK), int(resp["ContentLength"]), str(resp.get("ETag") or "") or None
        finally:
            body.close()
        return
    path = Path(str(location.get("path")))
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below (OSError here is coded)
    except OSError as exc:
        raise TargetError(
            f"the stored image {path} cannot be read: {exc.strerror}", "Source.Unavailable"
        ) from exc
    with f:
        size = os.fstat(f.fileno()).st_size

        def chunks() -> Iterator[bytes]:
            while chunk := f.read(CHUNK):
                yield chunk

        yield chunks(), size, None


class Digests:
    """The sha256 of what was read, checked against the recorded digest before anything is published:
    the recorded ``sha256-chunked`` when the location has one (an image imported since the import side
    records it; computed beside the sha256 on the same read), else the recorded ``sha256``."""

    def __init__(
        self, expected: str | None, what: str, expected_digest: Mapping[str, Any] | None = None
    ) -> None:
        self.expected, self.what = expected, what
        self.hasher = hashlib.sha256()
        self.read = 0
        chunked = (
            expected_digest if expected_digest and expected_digest.get("algorithm") == ALGORITHM else None
        )
        self.expected_digest = chunked
        self._chunk_size = int(chunked.get("chunk_size") or DEFAULT_CHUNK) if chunked is not None else None
        # started by the first read, not here: a Digests that is made and never read (the job of a
        # server-side copy that the store refused) must not leave its hashing threads behind
        self.chunks: ChunkedSha256 | None = None

    def _start(self) -> None:
        if self._chunk_size is not None and self.chunks is None:
            self.chunks = ChunkedSha256(self._chunk_size, name="copy-chunks")

    def hashed(self, chunks: Iterable[bytes], cancel: threading.Event | None) -> Iterator[bytes]:
        """``chunks``, each hashed on the way; a cancel stops the copy between two of them."""
        self._start()
        try:
            for chunk in chunks:
                check_cancel(cancel, "copy")
                self.hasher.update(chunk)
                if self.chunks is not None:
                    if is_zero(chunk):
                        self.chunks.zeros(len(chunk))
                    else:
                        self.chunks.update(chunk)
                self.read += len(chunk)
                yield chunk
        except BaseException:
            if self.chunks is not None:
                self.chunks.close()
            raise

    def check(self, size: int) -> str:
        """The sha256 of what was read: all ``size`` bytes (``Source.Truncated``), with the recorded
        digest (``Source.DigestMismatch``)."""
        digest = self.hasher.hexdigest()
        self._start()  # nothing read (an empty image): its chunked digest is still one to compare
        if self.read != size:
            if self.chunks is not None:
                self.chunks.close()
            raise TargetError(f"{self.what}: read {self.read} bytes of {size}", "Source.Truncated")
        if self.chunks is not None and self.expected_digest is not None:
            value = self.chunks.result().hexdigest
            if value != self.expected_digest.get("value"):
                raise SourceDigestMismatch(
                    f"the stored image {self.what} has {ALGORITHM} {value}, not the "
                    f"{self.expected_digest.get('value')} recorded when it was stored: it changed since; "
                    "nothing was copied"
                )
        if self.expected and digest != self.expected:
            raise SourceDigestMismatch(
                f"the stored image {self.what} has sha256 {digest}, not the {self.expected} recorded "
                "when it was stored: it changed since; nothing was copied"
            )
        return digest


# -- results and leaving nothing ------------------------------------------------------------------


def s3_copied(
    destination: Mapping[str, Any],
    key: str,
    etag: str,
    sha256: str,
    size: int,
    source_sha256: str,
    method: str,
) -> dict[str, Any]:
    """What a copy into an S3 destination returns (:func:`appliance.targets.copy.copy_stored`), streamed
    or server-side."""
    return {
        "location": {
            "type": "s3",
            "bucket": destination["bucket"],
            "key": key,
            "etag": etag,
            "sha256": sha256,
            "size": size,
            "endpoint": destination["endpoint"],
        },
        "sha256": sha256,
        "size": size,
        "source_sha256": source_sha256,
        "method": method,
    }


def discard_upload(client: Any, bucket: str, key: str, upload_id: str | None, *, completed: bool) -> None:
    """Leave nothing of a copy to ``s3://bucket/key``: abort its multipart upload ``upload_id`` while it
    is not completed, delete the object once it is. Never raises: what cannot be removed is logged (a
    resumed run, or :func:`appliance.targets.copy.remove_copy`, removes it)."""
    where = f"s3://{bucket}/{key}"
    if upload_id and not completed:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            log.error("could not abort the multipart upload of %s: %s", where, type(exc).__name__)
    if completed:
        try:
            client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            log.error("could not delete %s: %s", where, type(exc).__name__)
