"""Export writers: a RAW source disk (a stored image, a volume, a block device) written as VMDK, VHD or RAW,
or
several of them as one OVA, to a file or to an S3 object; progress, digests, clean abort.

This is what an export step calls (it knows nothing of the API); :class:`StreamingExportWriter` is the
export step's writer interface over it:

* :func:`export_disk` — one disk as ``vmdk`` (streamOptimized, :mod:`appliance.image.vmdkwriter`: grains
  deflated in a thread pool, streamed straight into the destination), ``vhd`` (``dynamic``, what AWS
  exports, or ``fixed``: a regular file by :mod:`appliance.image.vhdwriter`, streamed straight into the
  destination like a VMDK; a block device, which has no data map to find its empty blocks by, by
  ``qemu-img convert -f raw -O vpc -o subformat=…,force_size=on``, confined like every qemu-img run,
  into a partial file) or ``raw`` (the disk's bytes; holes stay holes in a file);
* :func:`export_ova` — every disk as a streamOptimized VMDK in scratch (its sha256 computed as it is
  written), then the OVA (:func:`appliance.image.ovawrite.write_ova`: ``.ovf``, ``.mf``, disks) streamed into
  the destination;

and a destination is a :class:`FileDestination` (a partial file beside the final name, announced to the
task's ledger, flushed and renamed into place only when complete) or an :class:`S3Destination` (a streamed
multipart upload, :class:`appliance.targets.s3stream.MultipartWriter`: parts in parallel, ETags and
per-part SHA-256 checksums checked, the digests as object metadata). Any failure or cancel leaves
nothing: the partial file is removed, the upload aborted (or the completed object deleted), scratch
files removed.

Each result carries the output's size, its digest and the virtual size of the disk(s). The digest is the
chunked SHA-256 of the bytes as they were written (:mod:`appliance.targets.chunkdigest`: chunks of
``chunk_size``, 64 MiB by default, hashed in a pool of threads beside the reads and writes; a chunk that is
a hole of a RAW export is not hashed; to S3 the chunks are the multipart parts, so the digest is S3's own
composite checksum of the object). The whole-object ``sha256`` (serial: one CPU, ~0.86 CPU-s per GiB here)
is computed as well where it is cheap beside the rest (:func:`wants_full_sha256`: a VMDK or OVA, whose
deflate costs far more; an output of at most :data:`FULL_SHA256_MAX`), or on request; otherwise it is
None.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import confine, partials
from ..config import Config
from ..errors import Cancelled, ConversionFailed, ImageRejected, UsageError
from ..image import qemuimg
from ..image.convert import _run_convert, build_command
from ..image.decoding import SECTOR, zeros
from ..image.inspect import require_safe, verify_output
from ..image.ovawrite import OvaDiskFile, write_ova
from ..image.vhdwriter import FIXED, footer, has_data_map, write_dynamic_vhd
from ..image.vmdkwriter import ADAPTER_TYPES, ByteSink, write_stream_vmdk
from ..progress import ProgressCallback, ProgressTracker
from .base import TargetError, boto_client, remove_object, storage_error
from .chunkdigest import DEFAULT_CHUNK, ChunkedSha256, digest_file
from .hashing import ThreadedSha256
from .rawio import segments
from .s3stream import MultipartWriter

#: what a disk can be exported as
EXPORT_FORMATS = ("vmdk", "vhd", "raw")
VHD_SUBFORMATS = ("dynamic", "fixed")
_CHUNK = 4 << 20
_ZERO = bytes(_CHUNK)
#: outputs up to this size (the disk's virtual size) also get the whole-object sha256
FULL_SHA256_MAX = 256 << 20


def wants_full_sha256(fmt: str, size: int) -> bool:
    """Whether an export of a ``size``-byte disk as ``fmt`` computes the whole-object sha256 besides the
    chunked digest by default: a VMDK or an OVA (deflating costs ~15x the hash), or a small output."""
    return fmt in ("vmdk", "ova") or size <= FULL_SHA256_MAX


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: format, the disk's virtual size (the sum for an OVA), the output's size,
    its whole-object sha256 (None when it was not computed) and chunked ``digest``, where it is, how
    long it took, and per-disk facts for an OVA."""

    format: str
    subformat: str | None
    virtual_size: int
    size: int
    sha256: str | None
    location: dict[str, Any]
    seconds: float
    disks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def digest(self) -> dict[str, Any]:
        """The chunked digest (:meth:`appliance.targets.chunkdigest.ChunkedDigest.to_dict`)."""
        return dict(self.location.get("digest") or {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "subformat": self.subformat,
            "virtual_size": self.virtual_size,
            "size": self.size,
            "sha256": self.sha256,
            "digest": self.digest,
            "location": self.location,
            "seconds": round(self.seconds, 3),
            "disks": self.disks,
        }


class SourceCheck(Protocol):
    """The source disk's digest, taken from the writer's own reads of it (no second read of the source):
    ``read(offset, data)`` gets every piece the writer reads, in ascending order (the holes it skips
    are zeros); ``verify(size)`` is called once the whole disk was read, before the output is completed
    (a file renamed into place, an upload completed), and raises to leave nothing."""

    def read(self, offset: int, data: bytes) -> None: ...

    def verify(self, size: int) -> None: ...

    def output_stands_for_source(self, chunk_size: int) -> bool:
        """Whether the ``sha256-chunked`` of a RAW export's output (the source's bytes, as they are) in
        chunks of ``chunk_size`` can be compared instead of digesting the source a second time."""
        ...

    def verify_output(self, digest: Mapping[str, Any], size: int) -> bool:
        """Compare the RAW output's chunked ``digest`` (raises as :meth:`verify`); False when its chunk
        size is not the one needed (the source is then read again for :meth:`read`)."""
        ...


def _checked_producer(
    produce: Callable[[ByteSink], None], check: SourceCheck | None, size: int
) -> Callable[[ByteSink], None]:
    if check is None:
        return produce

    def run(sink: ByteSink) -> None:
        produce(sink)
        check.verify(size)

    return run


def read_whole_source(fd: int, size: int, check: SourceCheck, cancel: threading.Event | None) -> None:
    """Feed ``check`` the source by one read of its data ranges (for a writer that does not read the
    source itself: qemu-img), then verify it."""
    for start, end, is_data in segments(fd, size):
        pos = start
        while is_data and pos < end:
            if cancel is not None and cancel.is_set():
                raise Cancelled("export cancelled")
            chunk = os.pread(fd, min(_CHUNK, end - pos), pos)
            if not chunk:
                break
            check.read(pos, chunk)
            pos += len(chunk)
    check.verify(size)


# --------------------------------------------------------------------------------------- destinations


class Destination(Protocol):
    """Where an export goes: :meth:`stream` hands ``produce`` a forward-only sink and returns the
    location (with ``sha256``, ``digest``, ``size``) once it is complete; on any exception nothing is
    left. ``full_sha256``: compute the whole-object sha256 too (else ``sha256`` is None). ``check_output``
    gets the output's chunked digest once it is written and may raise: a file is then not renamed into
    place, an S3 object (completed: the composite checksum is known then) is deleted."""

    def stream(
        self,
        produce: Callable[[ByteSink], None],
        *,
        size_hint: int | None = None,
        full_sha256: bool = True,
        check_output: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> dict[str, Any]: ...


class _FileSink:
    """A new file written forward; all-zero writes and :meth:`write_zeros` become holes. Digests what it
    gets: the chunked digest when ``chunked`` (zeros are not hashed where a whole chunk is zeros), the
    whole-object sha256 when ``full``."""

    def __init__(
        self, fd: int, *, chunk_size: int = DEFAULT_CHUNK, full: bool = True, chunked: bool = True
    ) -> None:
        self.fd, self.offset = fd, 0
        self.chunks = ChunkedSha256(chunk_size, name="export-chunks") if chunked else None
        self.sha: ThreadedSha256 | None = ThreadedSha256("export-sha256") if full else None

    def write(self, data: bytes) -> int:
        n = len(data)
        if data == zeros(n):
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
        self.offset += n
        return n

    def write_zeros(self, n: int) -> None:
        """``n`` zero bytes, given by count (a hole: the file is truncated to its length at the end)."""
        if self.chunks is not None:
            self.chunks.zeros(n)
        if self.sha is not None:  # the whole-object sha256 has no shortcut for zeros
            left = n
            while left:
                m = min(left, _CHUNK)
                self.sha.update(_ZERO if m == _CHUNK else zeros(m), shared=True)
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
            sink = _FileSink(fd, chunk_size=self.chunk_size, full=full_sha256)
            try:
                try:
                    produce(sink)
                    os.ftruncate(fd, sink.offset)
                    os.fdatasync(fd)
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
            done = writer.close()
        if check_output is not None:
            try:
                check_output(done.get("digest") or {})
            except BaseException:
                with contextlib.suppress(Exception):  # (a caller that removes the key tries again)
                    self.client.delete_object(Bucket=self.bucket, Key=self.key)
                raise
        return {"type": "s3", **done}


# ------------------------------------------------------------------------------------------- producers


def _source_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError("the export source must be a regular file or a block device")
    return st.st_size


@contextlib.contextmanager
def _open_source(source: Path) -> Iterator[tuple[int, int]]:
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open the export source {source}: {exc.strerror}") from exc
    try:
        yield fd, _source_size(fd)
    finally:
        os.close(fd)


def _raw_producer(
    fd: int,
    size: int,
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes], object] | None = None,
) -> Callable[[ByteSink], None]:
    def produce(sink: ByteSink) -> None:
        holes: Callable[[int], None] | None = getattr(sink, "write_zeros", None)
        if holes is not None:  # a file: each hole given by its length, never read nor hashed
            _raw_sparse(fd, size, sink, holes, tracker, cancel, on_read)
            return
        pos = 0
        while pos < size:
            if cancel is not None and cancel.is_set():
                raise Cancelled("export cancelled")
            n = min(_CHUNK, size - pos)
            try:
                is_hole = os.lseek(fd, pos, os.SEEK_DATA) >= pos + n
            except OSError as exc:  # ENXIO: only a hole after pos; else no SEEK_DATA here
                is_hole = exc.errno == errno.ENXIO
            chunk = _ZERO[:n] if is_hole else os.pread(fd, n, pos)
            if len(chunk) != n:
                raise TargetError(
                    f"the source shrank while it was exported (at byte {pos})", "TargetWriteFailed"
                )
            if on_read is not None and not is_hole:
                on_read(pos, chunk)
            sink.write(chunk)
            pos += n
            tracker.update(pos)

    return produce


