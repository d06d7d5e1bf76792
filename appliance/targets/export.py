"""Export writers: "write this source disk as format F to S3 key K, report progress, abort cleanly".

:class:`ExportWriter` is the interface the export step (:mod:`appliance.steps.export`) writes
through; :func:`get_export_writer` picks the implementation: the streaming writer
(:class:`appliance.targets.exportwriter.StreamingExportWriter`). A VMDK (streamOptimized, grains
deflated in a thread pool) or RAW export streams straight from the source disk into a parallel
multipart upload (verified ETags, each part's SHA-256 checked by S3, the object's chunked
SHA-256 digest = S3's composite checksum: :mod:`appliance.targets.chunkdigest`) with no scratch
copy; so does a VHD of a regular file (:mod:`appliance.image.vhdwriter`), while a VHD of a block
device goes through ``qemu-img convert -O vpc`` into scratch first (:data:`SCRATCH_FORMATS`). Part size and
upload threads are those of the user's buckets, ``sources.s3.part_size`` / ``threads``.

:meth:`ExportWriter.remove` deletes the object and aborts every incomplete multipart upload of its
key: what a cancelled or failed export, or the undo of a finished one, leaves behind is nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import Config, parse_size
from ..errors import ConfigError
from ..partials import Ledger
from ..progress import ProgressCallback
from .exportcheck import SourceCheck
from .exportwriter import StreamingExportWriter
from .s3parts import MIN_PART

#: the disk formats whose export needs a scratch copy of the output (qemu-img writes the VHD there
#: before it is uploaded); VMDK and RAW stream with no scratch at all
SCRATCH_FORMATS = ("vhd",)


def scratch_needed(disk_format: str, size: int, *, streams: bool = False) -> int:
    """Bytes of scratch the export of a ``size``-byte disk as ``disk_format`` writes: a VHD that goes
    through qemu-img stays within the disk's size plus its metadata (BAT, bitmaps, footer); nothing for
    VMDK/RAW, nor for a VHD that ``streams`` (:func:`appliance.targets.exportvhd.streams_vhd`: a
    regular file, written by the project's VHD writer)."""
    if disk_format.lower() in SCRATCH_FORMATS and not streams:
        return size + size // 64 + (1 << 20)
    return 0


@runtime_checkable
class ExportWriter(Protocol):
    """Writes one source disk as an exported object."""

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
        ledger: Ledger | None = None,
        source_check: SourceCheck | None = None,
    ) -> dict[str, Any]:
        """Write the RAW disk ``source`` (a file or a block device) as ``disk_format`` (``vmdk``,
        ``vhd``, ``raw``) to ``s3://bucket/key`` with user ``metadata`` (plus the digests); returns
        ``{bucket, key, etag, sha256, digest, size, format, …}`` (``sha256`` None where the whole-object
        digest was not computed, ``digest`` the chunked SHA-256). Intermediates go to ``workdir``
        (announced to ``ledger``) and are gone when this returns or raises. On any failure or
        ``cancel`` nothing is left in the bucket: no object, no incomplete multipart upload.
        ``fence`` is called right before the object is published. ``source_check`` sees the source as
        it is read for the export and is verified before the object is completed (no second read)."""
        ...

    def remove(self, bucket: str, key: str) -> None:
        """Delete ``s3://bucket/key`` and abort incomplete multipart uploads of that key."""
        ...


def ova_scratch_needed(size: int) -> int:
    """Bytes of scratch an OVA export of a ``size``-byte disk writes: its streamOptimized VMDK (at
    most the disk's size plus grain markers and tables) before the tar is streamed."""
    return size + size // 64 + (1 << 20)


def get_export_writer(config: Config) -> StreamingExportWriter:
    """The export writer of this appliance: the streaming writer, with the part size and upload
    threads of ``sources.s3`` (defaults 64 MiB, 4)."""
    settings = config.sources.s3
    part_size = parse_size(settings.get("part_size", "64MiB"))
    if part_size < MIN_PART:
        raise ConfigError(f"sources.s3.part_size: {part_size} is below S3's minimum of 5 MiB")
    return StreamingExportWriter(config, part_size=part_size, threads=int(settings.get("threads", 4)))
