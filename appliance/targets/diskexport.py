"""The export entry point: a RAW source disk (a stored image, a volume, a block device) written as VMDK,
VHD or RAW to a file or to an S3 object (:func:`export_disk`), with progress, digests and a clean abort.

This is what an export step calls (it knows nothing of the API); the pieces are modules of their own:

* ``vmdk`` — streamOptimized, :mod:`appliance.image.vmdkwriter` (grains deflated in a thread pool,
  streamed straight into the destination);
* ``vhd`` — ``dynamic`` (what AWS exports) or ``fixed``: :mod:`appliance.targets.exportvhd`;
* ``raw`` — the disk's bytes, holes staying holes in a file: :mod:`appliance.targets.exportraw`;
* RAW and VHD read a cold source with O_DIRECT into reused aligned buffers, a cached one through the
  page cache (:func:`appliance.image.readbuf.open_direct`, qemu-img's ``-T none`` rule);
* the destination (a file renamed into place when complete, or a multipart upload), which digests what
  it is given: :mod:`appliance.targets.exportdest`;
* the check of the source against the digest its import recorded: :mod:`appliance.targets.exportcheck`;
* several disks as one OVA: :mod:`appliance.targets.exportova`; the export step's S3 writer interface:
  :mod:`appliance.targets.exportwriter`.

Any failure or cancel leaves nothing: the partial file is removed, the upload aborted (or the completed
object deleted), scratch files removed.

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
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import partials
from ..config import Config
from ..errors import UsageError
from ..image.readbuf import direct_reads
from ..image.vmdkwriter import ADAPTER_TYPES, ByteSink, write_stream_vmdk
from ..progress import ProgressCallback, ProgressTracker
from .exportcheck import SourceCheck, checked_producer, read_whole_source
from .exportdest import FileDestination, S3Destination
from .exportraw import open_source, raw_producer
from .exportvhd import export_vhd_qemu, streams_vhd, vhd_producer, vhd_size_hint

#: what a disk can be exported as
EXPORT_FORMATS = ("vmdk", "vhd", "raw")
VHD_SUBFORMATS = ("dynamic", "fixed")
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
    with contextlib.ExitStack() as stack:
        fd, size = stack.enter_context(open_source(Path(source)))
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
                checked_producer(produce, source_check, size), size_hint=size, full_sha256=full
            )
        elif fmt == "raw":
            direct = stack.enter_context(direct_reads(Path(source)))
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
                    raw_producer(fd, size, tracker, cancel, direct=direct),
                    size_hint=size,
                    full_sha256=full,
                    check_output=by_output,
                )
            else:
                location = destination.stream(
                    checked_producer(
                        raw_producer(fd, size, tracker, cancel, on_read, direct=direct), source_check, size
                    ),
                    size_hint=size,
                    full_sha256=full,
                )
        elif streams_vhd(fd, size):
            direct = stack.enter_context(direct_reads(Path(source)))
            producer = vhd_producer(fd, size, str(subformat), tracker, cancel, on_read, direct=direct)
            location = destination.stream(
                checked_producer(producer, source_check, size),
                size_hint=vhd_size_hint(size),
                full_sha256=full,
            )
        else:
            if source_check is not None:  # qemu-img reads the source: one read of it for the check first
                read_whole_source(fd, size, source_check, cancel)
            location = export_vhd_qemu(
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


def _extent_name(destination: FileDestination | S3Destination) -> str:
    raw = (
        destination.path.name
        if isinstance(destination, FileDestination)
        else destination.key.rsplit("/", 1)[-1]
    )
    clean = "".join(c for c in raw if c.isalnum() or c in "._-")
    return clean or "disk.vmdk"
