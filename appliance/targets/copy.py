"""Copying a stored image from one store to another (Glance's ``copy-image``): file → S3, S3 → file,
bucket → bucket, file → file, streamed (no scratch copy of the image), digests checked on the way.

**Where a copy goes** is a *destination spec* (:func:`parse_destination`):

- ``s3://BUCKET[/PREFIX]`` — an S3 bucket, reached with the settings of one of the configuration's S3
  endpoints (:data:`ENDPOINTS`): the image target's (``targets.image``, when it is ``s3``) for its own
  bucket, else those of the user buckets (``sources.s3``, as exports use); ``endpoint`` names one
  explicitly;
- ``file:///DIR`` (or an absolute path) — a directory of this appliance (mode 0700, created if missing);
- ``image`` — the configured image target (its bucket and prefix, or its directory).

The copy is named ``<prefix><name>.<ext>`` (an object) or ``<DIR>/<name>.<ext>`` (a file): ``name`` is the
copy task's id, as the image target names images after their import task, so two copies never share a
name and removing one copy (its cancel, its undo) can never touch another.

**How the bytes move** (:func:`copy_stored`):

- *streamed*: the source (a file read in order, or one S3 GET read as it arrives) is hashed as it is
  read and written as it arrives: into a partial file renamed into place at the end
  (:mod:`appliance.partials`; zero chunks left as holes), or into a parallel multipart upload
  (:class:`~.s3stream.MultipartWriter`: ``Content-MD5`` on every part, the completed ETag checked, the
  sha256 as ``x-amz-meta-sha256`` from the start). Memory: about ``(threads + 1) x part_size``;
- *server-side*, when source and destination are objects behind the same endpoint with the same
  credentials (one client may read the one and write the other): the source is read once to verify its
  digest (a GET, hashed as it arrives, never stored), then copied by S3 itself, part by part with
  ``UploadPartCopy`` pinned to the ETag of the object that was read (``CopySourceIfMatch``): the bytes S3
  copies are the bytes whose digest was checked, and the appliance uploads nothing (half the traffic of
  a streamed copy). A store that refuses ``UploadPartCopy`` (``NotImplemented``, ``AccessDenied``) falls
  back to the streamed copy.

**Digests.** The sha256 of what is read is compared with the digest recorded when the image was stored;
a difference is ``Source.DigestMismatch`` and nothing is published (the partial removed, the multipart
upload aborted). The sha256 of what was written is returned (and stored as the object's metadata).

**Cancel** (``cancel`` set) or any failure leaves nothing: no partial file, no object, no incomplete
multipart upload. :func:`remove_copy` deletes a finished copy (and aborts any upload of its key).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import Config, parse_size
from ..errors import UsageError
from ..partials import Ledger, partial_file, publish
from ..progress import ProgressCallback, ProgressTracker
from ..sources.s3names import check_bucket, check_key
from .base import TargetError, boto_client, check_cancel, storage_error
from .file import extension_for
from .rawio import fsync_dir
from .s3stream import MIN_PART, MultipartWriter

log = logging.getLogger(__name__)

CHUNK = 4 << 20
#: the configuration's S3 endpoints a copy may use: ``image`` (``targets.image`` of type s3),
#: ``sources`` (``sources.s3``, the settings of user buckets)
ENDPOINTS = ("image", "sources")
#: UploadPartCopy parts are at most 5 GiB; smaller parts report progress and check cancel more often
MAX_COPY_PART = 5 << 30
#: S3 error codes that mean "this store (or these credentials) cannot copy server-side": stream instead
_NO_SERVER_COPY = ("NotImplemented", "AccessDenied", "InvalidRequest")


class SourceDigestMismatch(TargetError):
    """The stored image no longer has the digest recorded when it was stored."""

    code = "Source.DigestMismatch"


# -- destinations -----------------------------------------------------------------------------------


def _image_target(config: Config) -> dict[str, Any]:
    return dict(config.targets.get("image") or {"type": "file"})


def endpoint_settings(config: Config, endpoint: str) -> dict[str, Any]:
    """The boto3 settings (``endpoint_url``, ``region``, keys, ``part_size``, ``threads``…) of the named
    S3 endpoint (:data:`ENDPOINTS`)."""
    if endpoint == "image":
        image = _image_target(config)
        if image.get("type") != "s3":
            raise UsageError("the endpoint image names the s3 image target, but targets.image is not s3")
        return image
    if endpoint == "sources":
        return dict(config.sources.s3)
    raise UsageError(f"unknown S3 endpoint {endpoint!r} (known: {', '.join(ENDPOINTS)})")


def default_endpoint(config: Config, bucket: str) -> str:
    """``image`` for the image target's own bucket, else ``sources`` (user buckets)."""
    image = _image_target(config)
    return "image" if image.get("type") == "s3" and image.get("bucket") == bucket else "sources"


