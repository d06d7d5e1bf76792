"""Where an export goes: a :class:`FileDestination` (a partial file beside the final name, announced to
the task's ledger, flushed and renamed into place only when complete; all-zero writes become holes) or an
:class:`S3Destination` (a streamed multipart upload, :class:`appliance.targets.s3stream.MultipartWriter`:
parts in parallel, ETags and per-part SHA-256 checksums checked, the digests as object metadata). Either
digests what it is given: the chunked SHA-256 (:mod:`appliance.targets.chunkdigest`) and, on request, the
whole-object sha256. Any failure leaves nothing."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import pagecache, partials
from ..errors import UsageError
from ..image.decoding import zeros
from ..image.vmdkwriter import ByteSink
from .base import storage_error
from .chunkdigest import DEFAULT_CHUNK, ChunkedSha256, is_zero
from .exportraw import CHUNK
from .hashing import ThreadedSha256
from .s3stream import MultipartWriter


class Destination(Protocol):
    """Where an export goes: :meth:`stream` hands ``produce`` a forward-only sink and returns the
    location (with ``sha256``, ``digest``, ``size``) once it is complete; on any exception nothing is
    left. ``full_sha256``: compute the whole-object sha256 too (else ``sha256`` is None). ``check_output``
    gets the output's chunked digest once it is written and may raise: a file is then not renamed into
    place, a multipart upload is aborted before it is completed (the object never existed)."""

    def stream(
        self,
        produce: Callable[[ByteSink], None],
        *,
        size_hint: int | None = None,
        full_sha256: bool = True,
        check_output: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> dict[str, Any]: ...


class FileSink:
    """A new file written forward; all-zero writes and :meth:`write_zeros` become holes. Digests what it
    gets: the chunked digest when ``chunked`` (zeros are not hashed where a whole chunk is zeros), the
    whole-object sha256 when ``full``. ``dropping``: the file leaves the page cache behind the writer
    (:class:`appliance.pagecache.WriteBehind`) (a final output nobody reads back here: left cached,
    GiBs of it would cost fresh page-cache pages, dear on this kind of machine)."""

    def __init__(
        self,
        fd: int,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        full: bool = True,
        chunked: bool = True,
        dropping: bool = False,
    ) -> None:
        self.fd, self.offset = fd, 0
        self.behind = pagecache.WriteBehind(fd) if dropping else None
        self.chunks = ChunkedSha256(chunk_size, name="export-chunks") if chunked else None
        self.sha: ThreadedSha256 | None = ThreadedSha256("export-sha256") if full else None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if is_zero(data):
            self.write_zeros(n)
            return n
        if self.chunks is not None:
            self.chunks.update(data)
        if self.sha is not None:
            self.sha.update(data)
        view = memoryview(data)
        at = self.offset
        while view:
            w = os.pwrite(self.fd, view, at)
            view, at = view[w:], at + w
        del view  # (a pooled read buffer is free again once no view of it is left)
        self.offset += n
        if self.behind is not None:
            self.behind.wrote(n)
        return n

    def write_zeros(self, n: int) -> None:
        """``n`` zero bytes, given by count (a hole: the file is truncated to its length at the end)."""
        if self.chunks is not None:
            self.chunks.zeros(n)
        if self.sha is not None:  # the whole-object sha256 has no shortcut for zeros
            left = n
            while left:
                m = min(left, CHUNK)
                self.sha.update(zeros(m), shared=True)  # (cached: no allocation per call)
                left -= m
        self.offset += n

    def digests(self) -> tuple[str | None, dict[str, Any]]:
        """``(sha256 or None, the chunked digest's dict)`` of everything written."""
        chunked = self.chunks.result().to_dict() if self.chunks is not None else {}
        return (self.sha.hexdigest() if self.sha is not None else None), chunked

    def close(self) -> None:
        if self.chunks is not None:
            self.chunks.close()
        if self.sha is not None:
            self.sha.close()


@dataclass
class FileDestination:
    """A file at ``path``: written as a partial (announced to ``ledger``), flushed, renamed into place."""

    path: Path
    ledger: partials.Ledger | None = None
    #: the chunk of the output's chunked digest
    chunk_size: int = DEFAULT_CHUNK

    def stream(
        self,
        produce: Callable[[ByteSink], None],
        *,
        size_hint: int | None = None,
        full_sha256: bool = True,
        check_output: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        with self.partial() as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            sink = FileSink(fd, chunk_size=self.chunk_size, full=full_sha256, dropping=True)
            try:
                try:
                    produce(sink)
                    os.ftruncate(fd, sink.offset)
                    os.fdatasync(fd)
                    pagecache.drop_range(fd)  # all clean now: nothing of the output is left cached
                except OSError as exc:
                    raise storage_error(exc, str(self.path)) from exc
                sha256, digest = sink.digests()
            finally:
                sink.close()
                os.close(fd)
            if check_output is not None:
                check_output(digest)
            self.publish(tmp)
        return {
            "type": "file",
            "path": str(self.path),
            "sha256": sha256,
            "digest": digest,
            "size": sink.offset,
        }

    @contextlib.contextmanager
    def partial(self) -> Iterator[Path]:
        """The partial file of :attr:`path` (removed unless published)."""
        if not self.path.parent.is_dir():
            raise UsageError(f"output directory {self.path.parent} does not exist")
        if self.path.is_dir():
            raise UsageError(f"output {self.path} is a directory; give a file name")
        with partials.partial_file(self.path, self.ledger) as tmp:
            yield tmp

    def publish(self, tmp: Path) -> None:
        partials.publish(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class S3Destination:
    """An S3 object written by a streamed multipart upload (:class:`MultipartWriter`)."""

    client: Any
    bucket: str
    key: str
    part_size: int = 64 << 20
    threads: int = 4
    metadata: Mapping[str, str] = field(default_factory=dict)
    sse: Mapping[str, str] = field(default_factory=dict)
    cancel: threading.Event | None = None
    fence: Callable[[], None] | None = None

    def stream(
        self,
        produce: Callable[[ByteSink], None],
        *,
        size_hint: int | None = None,
        full_sha256: bool = True,
        check_output: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        with MultipartWriter(
            self.client,
            self.bucket,
            self.key,
            part_size=self.part_size,
            threads=self.threads,
            metadata=self.metadata,
            sse=self.sse,
            expected_size=size_hint,
            cancel=self.cancel,
            fence=self.fence,
            checksums=True,
            full_sha256=full_sha256,
        ) as writer:
            produce(writer)
            # the check runs on the parts' digest before the upload is completed: a failed check
            # aborts it, so no reader ever sees an object that did not check out
            done = writer.close(before_complete=check_output)
        return {"type": "s3", **done}