def _raw_sparse(
    fd: int,
    size: int,
    sink: ByteSink,
    holes: Callable[[int], None],
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes], object] | None = None,
) -> None:
    """The disk's data ranges written, its holes given to ``holes`` by length."""
    pos = 0
    for start, end, is_data in segments(fd, size):
        if not is_data:
            holes(end - start)
            pos = end
            tracker.update(pos)
            continue
        while pos < end:
            if cancel is not None and cancel.is_set():
                raise Cancelled("export cancelled")
            n = min(_CHUNK, end - pos)
            chunk = os.pread(fd, n, pos)
            if len(chunk) != n:
                raise TargetError(
                    f"the source shrank while it was exported (at byte {pos})", "TargetWriteFailed"
                )
            if on_read is not None:
                on_read(pos, chunk)
            sink.write(chunk)
            pos += n
            tracker.update(pos)


def _file_producer(path: Path, cancel: threading.Event | None) -> Callable[[ByteSink], None]:
    def produce(sink: ByteSink) -> None:
        with open(path, "rb", buffering=0) as f:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("export cancelled")
                chunk = f.read(_CHUNK)
                if not chunk:
                    return
                sink.write(chunk)

    return produce


# ------------------------------------------------------------------------------------------ the exports


def export_disk(
    source: Path,
    fmt: str,
    destination: FileDestination | S3Destination,
    *,
    config: Config,
    workdir: Path,
    subformat: str | None = None,
    adapter_type: str = "lsilogic",
    extent_name: str | None = None,
    threads: int = 0,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    ledger: partials.Ledger | None = None,
    full_sha256: bool | None = None,
    source_check: SourceCheck | None = None,
) -> ExportResult:
    """Write the RAW disk ``source`` as ``fmt`` (``vmdk``, ``vhd``, ``raw``) to ``destination``.

    ``workdir`` (scratch) holds a VHD on its way to S3; ``subformat`` is ``dynamic`` (default) or
    ``fixed`` for VHD; ``adapter_type`` the VMDK's ``ddb.adapterType``; ``full_sha256``: compute the
    whole-object sha256 besides the chunked digest (None: :func:`wants_full_sha256`); ``source_check``
    sees the source as the writer reads it and is verified before the output is completed (a VHD of a
    block device, which qemu-img reads, is read once for it first). Raises
    :class:`UsageError` for a bad format or source, ``UploadFailed``/``TargetWriteFailed``/
    ``InsufficientStorage`` for the destination, :class:`ConversionFailed` when qemu-img fails,
    :class:`Cancelled` on ``cancel``."""
    started = time.monotonic()
    fmt = fmt.lower()
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"cannot export as {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "vhd":
        subformat = subformat or "dynamic"
        if subformat not in VHD_SUBFORMATS:
            raise UsageError(f"VHD subformat {subformat!r}: use dynamic or fixed")
    elif subformat not in (None, "streamOptimized" if fmt == "vmdk" else None):
        raise UsageError(f"{fmt} output has no subformat {subformat!r}")
    if fmt == "vmdk":
        subformat = "streamOptimized"
        if adapter_type not in ADAPTER_TYPES:
            raise UsageError(f"adapter type {adapter_type!r}: use one of {', '.join(ADAPTER_TYPES)}")
    with _open_source(Path(source)) as (fd, size):
        tracker = ProgressTracker("exporting", size, on_progress)
        full = wants_full_sha256(fmt, size) if full_sha256 is None else full_sha256
        on_read = source_check.read if source_check is not None else None
        if fmt == "vmdk":
            name = extent_name or _extent_name(destination)

            def produce(sink: ByteSink) -> None:
                write_stream_vmdk(
                    fd,
                    size,
                    sink,
                    extent_name=name,
                    adapter_type=adapter_type,
                    threads=threads,
                    on_progress=tracker.update,
                    cancel=cancel,
                    on_read=on_read,
                )

            location = destination.stream(
                _checked_producer(produce, source_check, size), size_hint=size, full_sha256=full
            )
        elif fmt == "raw":
            chunk = (
                destination.chunk_size if isinstance(destination, FileDestination) else destination.part_size
            )
            if source_check is not None and source_check.output_stands_for_source(chunk):
                # the output's bytes are the source's: its digest is the source's (hashed once, not twice)
                check = source_check

                def by_output(digest: Mapping[str, Any]) -> None:
                    if not check.verify_output(digest, size):  # (the upload grew its parts)
                        read_whole_source(fd, size, check, cancel)

                location = destination.stream(
                    _raw_producer(fd, size, tracker, cancel),
                    size_hint=size,
                    full_sha256=full,
                    check_output=by_output,
                )
            else:
                location = destination.stream(
                    _checked_producer(_raw_producer(fd, size, tracker, cancel, on_read), source_check, size),
                    size_hint=size,
                    full_sha256=full,
                )
        elif streams_vhd(fd, size):
            location = destination.stream(
                _checked_producer(
                    _vhd_producer(fd, size, str(subformat), tracker, cancel, on_read), source_check, size
                ),
                size_hint=_vhd_size_hint(size),
                full_sha256=full,
            )
        else:
            if source_check is not None:  # qemu-img reads the source: one read of it for the check first
                read_whole_source(fd, size, source_check, cancel)
            location = _export_vhd(
                Path(source),
                size,
                str(subformat),
                destination,
                config,
                workdir,
                tracker,
                cancel,
                ledger,
                full,
            )
    tracker.finish()
    return ExportResult(
        fmt,
        subformat,
        size,
        int(location["size"]),
        location.get("sha256"),
        location,
        time.monotonic() - started,
    )


