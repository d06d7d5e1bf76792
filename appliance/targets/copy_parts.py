"""The one shape of a copy into S3 (:mod:`appliance.targets.copy`): what both ways of moving the bytes
take, and the one part loop they run.

- :class:`S3Copy` is a copy of a stored image into an S3 destination, whichever way its bytes move: the
  streamed GET→PUT (:func:`appliance.targets.copy.stream_to_s3`) and the server-side ``UploadPartCopy``
  (:func:`appliance.targets.copy_server.server_side_copy`) take one and answer what :meth:`S3Copy.copied`
  builds.
- :func:`send_parts` is their one part loop: each piece sent (the cancel checked before it), then the
  cancel checked once more and the upload finished; a cancel or any failure (a store that refuses the
  upload too) discards it (:meth:`PartUpload.discard`), so nothing is left: no object, no incomplete
  upload.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..config import Config
from ..progress import ProgressCallback, ProgressTracker
from .base import check_cancel
from .copy_source import Digests, s3_client, s3_copied, transfer

P = TypeVar("P", contravariant=True)


@dataclass(frozen=True)
class S3Copy:
    """One copy of the stored image at ``location`` into ``s3://destination.bucket/key`` through the
    endpoint whose ``settings`` are given, its bytes checked by ``digests``."""

    config: Config
    location: Mapping[str, Any]
    settings: Mapping[str, Any]
    destination: Mapping[str, Any]
    key: str
    digests: Digests
    metadata: Mapping[str, str] | None = None
    on_progress: ProgressCallback | None = None
    cancel: threading.Event | None = None
    fence: Callable[[], None] | None = None

    @property
    def bucket(self) -> str:
        return str(self.destination["bucket"])

    def transfer(self) -> tuple[int, int]:
        """``(part_size, threads)`` of the destination's endpoint."""
        return transfer(self.settings)

    def client(self, threads: int) -> Any:
        """A client of the destination's endpoint for ``threads`` threads."""
        return s3_client(self.settings, threads)

    def copied(self, etag: str, sha256: str, size: int, source_sha256: str, method: str) -> dict[str, Any]:
        """What the copy answers (:func:`~.copy_source.s3_copied`)."""
        return s3_copied(self.destination, self.key, etag, sha256, size, source_sha256, method)


class PartUpload(Protocol[P]):
    """A multipart upload that :func:`send_parts` drives."""

    def send(self, piece: P) -> None:
        """Send one piece (and report the progress it makes)."""

    def finish(self) -> dict[str, Any]:
        """Complete the upload once every piece is sent (the fence and every check its own): what the
        copy answers (:meth:`S3Copy.copied`)."""

    def discard(self) -> None:
        """Leave nothing: abort the upload, or delete the object it completed. Never raises."""


def send_parts(
    upload: PartUpload[P], pieces: Iterable[P], cancel: threading.Event | None, tracker: ProgressTracker
) -> dict[str, Any]:
    """Send every piece of ``pieces`` into ``upload`` and finish it (``tracker`` finished): what the
    copy answers. A cancel (checked before each piece and before finishing) or any failure discards
    the upload and is raised."""
    try:
        for piece in pieces:
            check_cancel(cancel, "copy")
            upload.send(piece)
        check_cancel(cancel, "copy")
        stored = upload.finish()
    except BaseException:
        upload.discard()
        raise
    tracker.finish()
    return stored