def parse_destination(spec: str, config: Config, endpoint: str | None = None) -> dict[str, Any]:
    """The destination a spec names (module docstring), as JSON data stored in the copy task:
    ``{"type": "s3", "bucket", "prefix", "endpoint"}`` or ``{"type": "file", "directory"}``.
    ``UsageError`` (``InvalidParameterValue``) for anything else."""
    spec = (spec or "").strip()
    if spec == "image":
        image = _image_target(config)
        if image.get("type") == "s3":
            return {
                "type": "s3",
                "bucket": image["bucket"],
                "prefix": image.get("prefix", ""),
                "endpoint": "image",
            }
        return {"type": "file", "directory": str(image["directory"])}
    if spec.startswith("s3://"):
        bucket, _, prefix = spec.removeprefix("s3://").partition("/")
        check_bucket(bucket, "the destination's bucket")
        if prefix:
            check_key(f"{prefix}copy-0123456789abcdef0.raw", "the destination's prefix")
        chosen = endpoint or default_endpoint(config, bucket)
        endpoint_settings(config, chosen)  # an unknown or unusable endpoint is refused now
        return {"type": "s3", "bucket": bucket, "prefix": prefix, "endpoint": chosen}
    if endpoint is not None:
        raise UsageError("an S3 endpoint applies only to an s3:// destination")
    path = urlsplit(spec).path if spec.startswith("file:") else spec
    if spec.startswith("file:") and urlsplit(spec).netloc not in ("", "localhost"):
        raise UsageError(f"the destination {spec!r} names another host; a file destination is local")
    if not path.startswith("/"):
        raise UsageError(
            f"the destination {spec!r} is not s3://BUCKET[/PREFIX], file:///DIRECTORY (absolute) or image"
        )
    directory = os.path.normpath(path)
    if any(part == ".." for part in Path(path).parts):
        raise UsageError(f"the destination directory {path!r} holds '..'")
    return {"type": "file", "directory": directory}


def describe_destination(destination: Mapping[str, Any]) -> str:
    """``s3://bucket/prefix`` or ``file:///dir``: how a destination is shown."""
    if destination["type"] == "s3":
        return f"s3://{destination['bucket']}/{destination.get('prefix') or ''}"
    return f"file://{destination['directory']}"


def same_place(location: Mapping[str, Any], destination: Mapping[str, Any]) -> bool:
    """Whether ``destination`` is where ``location`` already is (the same bucket and prefix, or
    directory): a copy there would be a second copy beside the first, which is refused."""
    if location.get("type") != destination["type"]:
        return False
    if destination["type"] == "s3":
        key, prefix = str(location.get("key") or ""), str(destination.get("prefix") or "")
        return (
            location.get("bucket") == destination["bucket"]
            and key.startswith(prefix)
            and "/" not in key[len(prefix) :]
        )
    return str(Path(str(location.get("path") or "")).parent) == os.path.normpath(destination["directory"])


# -- S3 clients --------------------------------------------------------------------------------------


def _client(settings: Mapping[str, Any], threads: int) -> Any:
    return boto_client(
        "s3",
        settings,
        max_pool_connections=threads + 2,
        s3={"addressing_style": settings.get("addressing_style", "auto")},
    )


def location_endpoint(config: Config, location: Mapping[str, Any]) -> str:
    """The endpoint a stored S3 location is read with: the one its copy recorded, else the image
    target's (an import stored it) when it is that bucket, else the user buckets'."""
    return str(location.get("endpoint") or default_endpoint(config, str(location.get("bucket"))))