def streams_vhd(fd: int, size: int) -> bool:
    """Whether a VHD export of the disk open as ``fd`` streams through the project's writer
    (:mod:`appliance.image.vhdwriter`: a regular file of whole sectors, whose data map decides the
    allocated blocks) rather than through qemu-img into scratch (a block device: no data map)."""
    return has_data_map(fd) and size > 0 and size % SECTOR == 0


def _vhd_size_hint(size: int) -> int:
    return size + size // 4096 + (1 << 20)


def _vhd_producer(
    fd: int,
    size: int,
    subformat: str,
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes], object] | None = None,
) -> Callable[[ByteSink], None]:
    if subformat == "fixed":  # the disk's bytes (holes stay holes in a file), then the footer
        raw = _raw_producer(fd, size, tracker, cancel, on_read)

        def fixed(sink: ByteSink) -> None:
            raw(sink)
            sink.write(footer(size, FIXED))

        return fixed

    def dynamic(sink: ByteSink) -> None:
        write_dynamic_vhd(fd, size, sink, on_progress=tracker.update, cancel=cancel, on_read=on_read)

    return dynamic


def _extent_name(destination: FileDestination | S3Destination) -> str:
    raw = (
        destination.path.name
        if isinstance(destination, FileDestination)
        else destination.key.rsplit("/", 1)[-1]
    )
    clean = "".join(c for c in raw if c.isalnum() or c in "._-")
    return clean or "disk.vmdk"


