"""The ``upload`` origin: a staged upload (:mod:`.staged`) read like any other source.

:class:`UploadOrigin` implements :class:`~.origins.Origin` over the upload's file, so the ranged
reader, the header-only preflight and the download into scratch read an ``upload://{id}`` exactly as
they read an S3 object: ranged answers (206 with ``Content-Range``), the upload's ``etag`` as the
validator (every ranged read carries it: an upload removed and sent again under the same id fails
with ``Source.Changed``), 416 past the end. Only a complete upload of the task's account is read
(``Upload.NotFound``, ``Upload.Incomplete`` otherwise).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Generator
from typing import Any

from ..errors import Cancelled, SourceChanged
from .http import BodyTooLong, SourceIntegrity, SourceUnavailable
from .manifest import Importer, ImportManifest, Part
from .methods import UPLOAD_SCHEME
from .ranges import Validator
from .staged import UploadArea
from .stagedproto import UploadInfo, parse_upload_url

#: bytes handed over per chunk
CHUNK = 1 << 20


class FileResponse:
    """A 200/206 answer whose body is bytes ``start``..``stop`` (exclusive) of an open file."""

    def __init__(
        self, fd: int, start: int, stop: int, info: UploadInfo, ranged: bool, cancel: threading.Event
    ) -> None:
        self._fd, self._start, self._stop, self._cancel = fd, start, stop, cancel
        size = info.size or 0
        self.status = 206 if ranged else 200
        self.content_length: int | None = stop - start
        self.etag: str | None = info.etag
        self.headers: dict[str, str] = {"Content-Length": str(stop - start), "ETag": f'"{info.etag}"'}
        if ranged:
            self.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"

    def iter_chunks(self, chunk_size: int = CHUNK) -> Generator[bytes, None, None]:
        pos = self._start
        while pos < self._stop:
            if self._cancel.is_set():
                raise Cancelled("reading the upload cancelled")
            data = os.pread(self._fd, min(chunk_size, self._stop - pos), pos)
            if not data:  # the file is shorter than the upload says: the reader reports the short body
                return
            pos += len(data)
            yield data

    def fill(self, view: memoryview, step: int = CHUNK) -> Generator[int, None, None]:
        """The body straight into ``view`` (``preadv``, no bytes object per piece): the count of each
        piece; :class:`~.http.BodyTooLong` when the body is longer than ``view``."""
        pos, end = self._start, min(self._stop, self._start + len(view))
        while pos < end:
            if self._cancel.is_set():
                raise Cancelled("reading the upload cancelled")
            at = pos - self._start
            n = os.preadv(self._fd, [view[at : at + min(step, end - pos)]], pos)
            if not n:  # the file is shorter than the upload says: the reader reports the short body
                return
            pos += n
            yield n
        if self._stop > end:
            raise BodyTooLong(f"the body is longer than the {len(view)} bytes asked for")

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UploadOrigin:
    """A complete staged upload of ``account`` (module docstring)."""

    def __init__(self, area: UploadArea, account: str, upload_id: str) -> None:
        self.area, self.account, self.upload_id = area, account, upload_id
        self.where = f"upload://{upload_id}"

    def info(self) -> UploadInfo:
        return self.area.ready(self.account, self.upload_id)

    def get(
        self,
        start: int,
        end: int | None,
        *,
        if_match: Validator | None = None,
        if_range: Validator | None = None,
        cancel: threading.Event,
    ) -> FileResponse:
        info = self.info()
        size = info.size or 0
        if if_match and if_match.etag and if_match.etag != info.etag:
            raise SourceUnavailable(f"{self.where} is no longer the upload that was read", status=412)
        whole = start == 0 and end is None
        if if_range and if_range.etag and if_range.etag != info.etag:
            start, end, whole = 0, None, True  # as HTTP: a changed object is sent whole
        if not whole and start >= size:
            raise SourceUnavailable(f"{self.where}: no byte {start} in {size} bytes", status=416)
        stop = size if end is None else min(end + 1, size)
        fd = os.open(self.area.data_path(self.account, self.upload_id), os.O_RDONLY | os.O_CLOEXEC)
        return FileResponse(fd, start, stop, info, not whole, cancel)

    def validator(self, response: Any) -> Validator:
        return Validator(etag=response.etag)

    def md5_etag(self, response: Any) -> str | None:
        return None


# -- a staged upload as the disk of ImportVolume/ImportInstance ------------------------------------

#: the importer name of a manifest made from a staged upload (its version is the upload's etag, its
#: release the account)
IMPORTER = "imaging-upload"
#: bytes per part of such a manifest: the unit a resumed volume import restarts from
PART_SIZE = 64 << 20
GiB = 1 << 30


def upload_manifest(info: UploadInfo, file_format: str, part_size: int = PART_SIZE) -> ImportManifest:
    """An :class:`~.manifest.ImportManifest` whose parts are ranges of the complete upload ``info``,
    so ``volume.import`` writes it as it writes an uploaded manifest's parts (:func:`read_parts`)."""
    size = info.size or 0
    url = f"{UPLOAD_SCHEME}{info.id}"
    parts = [
        Part(i, start, min(start + part_size, size) - 1, f"{info.id}@{start}", url, url)
        for i, start in enumerate(range(0, size, part_size))
    ]
    return ImportManifest(
        version="upload",
        file_format=file_format,
        importer=Importer(IMPORTER, info.etag or "", info.account),
        self_destruct_url=None,
        size=size,
        volume_size=max(1, -(-size // GiB)),
        parts=parts,
    )


def manifest_origin(manifest: ImportManifest, area: UploadArea) -> tuple[UploadOrigin, Validator] | None:
    """The upload a manifest of :func:`upload_manifest` reads, and the etag it must still have; None
    for a real import manifest."""
    imp = manifest.importer
    if imp is None or imp.name != IMPORTER or not manifest.parts:
        return None
    upload_id = parse_upload_url(manifest.parts[0].get_url)
    return UploadOrigin(area, imp.release, upload_id), Validator(etag=imp.version or None)


def read_range(
    origin: UploadOrigin, validator: Validator, start: int, end: int, cancel: threading.Event
) -> bytes:
    """Bytes ``[start, end)`` of the upload."""
    if end <= start:
        return b""
    with origin.get(start, end - 1, if_match=validator, cancel=cancel) as response:
        data = b"".join(response.iter_chunks())
    if len(data) != end - start:
        raise SourceIntegrity(f"{origin.where}: read {len(data)} of {end - start} bytes at {start}")
    return data


def read_parts(
    manifest: ImportManifest,
    write: Callable[[int, bytes], None],
    origin: UploadOrigin,
    validator: Validator,
    *,
    start_index: int = 0,
    on_part: Callable[[Part, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> int:
    """:func:`~.parts.download_parts` for a manifest of :func:`upload_manifest`: each part read from
    the upload (which must still have the manifest's etag: ``Source.Changed`` otherwise), in order."""
    stop = cancel or threading.Event()
    written = 0
    for part in manifest.parts[start_index:]:
        try:
            response = origin.get(part.start, part.end, if_match=validator, cancel=stop)
        except SourceUnavailable as exc:
            if exc.status == 412:
                raise SourceChanged(
                    f"{origin.where} was removed and sent again while it was imported; import it again"
                ) from exc
            raise
        offset = part.start
        with response:
            for chunk in response.iter_chunks():
                write(offset, chunk)
                offset += len(chunk)
        if offset != part.end + 1:
            raise SourceIntegrity(f"{origin.where}: part {part.index} ended at {offset}, not {part.end + 1}")
        written += part.length
        if on_part is not None:
            on_part(part, part.end + 1)
    return written
