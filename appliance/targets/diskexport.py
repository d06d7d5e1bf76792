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
  written), then the OVA (:func:`appliance.image.ova.write_ova`: ``.ovf``, ``.mf``, disks) streamed into
  the destination;

and a destination is a :class:`FileDestination` (a partial file beside the final name, announced to the
task's ledger, flushed and renamed into place only when complete) or an :class:`S3Destination` (a streamed
multipart upload, :class:`appliance.targets.s3stream.MultipartWriter`: parts in parallel, ETags checked,
the sha256 as object metadata). Any failure or cancel leaves nothing: the partial file is removed, the
upload aborted (or the completed object deleted), scratch files removed.

Each result carries the output's sha256 and size (computed from the bytes as they were written, in a
thread of its own beside the reads and writes: :class:`appliance.targets.hashing.ThreadedSha256`) and the
virtual size of the disk(s).
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
from ..image.ova import OvaDiskFile, write_ova
from ..image.vhdwriter import FIXED, footer, has_data_map, write_dynamic_vhd
from ..image.vmdkwriter import ADAPTER_TYPES, ByteSink, write_stream_vmdk
from ..progress import ProgressCallback, ProgressTracker
from .base import TargetError, boto_client, storage_error
from .hashing import ThreadedSha256
from .s3stream import MultipartWriter