def _qemu_vhd(
    source: Path,
    size: int,
    subformat: str,
    out: Path,
    config: Config,
    workdir: Path,
    tracker: ProgressTracker,
    cancel: threading.Event | None,
) -> None:
    """``qemu-img convert -f raw -O vpc`` into ``out`` (confined, the source linked into a private dir)."""
    policy = confine.qemu_img_convert(config.limits, size)
    if stat.S_ISBLK(os.stat(source).st_mode):  # a volume: read by its path (raw: nothing to resolve)
        with confine.private_dir(workdir, "qemu-img.") as cwd:
            argv = build_command(
                source.absolute(), "raw", out.absolute(), "vhd", subformat, qemu_img=qemuimg.qemu_img()
            )
            _run_convert(argv, policy, cwd, tracker, size, cancel, out)
    else:
        with qemuimg.isolated(source, parent=workdir) as linked:
            argv = build_command(linked, "raw", out.absolute(), "vhd", subformat, qemu_img=qemuimg.qemu_img())
            _run_convert(argv, policy, linked.parent, tracker, size, cancel, out)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    try:
        require_safe(verify_output(out, "vhd", config=config))
    except ImageRejected as exc:
        raise ConversionFailed(
            f"the VHD qemu-img wrote does not re-inspect as VHD: {exc}", code="ConversionFailed.UnsafeOutput"
        ) from exc


