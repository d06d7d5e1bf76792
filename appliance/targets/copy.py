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
- *server-side* (:mod:`~.copy_server`), when source and destination are objects behind the same
  endpoint with the same credentials (one client may read the one and write the other): the source is
  read once to verify its digest (a GET, hashed as it arrives, never stored), then copied by S3 itself,
  part by part with ``UploadPartCopy`` pinned to the ETag of the object that was read
  (``CopySourceIfMatch``): the bytes S3 copies are the bytes whose digest was checked, and the appliance
  uploads nothing (half the traffic of a streamed copy). A store that refuses ``UploadPartCopy``
  (``NotImplemented``, ``AccessDenied``) falls back to the streamed copy.

Both ways into S3 take one :class:`~.copy_parts.S3Copy` and run the one part loop
(:func:`~.copy_parts.send_parts`: the cancel checked before every part and before completing; a cancel
or any failure discards the upload). What is read, through which endpoint, and how its digest is checked
is :mod:`~.copy_source`'s.

**Digests.** The sha256 of what is read is compared with the digest recorded when the image was stored;
a difference is ``Source.DigestMismatch`` and nothing is published (the partial removed, the multipart
upload aborted). The sha256 of what was written is returned (and stored as the object's metadata).

**Cancel** (``cancel`` set) or any failure leaves nothing: no partial file, no object, no incomplete
multipart upload. :func:`remove_copy` deletes a finished copy (and aborts any upload of its key).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import Config
from ..errors import UsageError
from ..partials import Ledger, partial_file, publish
from ..progress import ProgressCallback, ProgressTracker
from ..sources.s3names import check_bucket, check_key
from .base import TargetError, check_cancel, remove_object, storage_error
from .copy_parts import S3Copy, send_parts
from .copy_server import same_credentials, server_side_copy
from .copy_source import (
    ENDPOINTS,
    Digests,
    SourceDigestMismatch,
    default_endpoint,
    describe_location,
    endpoint_settings,
    image_target,
    location_endpoint,
    read_stored,
    s3_client,
    s3_failure,
)
from .file import extension_for
from .rawio import fsync_dir
from .s3stream import MultipartWriter

__all__ = [
    "ENDPOINTS",
    "SourceDigestMismatch",
    "copy_stored",
    "default_endpoint",
    "describe_destination",
    "destination_of",
    "endpoint_settings",
    "location_endpoint",
    "parse_destination",
    "remove_copy",
    "same_place",
]


# -- destinations -----------------------------------------------------------------------------------


def parse_destination(spec: str, config: Config, endpoint: str | None = None) -> dict[str, Any]:
    """The destination a spec names (module docstring), as JSON data stored in the copy task:
    ``{"type": "s3", "bucket", "prefix", "endpoint"}`` or ``{"type": "file", "directory"}``.
    ``UsageError`` (``InvalidParameterValue``) for anything else."""
    spec = (spec or "").strip()
    if spec == "image":
        image = image_target(config)
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
    expected = location.get("sha256")
    target = destination_of(destination, name, fmt)

    def digests() -> Digests:
        recorded = location.get("digest")
        return Digests(
            str(expected) if expected else None,
            describe_location(location),
            recorded if isinstance(recorded, Mapping) else None,
        )

    if destination["type"] == "s3":
        settings = endpoint_settings(config, destination["endpoint"])
        job = S3Copy(
            config=config,
            location=location,
            settings=settings,
            destination=destination,
            key=str(target["key"]),
            digests=digests(),
            metadata=metadata,
            on_progress=on_progress,
            cancel=cancel,
            fence=fence,
        )
        stored: dict[str, Any] | None = None
        if server_side and location.get("type") == "s3":
            source_settings = endpoint_settings(config, location_endpoint(config, location))
            if same_credentials(source_settings, settings):
                stored = server_side_copy(job)
        if stored is None:  # streamed (also when the store refused a server-side copy)
            stored = stream_to_s3(replace(job, digests=digests()))
    else:
        stored = _stream_to_file(
            config, location, Path(target["path"]), digests(), on_progress, cancel, fence, ledger
        )
    stored["location"]["format"] = fmt
    return stored | {"seconds": round(time.monotonic() - clock, 3)}


class _Streamed:
    """The streamed upload of a copy (a :class:`~.copy_parts.PartUpload` of the chunks read): a
    :class:`~.s3stream.MultipartWriter` (``Content-MD5`` on every part, the completed ETag checked)."""

    def __init__(self, job: S3Copy, writer: MultipartWriter, size: int) -> None:
        self.job, self.writer, self.size = job, writer, size

    def send(self, piece: bytes) -> None:
        self.writer.write(piece)

    def finish(self) -> dict[str, Any]:
        # the bytes read are checked against the recorded sha256 before the upload completes
        source_sha256 = self.job.digests.check(self.size)
        done = self.writer.close()
        return self.job.copied(done["etag"], done["sha256"], done["size"], source_sha256, "stream")

    def discard(self) -> None:
        self.writer.abort()


def stream_to_s3(job: S3Copy) -> dict[str, Any]:
    """The copy streamed: one GET of the source, hashed as it arrives, written as a parallel multipart
    upload through the one part loop (:func:`~.copy_parts.send_parts`)."""
    part_size, threads = job.transfer()
    with read_stored(job.config, job.location) as (chunks, size, _etag):
        tracker = ProgressTracker("copying", size, job.on_progress)

        def uploaded(done: int) -> None:
            tracker.update(done)

        # the recorded sha256 goes up with the upload's start; the writer checks it against the
        # bytes it sent
        writer = MultipartWriter(
            job.client(threads),
            job.bucket,
            job.key,
            part_size=part_size,
            threads=threads,
            sha256=job.digests.expected,
            metadata=job.metadata,
            expected_size=size,
            on_progress=uploaded,
            cancel=job.cancel,
            fence=job.fence,
        )
        return send_parts(
            _Streamed(job, writer, size), job.digests.hashed(chunks, job.cancel), job.cancel, tracker
        )


def _stream_to_file(
    config: Config,
    location: Mapping[str, Any],
    final: Path,
    digests: Digests,
    on_progress: ProgressCallback | None,
    cancel: threading.Event | None,
    fence: Callable[[], None] | None,
    ledger: Ledger | None,
) -> dict[str, Any]:
    directory = final.parent
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if final.exists():
            raise TargetError(f"{final} already exists; nothing was copied", "CopyExists")
        written = hashlib.sha256()
        offset = 0
        with read_stored(config, location) as (chunks, size, _etag):
            tracker = ProgressTracker("copying", size, on_progress)
            with partial_file(final, ledger) as tmp:
                fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    for chunk in digests.hashed(chunks, cancel):
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
        client = s3_client(settings, 1)
        bucket, key = str(location["bucket"]), str(location["key"])
        try:
            remove_object(client, bucket, key)
        except Exception as exc:
            raise TargetError(
                f"cannot remove s3://{bucket}/{key}: {s3_failure('DeleteObject', exc).message}",
                "TargetDeleteFailed",
            ) from exc
        return
    path = Path(str(location.get("path")))
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise TargetError(f"cannot remove {path}: {exc.strerror}", "TargetDeleteFailed") from exc