#: what a disk can be exported as
EXPORT_FORMATS = ("vmdk", "vhd", "raw")
VHD_SUBFORMATS = ("dynamic", "fixed")
_CHUNK = 4 << 20
_ZERO = bytes(_CHUNK)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: format, the disk's virtual size (the sum for an OVA), the output's size and
    sha256, where it is, how long it took, and per-disk facts for an OVA."""

    format: str
    subformat: str | None
    virtual_size: int
    size: int
    sha256: str
    location: dict[str, Any]
    seconds: float
    disks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "subformat": self.subformat,
            "virtual_size": self.virtual_size,
            "size": self.size,
            "sha256": self.sha256,
            "location": self.location,
            "seconds": round(self.seconds, 3),
            "disks": self.disks,
        }


# --------------------------------------------------------------------------------------- destinations


class Destination(Protocol):
    """Where an export goes: :meth:`stream` hands ``produce`` a forward-only sink and returns the
    location (with ``sha256``, ``size``) once it is complete; on any exception nothing is left."""

    def stream(
        self, produce: Callable[[ByteSink], None], *, size_hint: int | None = None
    ) -> dict[str, Any]: ...


class _FileSink:
    """A new file written forward; all-zero chunks of 4 KiB multiples become holes. Hashes what it gets."""

    def __init__(self, fd: int) -> None:
        self.fd, self.offset = fd, 0
        self.sha = ThreadedSha256("export-sha256")

    def write(self, data: bytes) -> int:
        n = len(data)
        zero = zeros(n)
        if data == zero:  # zeros stay a hole; the hash takes the cached zero chunk, with no copy held
            self.sha.update(zero, shared=True)
        else:
            self.sha.update(data)
            view = memoryview(data)
            at = self.offset
            while view:
                w = os.pwrite(self.fd, view, at)
                view, at = view[w:], at + w
        self.offset += n
        return n


@dataclass
class FileDestination:
    """A file at ``path``: written as a partial (announced to ``ledger``), flushed, renamed into place."""

    path: Path
    ledger: partials.Ledger | None = None

    def stream(self, produce: Callable[[ByteSink], None], *, size_hint: int | None = None) -> dict[str, Any]:
        with self.partial() as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            sink = _FileSink(fd)
            try:
                try:
                    produce(sink)
                    os.ftruncate(fd, sink.offset)
                    os.fdatasync(fd)
                except OSError as exc:
                    raise storage_error(exc, str(self.path)) from exc
            finally:
                sink.sha.close()
                os.close(fd)
            self.publish(tmp)
        return {"type": "file", "path": str(self.path), "sha256": sink.sha.hexdigest(), "size": sink.offset}

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

    def stream(self, produce: Callable[[ByteSink], None], *, size_hint: int | None = None) -> dict[str, Any]:
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
        ) as writer:
            produce(writer)
            done = writer.close()
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
    fd: int, size: int, tracker: ProgressTracker, cancel: threading.Event | None
) -> Callable[[ByteSink], None]:
    def produce(sink: ByteSink) -> None:
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
            sink.write(chunk)
            pos += n
            tracker.update(pos)

    return produce


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
) -> ExportResult:
    """Write the RAW disk ``source`` as ``fmt`` (``vmdk``, ``vhd``, ``raw``) to ``destination``.

    ``workdir`` (scratch) holds a VHD on its way to S3; ``subformat`` is ``dynamic`` (default) or
    ``fixed`` for VHD; ``adapter_type`` the VMDK's ``ddb.adapterType``. Raises :class:`UsageError` for a
    bad format or source, ``UploadFailed``/``TargetWriteFailed``/``InsufficientStorage`` for the
    destination, :class:`ConversionFailed` when qemu-img fails, :class:`Cancelled` on ``cancel``."""
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
                )

            location = destination.stream(produce, size_hint=size)
        elif fmt == "raw":
            location = destination.stream(_raw_producer(fd, size, tracker, cancel), size_hint=size)
        elif streams_vhd(fd, size):
            location = destination.stream(
                _vhd_producer(fd, size, str(subformat), tracker, cancel), size_hint=_vhd_size_hint(size)
            )
        else:
            location = _export_vhd(
                Path(source), size, str(subformat), destination, config, workdir, tracker, cancel, ledger
            )
    tracker.finish()
    return ExportResult(
        fmt,
        subformat,
        size,
        int(location["size"]),
        str(location["sha256"]),
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
    fd: int, size: int, subformat: str, tracker: ProgressTracker, cancel: threading.Event | None
) -> Callable[[ByteSink], None]:
    if subformat == "fixed":  # the disk's bytes (holes stay holes in a file), then the footer
        raw = _raw_producer(fd, size, tracker, cancel)

        def fixed(sink: ByteSink) -> None:
            raw(sink)
            sink.write(footer(size, FIXED))

        return fixed

    def dynamic(sink: ByteSink) -> None:
        write_dynamic_vhd(fd, size, sink, on_progress=tracker.update, cancel=cancel)

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
) -> dict[str, Any]:
    if isinstance(destination, FileDestination):
        with destination.partial() as tmp:
            _qemu_vhd(source, size, subformat, tmp, config, workdir, tracker, cancel)
            sha = _hash(tmp, cancel)
            out_size = tmp.stat().st_size
            destination.publish(tmp)
        return {"type": "file", "path": str(destination.path), "sha256": sha, "size": out_size}
    with partials.partial_file(Path(workdir) / "export.vhd", ledger) as tmp:
        _qemu_vhd(source, size, subformat, tmp, config, workdir, tracker, cancel)
        return destination.stream(_file_producer(tmp, cancel), size_hint=tmp.stat().st_size)


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
) -> ExportResult:
    """The disks ``sources`` (boot disk first) as one OVA of VM ``name`` (module docstring).
    ``firmware`` is ``efi`` for a guest that validated as UEFI, else ``bios``."""
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
            sink = _FileSink(fd)
            try:
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
                    )
                    done = base + size
                os.ftruncate(fd, sink.offset)
            except OSError as exc:
                raise storage_error(exc, f"scratch ({tmp.name})") from exc
            finally:
                sink.sha.close()
                os.close(fd)
            sha256 = sink.sha.hexdigest()
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

        location = destination.stream(produce, size_hint=packed_bytes + (64 << 10))
    tracker.finish()
    return ExportResult(
        "ova",
        None,
        sum(sizes),
        int(location["size"]),
        str(location["sha256"]),
        location,
        time.monotonic() - started,
        disks,
    )


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
    ) -> dict[str, Any]:
        """Write ``source`` as ``disk_format`` to ``s3://bucket/key`` with ``metadata`` (plus
        ``sha256``); returns ``{bucket, key, etag, sha256, size, parts, format, seconds}``."""
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
            result = export_disk(
                source,
                disk_format,
                dest,
                config=self.config,
                workdir=workdir,
                on_progress=on_progress,
                cancel=cancel,
                ledger=ledger,
            )
        except BaseException:
            self.remove(bucket, key)  # the upload aborted itself; a completed object goes too
            raise
        location = {k: v for k, v in result.location.items() if k != "type"}
        return location | {"format": result.format, "seconds": round(result.seconds, 3)}

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
    ) -> dict[str, Any]:
        """The disks ``sources`` (boot disk first) as one OVA of VM ``name`` (:func:`export_ova`: the
        VMDKs in ``workdir``, then the tar streamed) to ``s3://bucket/key``; returns
        ``{bucket, key, etag, sha256, size, parts, format: "ova", seconds, disks, firmware}``."""
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
            result = export_ova(
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
            )
        except BaseException:
            self.remove(bucket, key)
            raise
        location = {k: v for k, v in result.location.items() if k != "type"}
        return location | {
            "format": "ova",
            "seconds": round(result.seconds, 3),
            "disks": result.disks,
            "firmware": firmware,
        }

    def remove(self, bucket: str, key: str) -> None:
        """Delete the object and abort every incomplete multipart upload of its key (gone already: fine)."""
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
            listing = self.client.list_multipart_uploads(Bucket=bucket, Prefix=key)
            for upload in listing.get("Uploads", []):
                if upload["Key"] == key:
                    self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code == "NoSuchBucket":
                return
            raise TargetError(
                f"removing s3://{bucket}/{key} failed: {code or type(exc).__name__}", "TargetDeleteFailed"
            ) from exc