def _export_vhd(
    source: Path,
    size: int,
    subformat: str,
    destination: FileDestination | S3Destination,
    config: Config,
    workdir: Path,
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    ledger: partials.Ledger | None,
    full: bool,
) -> dict[str, Any]:
    if isinstance(destination, FileDestination):
        with destination.partial() as tmp:
            _qemu_vhd(source, size, subformat, tmp, config, workdir, tracker, cancel)
            # qemu-img wrote it: one read (its holes skipped) for the digests
            digest = digest_file(tmp, destination.chunk_size, cancel=cancel).to_dict()
            sha = _hash(tmp, cancel) if full else None
            out_size = tmp.stat().st_size
            destination.publish(tmp)
        return {
            "type": "file",
            "path": str(destination.path),
            "sha256": sha,
            "digest": digest,
            "size": out_size,
        }
    with partials.partial_file(Path(workdir) / "export.vhd", ledger) as tmp:
        _qemu_vhd(source, size, subformat, tmp, config, workdir, tracker, cancel)
        return destination.stream(_file_producer(tmp, cancel), size_hint=tmp.stat().st_size, full_sha256=full)


def _hash(path: Path, cancel: threading.Event | None) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            if cancel is not None and cancel.is_set():
                raise Cancelled("export cancelled")
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class OvaSource:
    """A disk of an OVA export: the RAW source and the member name its VMDK gets (default diskN.vmdk)."""

    path: Path
    name: str | None = None