def _same_credentials(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    keys = ("endpoint_url", "region", "access_key", "secret_key")
    return all(a.get(k) == b.get(k) for k in keys)


def _transfer(settings: Mapping[str, Any]) -> tuple[int, int]:
    part_size = parse_size(settings.get("part_size", "64MiB"))
    if part_size < MIN_PART:
        raise UsageError(f"part_size {part_size} is below S3's minimum of 5 MiB")
    return part_size, int(settings.get("threads", 4))


def _s3_failure(operation: str, exc: Exception) -> TargetError:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return TargetError(f"{operation} failed: {err.get('Code')}: {err.get('Message')}", "CopyFailed")
    return TargetError(f"{operation} failed: {type(exc).__name__}", "CopyFailed")


# -- reading the source -----------------------------------------------------------------------------


@contextmanager
def _read(
    config: Config, location: Mapping[str, Any], cancel: threading.Event | None
) -> Iterator[tuple[Iterator[bytes], int, str | None]]:
    """``(chunks, size, etag)`` of a stored image: a file read in order or one S3 GET read as it
    arrives (``etag`` None for a file)."""
    if location.get("type") == "s3":
        settings = endpoint_settings(config, location_endpoint(config, location))
        client = _client(settings, 1)
        where = f"s3://{location['bucket']}/{location['key']}"
        try:
            resp = client.get_object(Bucket=location["bucket"], Key=location["key"])
        except Exception as exc:
            raise TargetError(
                f"the stored image {where} cannot be read: {_s3_failure('GetObject', exc).message}",
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


class _Digests:
    """The sha256 of what was read, checked against the recorded one before anything is published."""

    def __init__(self, expected: str | None, what: str) -> None:
        self.expected, self.what = expected, what
        self.hasher = hashlib.sha256()
        self.read = 0

    def update(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.read += len(chunk)

    def check(self, size: int) -> str:
        digest = self.hasher.hexdigest()
        if self.read != size:
            raise TargetError(f"{self.what}: read {self.read} bytes of {size}", "Source.Truncated")
        if self.expected and digest != self.expected:
            raise SourceDigestMismatch(
                f"the stored image {self.what} has sha256 {digest}, not the {self.expected} recorded "
                "when it was stored: it changed since; nothing was copied"
            )
        return digest


# -- copying ----------------------------------------------------------------------------------------


def copy_stored(
    config: Config,
    location: Mapping[str, Any],
    destination: Mapping[str, Any],
    name: str,
    *,
    metadata: Mapping[str, str] | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    fence: Callable[[], None] | None = None,
    ledger: Ledger | None = None,
    server_side: bool = True,
) -> dict[str, Any]:
    """Copy the stored image at ``location`` (a ``{type: file, path}`` or ``{type: s3, bucket, key}``
    location with its recorded ``sha256``) to ``destination`` as ``name`` (module docstring).

    Returns ``{location, sha256, size, source_sha256, method, seconds}``: ``location`` the new copy's
    (``{type: file, path, …}`` or ``{type: s3, bucket, key, etag, endpoint, …}``, with ``format``,
    ``size``, ``sha256``), ``method`` ``stream`` or ``server-side``. ``server_side=False`` always
    streams."""
    clock = time.monotonic()
    fmt = str(location.get("format") or "raw")
    filename = f"{name}.{extension_for(fmt)}"
    expected = location.get("sha256")
    where = (
        f"s3://{location.get('bucket')}/{location.get('key')}"
        if location.get("type") == "s3"
        else str(location.get("path"))
    )

    def digests() -> _Digests:
        return _Digests(str(expected) if expected else None, where)

    if destination["type"] == "s3":
        settings = endpoint_settings(config, destination["endpoint"])
        key = f"{destination.get('prefix') or ''}{filename}"
        stored: dict[str, Any] | None = None
        if server_side and location.get("type") == "s3":
            source_settings = endpoint_settings(config, location_endpoint(config, location))
            if _same_credentials(source_settings, settings):
                stored = _server_side_copy(
                    config,
                    location,
                    settings,
                    destination,
                    key,
                    digests(),
                    metadata,
                    on_progress,
                    cancel,
                    fence,
                )
        if stored is None:  # streamed (also when the store refused a server-side copy)
            stored = _stream_to_s3(
                config, location, settings, destination, key, digests(), metadata, on_progress, cancel, fence
            )
    else:
        stored = _stream_to_file(
            config, location, destination, filename, digests(), on_progress, cancel, fence, ledger
        )
    stored["location"]["format"] = fmt
    return stored | {"seconds": round(time.monotonic() - clock, 3)}


def _tracker(phase: str, total: int, on_progress: ProgressCallback | None) -> ProgressTracker:
    return ProgressTracker(phase, total, on_progress)


def _stream_to_s3(
    config: Config,
    location: Mapping[str, Any],
    settings: Mapping[str, Any],
    destination: Mapping[str, Any],
    key: str,
    digests: _Digests,
    metadata: Mapping[str, str] | None,
    on_progress: ProgressCallback | None,
    cancel: threading.Event | None,
    fence: Callable[[], None] | None,
) -> dict[str, Any]:
    part_size, threads = _transfer(settings)
    bucket = destination["bucket"]
    with _read(config, location, cancel) as (chunks, size, _etag):
        tracker = _tracker("copying", size, on_progress)

        def uploaded(done: int) -> None:
            tracker.update(done)

        # the recorded sha256 goes up with the upload's start; the writer checks it against the
        # bytes it sent, and the bytes read are checked against it before the upload completes
        with MultipartWriter(
            _client(settings, threads),
            bucket,
            key,
            part_size=part_size,
            threads=threads,
            sha256=digests.expected,
            metadata=metadata,
            expected_size=size,
            on_progress=uploaded,
            cancel=cancel,
            fence=fence,
        ) as writer:
            for chunk in chunks:
                check_cancel(cancel, "copy")
                digests.update(chunk)
                writer.write(chunk)
            source_sha256 = digests.check(size)
            done = writer.close()
    tracker.finish()
    return {
        "location": {
            "type": "s3",
            "bucket": bucket,
            "key": key,
            "etag": done["etag"],
            "sha256": done["sha256"],
            "size": done["size"],
            "endpoint": destination["endpoint"],
        },
        "sha256": done["sha256"],
        "size": done["size"],
        "source_sha256": source_sha256,
        "method": "stream",
    }


def _server_side_copy(
    config: Config,
    location: Mapping[str, Any],
    settings: Mapping[str, Any],
    destination: Mapping[str, Any],
    key: str,
    digests: _Digests,
    metadata: Mapping[str, str] | None,
    on_progress: ProgressCallback | None,
    cancel: threading.Event | None,
    fence: Callable[[], None] | None,
) -> dict[str, Any] | None:
    """The copy made by S3 (``UploadPartCopy``), pinned to the ETag of the object whose digest was
    checked; None when the store refuses server-side copies (the caller streams instead)."""
    part_size, threads = _transfer(settings)
    client = _client(settings, threads)
    bucket = destination["bucket"]
    where = f"s3://{bucket}/{key}"
    with _read(config, location, cancel) as (chunks, size, etag):
        tracker = _tracker("verifying source", size, on_progress)
        for chunk in chunks:
            check_cancel(cancel, "copy")
            digests.update(chunk)
            tracker.update(digests.read)
    source_sha256 = digests.check(size)
    tracker.finish()
    if size == 0:  # nothing to copy in parts: streamed
        return None
    meta = {**(metadata or {}), "sha256": source_sha256}
    try:
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata=meta)["UploadId"]
    except Exception as exc:
        raise _s3_failure(f"CreateMultipartUpload {where}", exc) from exc
    source = {"Bucket": location["bucket"], "Key": location["key"]}
    part = max(part_size, -(-size // 10_000))
    part = min(part, MAX_COPY_PART)
    copying = _tracker("copying", size, on_progress)
    completed = False
    changed = SourceDigestMismatch(
        f"the stored image s3://{location['bucket']}/{location['key']} changed while it was copied (its "
        "ETag is no longer that of the bytes verified); nothing was copied"
    )

    def source_changed() -> bool:
        """Whether the source's ETag is no longer the one read (a store that ignores
        CopySourceIfMatch, as moto does, still cannot hand over a copy of a replaced source)."""
        try:
            now = client.head_object(Bucket=location["bucket"], Key=location["key"])
        except Exception:
            return True
        return bool(etag) and str(now.get("ETag")) != etag

    try:
        parts = []
        for number, start in enumerate(range(0, size, part), 1):
            check_cancel(cancel, "copy")
            end = min(start + part, size) - 1
            try:
                resp = client.upload_part_copy(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={start}-{end}",
                    **({"CopySourceIfMatch": etag} if etag else {}),
                )
            except Exception as exc:
                code = ((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code")
                if number == 1 and code in _NO_SERVER_COPY:
                    _abort(client, bucket, key, upload_id)
                    upload_id = ""
                    return None
                if code == "PreconditionFailed" or source_changed():
                    raise changed from exc
                raise _s3_failure(f"UploadPartCopy {number} of {where}", exc) from exc
            parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
            copying.update(end + 1)
        check_cancel(cancel, "copy")
        if fence is not None:
            fence()
        try:
            done = client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except Exception as exc:
            if source_changed():
                raise changed from exc
            raise _s3_failure(f"CompleteMultipartUpload {where}", exc) from exc
        completed = True
        head = client.head_object(Bucket=bucket, Key=key)
        if int(head["ContentLength"]) != size or (head.get("Metadata") or {}).get("sha256") != source_sha256:
            raise TargetError(f"{where}: the copy is not the object that was verified", "CopyFailed")
        if source_changed():
            raise changed
    except BaseException:
        if upload_id and not completed:
            _abort(client, bucket, key, upload_id)
        if completed:
            _delete(client, bucket, key)
        raise
    copying.finish()
    return {
        "location": {
            "type": "s3",
            "bucket": bucket,
            "key": key,
            "etag": str(done["ETag"]).strip('"'),
            "sha256": source_sha256,
            "size": size,
            "endpoint": destination["endpoint"],
        },
        "sha256": source_sha256,
        "size": size,
        "source_sha256": source_sha256,
        "method": "server-side",
    }


def _stream_to_file(
    config: Config,
    location: Mapping[str, Any],
    destination: Mapping[str, Any],
    filename: str,
    digests: _Digests,
    on_progress: ProgressCallback | None,
    cancel: threading.Event | None,
    fence: Callable[[], None] | None,
    ledger: Ledger | None,
) -> dict[str, Any]:
    directory = Path(destination["directory"])
    final = directory / filename
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if final.exists():
            raise TargetError(f"{final} already exists; nothing was copied", "CopyExists")
        written = hashlib.sha256()
        offset = 0
        with _read(config, location, cancel) as (chunks, size, _etag):
            tracker = _tracker("copying", size, on_progress)
            with partial_file(final, ledger) as tmp:
                fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    for chunk in chunks:
                        check_cancel(cancel, "copy")
                        digests.update(chunk)
                        written.update(chunk)
                        if chunk.count(0) != len(chunk):  # zero chunks stay holes
                            view = memoryview(chunk)
                            pos = 0
                            while pos < len(view):
                                pos += os.pwrite(fd, view[pos:], offset + pos)
                        offset += len(chunk)
                        tracker.update(offset)
                    os.ftruncate(fd, offset)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                source_sha256 = digests.check(size)
                check_cancel(cancel, "copy")
                if fence is not None:
                    fence()
                publish(tmp, final, 0o600)
                fsync_dir(directory)
    except OSError as exc:
        raise storage_error(exc, f"image file {final}") from exc
    tracker.finish()
    sha256 = written.hexdigest()
    return {
        "location": {"type": "file", "path": str(final), "sha256": sha256, "size": offset},
        "sha256": sha256,
        "size": offset,
        "source_sha256": source_sha256,
        "method": "stream",
    }


# -- removing ---------------------------------------------------------------------------------------


def _abort(client: Any, bucket: str, key: str, upload_id: str) -> None:
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as exc:  # the failure that led here matters more; a resumed run removes it
        log.error("could not abort the multipart upload of s3://%s/%s: %s", bucket, key, type(exc).__name__)


def _delete(client: Any, bucket: str, key: str) -> None:
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except Exception as exc:
        log.error("could not delete s3://%s/%s: %s", bucket, key, type(exc).__name__)


def destination_of(destination: Mapping[str, Any], name: str, fmt: str = "raw") -> dict[str, Any]:
    """Where the copy named ``name`` of ``destination`` is (before it exists): a location to remove."""
    filename = f"{name}.{extension_for(fmt)}"
    if destination["type"] == "s3":
        return {
            "type": "s3",
            "bucket": destination["bucket"],
            "key": f"{destination.get('prefix') or ''}{filename}",
            "endpoint": destination["endpoint"],
        }
    return {"type": "file", "path": str(Path(destination["directory"]) / filename)}


def remove_copy(config: Config, location: Mapping[str, Any]) -> None:
    """Delete a copy (a file, or an object and every incomplete multipart upload of its key); what is
    already gone is fine."""
    if location.get("type") == "s3":
        settings = endpoint_settings(config, location_endpoint(config, location))
        client = _client(settings, 1)
        bucket, key = str(location["bucket"]), str(location["key"])
        try:
            client.delete_object(Bucket=bucket, Key=key)
            listing = client.list_multipart_uploads(Bucket=bucket, Prefix=key)
            for upload in listing.get("Uploads", []):
                if upload["Key"] == key:
                    client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
        except Exception as exc:
            raise TargetError(
                f"cannot remove s3://{bucket}/{key}: {_s3_failure('DeleteObject', exc).message}",
                "TargetDeleteFailed",
            ) from exc
        return
    path = Path(str(location.get("path")))
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise TargetError(f"cannot remove {path}: {exc.strerror}", "TargetDeleteFailed") from exc
