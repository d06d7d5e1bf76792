"""The VHD path of an export: a regular file streamed by the project's writer
(:mod:`appliance.image.vhdwriter`: dynamic, or fixed as the disk's bytes and a footer); a block device,
which has no data map to find its empty blocks by, by ``qemu-img convert -f raw -O vpc -o
subformat=…,force_size=on``, confined like every qemu-img run, into a partial file, re-inspected, given
the specification's disk geometry (qemu-img writes the largest for any size), then digested (to a file) or
streamed (to S3)."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import confine, partials
from ..config import Config
from ..errors import Cancelled, ConversionFailed, ImageRejected
from ..image import qemuimg
from ..image.convertcmd import build_command
from ..image.convertrun import run_convert
from ..image.decoding import SECTOR
from ..image.inspect import require_safe, verify_output
from ..image.vhdwriter import FIXED, footer, has_data_map, set_geometry, write_dynamic_vhd
from ..image.vmdkwriter import ByteSink
from ..progress import ProgressTracker
from .chunkdigest import digest_file
from .exportdest import FileDestination, S3Destination
from .exportraw import CHUNK, file_producer, raw_producer


def streams_vhd(fd: int, size: int) -> bool:
    """Whether a VHD export of the disk open as ``fd`` streams through the project's writer
    (:mod:`appliance.image.vhdwriter`: a regular file of whole sectors, whose data map decides the
    allocated blocks) rather than through qemu-img into scratch (a block device: no data map)."""
    return has_data_map(fd) and size > 0 and size % SECTOR == 0


def vhd_size_hint(size: int) -> int:
    return size + size // 4096 + (1 << 20)


def vhd_producer(
    fd: int,
    size: int,
    subformat: str,
    tracker: ProgressTracker,
    cancel: threading.Event | None,
    on_read: Callable[[int, bytes | bytearray | memoryview], object] | None = None,
    *,
    direct: int | None = None,
) -> Callable[[ByteSink], None]:
    if subformat == "fixed":  # the disk's bytes (holes stay holes in a file), then the footer
        raw = raw_producer(fd, size, tracker, cancel, on_read, direct=direct)

        def fixed(sink: ByteSink) -> None:
            raw(sink)
            sink.write(footer(size, FIXED))

        return fixed

    def dynamic(sink: ByteSink) -> None:
        write_dynamic_vhd(
            fd, size, sink, on_progress=tracker.update, cancel=cancel, on_read=on_read, direct=direct
        )

    return dynamic


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
            run_convert(argv, policy, cwd, tracker, size, cancel, out)
    else:
        with qemuimg.isolated(source, parent=workdir) as linked:
            argv = build_command(linked, "raw", out.absolute(), "vhd", subformat, qemu_img=qemuimg.qemu_img())
            run_convert(argv, policy, linked.parent, tracker, size, cancel, out)
    try:
        require_safe(verify_output(out, "vhd", config=config))
    except ImageRejected as exc:
        raise ConversionFailed(
            f"the VHD qemu-img wrote does not re-inspect as VHD: {exc}", code="ConversionFailed.UnsafeOutput"
        ) from exc
    set_geometry(out, size)  # the specification's, as the project's own writer writes it
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def export_vhd_qemu(
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
        return destination.stream(file_producer(tmp, cancel), size_hint=tmp.stat().st_size, full_sha256=full)


def _hash(path: Path, cancel: threading.Event | None) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            if cancel is not None and cancel.is_set():
                raise Cancelled("export cancelled")
            h.update(chunk)
    return h.hexdigest()