def export_ova(
    sources: list[OvaSource],
    destination: FileDestination | S3Destination,
    *,
    name: str,
    config: Config,
    workdir: Path,
    firmware: str = "bios",
    platform: str = "linux",
    cpus: int = 1,
    memory_mib: int = 1024,
    threads: int = 0,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    ledger: partials.Ledger | None = None,
    full_sha256: bool | None = None,
    source_checks: list[SourceCheck | None] | None = None,
) -> ExportResult:
    """The disks ``sources`` (boot disk first) as one OVA of VM ``name`` (module docstring).
    ``firmware`` is ``efi`` for a guest that validated as UEFI, else ``bios``. Each disk's VMDK gets
    its whole sha256 (the ``.mf`` lists it); the OVA's too unless ``full_sha256`` is False.
    ``source_checks``: per disk, what :func:`export_disk`'s ``source_check`` is (verified once the disk
    was read, before its VMDK is packed)."""
    started = time.monotonic()
    if not sources:
        raise UsageError("an OVA export needs at least one disk")
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise UsageError(f"OVA name {name!r}: a plain name")
    sizes = []
    for s in sources:
        with _open_source(s.path) as (_fd, size):
            sizes.append(size)
    tracker = ProgressTracker("exporting", 2 * sum(sizes), on_progress)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        tracker.update(done)

    packed: list[OvaDiskFile] = []
    disks: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        for i, (s, size) in enumerate(zip(sources, sizes, strict=True), 1):
            member = s.name or f"{name}-disk{i}.vmdk"
            tmp = stack.enter_context(partials.partial_file(Path(workdir) / member, ledger))
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            sink = _FileSink(fd, full=True, chunked=False)  # the .mf lists each VMDK's sha256
            try:
                check = (source_checks or [])[i - 1] if source_checks and i <= len(source_checks) else None
                with _open_source(s.path) as (src_fd, _):
                    base = done

                    def step(d: int, base: int = base) -> None:
                        tracker.update(base + d)

                    result = write_stream_vmdk(
                        src_fd,
                        size,
                        sink,
                        extent_name=member,
                        threads=threads,
                        cancel=cancel,
                        on_progress=step,
                        on_read=check.read if check is not None else None,
                    )
                    if check is not None:
                        check.verify(size)
                    done = base + size
                os.ftruncate(fd, sink.offset)
                full, _chunked = sink.digests()
            except OSError as exc:
                raise storage_error(exc, f"scratch ({tmp.name})") from exc
            finally:
                sink.close()
                os.close(fd)
            sha256 = str(full)
            packed.append(OvaDiskFile(tmp, member, sha256, result.virtual_size, result.data_bytes))
            disks.append(
                {
                    "name": member,
                    "virtual_size": result.virtual_size,
                    "size": result.size,
                    "sha256": sha256,
                    "source": str(s.path),
                }
            )

        packed_bytes = max(1, sum(p.path.stat().st_size for p in packed))

        def produce(sink: ByteSink) -> None:
            write_ova(
                sink,
                name,
                packed,
                cpus=cpus,
                memory_mib=memory_mib,
                firmware=firmware,
                platform=platform,
                on_progress=lambda n: advance(n * sum(sizes) // packed_bytes),
                cancel=cancel,
            )

        location = destination.stream(
            produce,
            size_hint=packed_bytes + (64 << 10),
            full_sha256=wants_full_sha256("ova", sum(sizes)) if full_sha256 is None else full_sha256,
        )
    tracker.finish()
    return ExportResult(
        "ova",
        None,
        sum(sizes),
        int(location["size"]),
        location.get("sha256"),
        location,
        time.monotonic() - started,
        disks,
    )


def _location(result: ExportResult) -> dict[str, Any]:
    """What an export to S3 wrote: its location without ``type``."""
    return {k: v for k, v in result.location.items() if k != "type"}


class StreamingExportWriter:
    """The export step's writer interface ("write this source disk as format F to S3 key K, report
    progress, abort cleanly": ``write(source, *, disk_format, bucket, key, workdir, metadata, …)`` and
    ``remove(bucket, key)``) over these writers: a VMDK or RAW disk streams straight into a parallel
    multipart upload, a VHD goes through qemu-img in scratch. The S3 client is made from
    ``config.sources.s3`` (the user's buckets)."""

    def __init__(self, config: Config, *, part_size: int = 64 << 20, threads: int = 4) -> None:
        self.config = config
        self.part_size, self.threads = part_size, threads
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = boto_client("s3", self.config.sources.s3, max_pool_connections=self.threads + 2)
        return self._client

    def write(
        self,
        source: Path,
        *,
        disk_format: str,
        bucket: str,
        key: str,
        workdir: Path,
        metadata: Mapping[str, str],
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        fence: Callable[[], None] | None = None,
        ledger: partials.Ledger | None = None,
        source_check: SourceCheck | None = None,
    ) -> dict[str, Any]:
        """Write ``source`` as ``disk_format`` to ``s3://bucket/key`` with ``metadata`` (plus
        ``sha256``); returns ``{bucket, key, etag, sha256, size, parts, format, seconds}``.
        ``source_check``: :func:`export_disk`'s (a mismatch aborts the upload)."""

        def export(dest: S3Destination) -> ExportResult:
            return export_disk(
                source,
                disk_format,
                dest,
                config=self.config,
                workdir=workdir,
                on_progress=on_progress,
                cancel=cancel,
                ledger=ledger,
                source_check=source_check,
            )

        result = self._upload(bucket, key, metadata, cancel, fence, export)
        return _location(result) | {"format": result.format, "seconds": round(result.seconds, 3)}

    def write_ova(
        self,
        sources: list[Path],
        *,
        name: str,
        bucket: str,
        key: str,
        workdir: Path,
        metadata: Mapping[str, str],
        firmware: str = "bios",
        platform: str = "linux",
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        fence: Callable[[], None] | None = None,
        ledger: partials.Ledger | None = None,
        source_checks: list[SourceCheck | None] | None = None,
    ) -> dict[str, Any]:
        """The disks ``sources`` (boot disk first) as one OVA of VM ``name`` (:func:`export_ova`: the
        VMDKs in ``workdir``, then the tar streamed) to ``s3://bucket/key``; returns
        ``{bucket, key, etag, sha256, size, parts, format: "ova", seconds, disks, firmware}``."""

        def export(dest: S3Destination) -> ExportResult:
            return export_ova(
                [OvaSource(p) for p in sources],
                dest,
                name=name,
                config=self.config,
                workdir=workdir,
                firmware=firmware,
                platform=platform,
                on_progress=on_progress,
                cancel=cancel,
                ledger=ledger,
                source_checks=source_checks,
            )

        result = self._upload(bucket, key, metadata, cancel, fence, export)
        return _location(result) | {
            "format": "ova",
            "seconds": round(result.seconds, 3),
            "disks": result.disks,
            "firmware": firmware,
        }

    def _upload(
        self,
        bucket: str,
        key: str,
        metadata: Mapping[str, str],
        cancel: threading.Event | None,
        fence: Callable[[], None] | None,
        export: Callable[[S3Destination], ExportResult],
    ) -> ExportResult:
        """``export`` into a multipart upload to ``s3://bucket/key``; on any failure or cancel the
        upload aborts itself and a completed object is deleted (:meth:`remove`)."""
        dest = S3Destination(
            self.client,
            bucket,
            key,
            part_size=self.part_size,
            threads=self.threads,
            metadata=dict(metadata),
            cancel=cancel,
            fence=fence,
        )
        try:
            return export(dest)
        except BaseException:
            self.remove(bucket, key)
            raise

    def remove(self, bucket: str, key: str) -> None:
        """Delete the object and abort every incomplete multipart upload of its key (gone already: fine)."""
        try:
            remove_object(self.client, bucket, key)
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code == "NoSuchBucket":
                return
            raise TargetError(
                f"removing s3://{bucket}/{key} failed: {code or type(exc).__name__}", "TargetDeleteFailed"
            ) from exc
