"""Safe disk-image conversion with qemu-img: inspect, convert, flush, re-inspect, publish.

The sequence mirrors Nova's ``fetch_to_raw`` and Glance's ``image_conversion`` plugin
with the holes those leave closed:

1. The source is fully inspected and must be safe; a rejected source never creates anything at
   ``dst``. Its last stage, ``qemu-img check``, runs beside the conversion for a file output (which
   stays a partial until the check has passed, and is stopped as soon as it fails) and before it for
   a block device.
2. ``qemu-img convert`` always gets ``-f`` (never probes), runs confined like every parser of
   untrusted bytes (:mod:`appliance.confine`: CPU and address-space limits scaled to the virtual
   size, no network, no inherited descriptors, a parent-death signal) on a link of the source inside
   an empty private directory (relative names resolve to nothing), in its own process group so a
   cancel or Ctrl-C can stop it and anything it started.
3. A file target is written under a hidden partial name in ``dst``'s directory (mode 0600, announced
   to the caller's ledger before it exists: :mod:`appliance.partials`) and renamed into place only
   after it is flushed to disk (qemu-img never fsyncs) and re-inspected: it must be the requested
   format and safe, which catches a format hidden inside the guest data ("a vmdk embedded in a
   raw"). Partial or rejected output never appears under the final name. A ``dst`` that is
   replaced keeps its mode; a new one gets the umask's.
4. A block-device target (raw only) is written in place with ``-n -t none`` and flushed.

A filesystem that fills up under qemu-img (or under the decompressor) is not a conversion failure:
it is ``InsufficientScratch`` (:func:`appliance.nospace.no_space_error`), or what the caller's
``no_space`` makes of it when ``dst`` is not in scratch (a volume: ``InsufficientStorage``).

How qemu-img writes the output (its ``-t`` cache mode) follows one rule,
:func:`~appliance.image.convertcmd.use_direct_io`: a block device with O_DIRECT; a file the page cache
can absorb through the page cache, flushed once; a larger file with O_DIRECT where qemu-img writes big
blocks (:mod:`appliance.image.convertcmd` says why, with the measurements).

The output check (step 3) reads back what matters: for raw output its content (a format hidden in
the guest data, found without qemu-img: ``qemu-img info -f raw`` could only echo the size); for a
container format also ``qemu-img info`` and ``check`` of the metadata qemu-img wrote.

The pieces: :mod:`~appliance.image.convertcmd` (the command and its cache-mode rule),
:mod:`~appliance.image.convertrun` (running qemu-img: progress, cancel, stopping its process group),
:mod:`~appliance.image.convertout` (the output target's checks, the flush, the re-inspection); this
module holds the sequence. Their public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import confine, pagecache, partials
from ..config import Config
from ..errors import Cancelled, ImagingError
from ..nospace import is_no_space, no_space_error
from ..progress import Progress, ProgressTracker
from . import qemuimg
from .convertcmd import (
    BUFFERED_INPUTS,
    DIRECT_IO_FORMATS,
    PAGE_CACHE_SHARE,
    SUBFORMATS,
    build_command,
    check_subformat,
    page_cache_bytes,
    supports_direct_io,
    use_direct_input,
    use_direct_io,
)
from .convertout import (
    check_device_size,
    check_device_target,
    check_file_target,
    flush,
    fsync_dir,
    is_block_device,
    verify,
    with_path,
)
from .convertrun import STDERR_KEEP, TERM_GRACE, AnySet, run_convert, stop_process_group
from .formats import check_output_format
from .inspect import InspectionResult, check_image, inspect_image, require_safe

__all__ = [
    "BUFFERED_INPUTS",
    "DIRECT_IO_FORMATS",
    "PAGE_CACHE_SHARE",
    "STDERR_KEEP",
    "SUBFORMATS",
    "TERM_GRACE",
    "ConversionResult",
    "build_command",
    "convert_image",
    "page_cache_bytes",
    "run_convert",
    "stop_process_group",
    "use_direct_io",
]


@dataclass(frozen=True)
class ConversionResult:
    """What a successful :func:`convert_image` produced.

    ``source`` is the inspection of the input (for a compressed input its ``path`` names the
    decompressed copy, which has been removed again); ``output`` the re-inspection of ``dst``.
    ``bytes_written`` is the space the output occupies (allocated blocks of a sparse file; the
    virtual size for a block device, where qemu-img writes or zeroes every byte).
    """

    source: InspectionResult
    output: InspectionResult
    dst: Path
    format: str
    subformat: str | None
    block_device: bool
    virtual_size: int
    bytes_written: int
    seconds: float
    command: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "dst": str(self.dst),
            "format": self.format,
            "subformat": self.subformat,
            "block_device": self.block_device,
            "virtual_size": self.virtual_size,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "command": self.command,
            "source": self.source.to_dict(),
            "output": self.output.to_dict(),
        }


def convert_image(
    src: Path,
    dst: Path,
    to_format: str,
    claimed: str | None = None,
    *,
    config: Config,
    workdir: Path,
    subformat: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
    ledger: partials.Ledger | None = None,
    reserve: Callable[[int, bool], None] | None = None,
    no_space: Callable[[Path, str], ImagingError] = no_space_error,
    clock: Callable[[], float] = time.monotonic,
) -> ConversionResult:
    """Convert ``src`` (claimed format ``claimed``, e.g. ``qcow2`` or ``raw.gz``) to ``to_format`` at ``dst``.

    ``workdir`` receives intermediates (the decompressed source, the isolation directory) and
    must be on a filesystem with room for them. ``dst`` is a file path (created or replaced
    atomically) or an existing block device (raw output only; written in place). ``ledger``
    (a step's context) is told the partial output's name before it is created, and when it is gone;
    ``reserve`` is the decompressor's scratch reservation (see :func:`appliance.image.decompress.decompress`).
    ``no_space(directory, doing)`` is the error raised when ``dst``'s filesystem fills up (by default
    ``InsufficientScratch``: ``dst`` is in scratch; a target that is not passes its own). ``clock`` is
    the one ``on_progress`` is throttled and its rate measured on
    (:class:`~appliance.progress.ProgressTracker`).

    Raises :class:`ImageRejected` if the source is unsafe or not what was claimed,
    :class:`ConversionFailed` if qemu-img fails or its output does not re-inspect as a safe
    ``to_format`` image, :class:`InsufficientScratch` when scratch fills up (``no_space``'s error when
    ``dst``'s filesystem does), :class:`Cancelled`
    when ``cancel`` is set, :class:`UsageError` for a bad format, subformat or target. On every
    failure, cancel and ``KeyboardInterrupt`` the partial output is removed (a block device is left
    as qemu-img left it) and no temporary file remains next to ``dst``.
    """
    started = time.monotonic()
    fmt = check_output_format(to_format)
    subformat = check_subformat(fmt, subformat)
    src = Path(src).absolute()
    dst = Path(dst).absolute()
    workdir = Path(workdir).absolute()
    block_device = is_block_device(dst)
    if block_device:
        check_device_target(dst, fmt)
    else:
        check_file_target(dst)
    qemu_img = qemuimg.qemu_img()
    _raise_if_cancelled(cancel)

    source = inspect_image(
        src,
        claimed,
        config=config,
        workdir=workdir,
        reserve=reserve,
        cancel=cancel,
        ledger=ledger,
        run_check=False,  # qemu-img check runs beside the conversion (_Job.run)
    )
    # A compressed source was decompressed into workdir; that copy is ours to remove.
    intermediate = source.path if source.path != src else None
    try:
        require_safe(source)
        virtual_size = source.virtual_size or 0
        _raise_if_cancelled(cancel)
        tracker = ProgressTracker("converting", virtual_size, on_progress, clock=clock)
        job = _Job(source, fmt, subformat, config, workdir, qemu_img, tracker, virtual_size, cancel, no_space)
        if block_device:
            check_device_size(dst, virtual_size)
            argv, output = job.run(dst, block_device=True)
        else:
            try:
                with partials.partial_file(dst, ledger) as tmp:
                    argv, output = job.run(tmp, block_device=False)
                    partials.publish(tmp, dst)
                    fsync_dir(dst.parent)
            except OSError as exc:
                if is_no_space(exc):
                    raise no_space(dst.parent, f"writing {dst.name}") from exc
                raise
            output = with_path(output, dst)
        tracker.finish()
    finally:
        if intermediate is not None:
            intermediate.unlink(missing_ok=True)

    return ConversionResult(
        source=source,
        output=output,
        dst=dst,
        format=fmt,
        subformat=subformat,
        block_device=block_device,
        virtual_size=virtual_size,
        bytes_written=virtual_size if block_device else os.stat(dst).st_blocks * 512,
        seconds=time.monotonic() - started,
        command=argv,
    )


@dataclass
class _Job:
    """One conversion of an inspected, safe source: run qemu-img into a path, flush, re-inspect."""

    source: InspectionResult
    fmt: str
    subformat: str | None
    config: Config
    workdir: Path
    qemu_img: str
    tracker: ProgressTracker
    virtual_size: int
    cancel: threading.Event | None
    #: the error of a full filesystem under the output
    no_space: Callable[[Path, str], ImagingError]

    def run(self, out_path: Path, *, block_device: bool) -> tuple[list[str], InspectionResult]:
        src_format = self.source.qemu_format or ""
        direct = use_direct_io(
            self.fmt,
            src_format,
            block_device=block_device,
            output_bytes=self.virtual_size,
            page_cache_bytes=page_cache_bytes(),
        )
        if direct and not block_device and not supports_direct_io(out_path):
            direct = False  # e.g. tmpfs before Linux 6.6: qemu-img could not open its output
        direct_input = use_direct_input(src_format, self.source.path)
        buffered = not (block_device or direct)
        source_check = _SourceCheck(self.source, self.config, self.workdir, self.cancel)
        if block_device:
            # nothing is written onto a device before the source has passed every check
            source_check.run()
            source_check.raise_if_rejected()
        else:
            # a file output stays a partial until the check has passed: run it beside the conversion
            source_check.start()
        try:
            with qemuimg.isolated(self.source.path, parent=self.workdir) as linked:
                argv = build_command(
                    linked,
                    src_format,
                    out_path,
                    self.fmt,
                    self.subformat,
                    block_device=block_device,
                    direct_io=direct,
                    direct_input=direct_input,
                    qemu_img=self.qemu_img,
                )
                policy = confine.qemu_img_convert(self.config.limits, self.virtual_size)
                # a buffered file output leaves the page cache as soon as it is written (pagecache)
                behind = pagecache.DropBehind(out_path) if buffered else contextlib.nullcontext()
                with behind:
                    run_convert(
                        argv,
                        policy,
                        linked.parent,
                        self.tracker,
                        self.virtual_size,
                        AnySet(self.cancel, source_check.rejected),
                        out_path,
                        self.no_space,
                    )
        except BaseException:
            source_check.join()
            source_check.raise_if_rejected()  # a rejected source explains the failure (or the stop)
            raise
        source_check.join()
        source_check.raise_if_rejected()
        flush(out_path, self.no_space)
        if buffered:
            pagecache.drop(out_path)  # flushed, so every page is clean; the check reads only pieces
        _raise_if_cancelled(self.cancel)
        return argv, verify(out_path, self.fmt, self.config, block_device=block_device)


class _SourceCheck:
    """``qemu-img check`` of the inspected source (:func:`appliance.image.inspect.check_image`), run in
    this thread or beside the conversion; ``rejected`` is set as soon as it finds the source unsafe."""

    def __init__(
        self, source: InspectionResult, config: Config, workdir: Path, cancel: threading.Event | None
    ) -> None:
        self.source, self.config, self.workdir, self.cancel = source, config, workdir, cancel
        self.rejected = threading.Event()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            check_image(self.source, config=self.config, workdir=self.workdir, cancel=self.cancel)
        except BaseException as exc:  # Cancelled, or a qemu-img that cannot start: the caller's to raise
            self.error = exc
        if self.error is not None or not self.source.safe:
            self.rejected.set()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="qemu-img-check", daemon=True)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def raise_if_rejected(self) -> None:
        if self.error is not None:
            raise self.error
        require_safe(self.source)


def _raise_if_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("conversion cancelled")
