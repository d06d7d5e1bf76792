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
it is ``InsufficientScratch`` (:func:`appliance.scratch.no_space_error`), or what the caller's
``no_space`` makes of it when ``dst`` is not in scratch (a volume: ``InsufficientStorage``).

How qemu-img writes the output (its ``-t`` cache mode) follows one rule, :func:`use_direct_io`:

* a **block device** is written with O_DIRECT (``-t none``): nothing in this process reads the volume
  back through the page cache, a device may be far larger than memory, and a volume handed to a
  guest must not depend on dirty pages of ours;
* a **file** that the page cache can absorb (its virtual size, an upper bound of what qemu-img writes,
  is at most :data:`PAGE_CACHE_SHARE` of the memory available) is written through the page cache
  (qemu-img's default, ``cache=unsafe``) and flushed once, with ``fdatasync``, before the output check
  and the rename. This is what bare ``qemu-img convert`` does, and on the 4 GiB benchmark disk
  (qcow2 → raw, page cache dropped, flush included) it is faster than O_DIRECT: 1.78 s against
  2.09 s with ``-t none`` (issue 9), medians 3.26 s against 3.73 s on a loaded machine
  (bench/README.md). qemu-img issues its writes asynchronously into the cache and the flush
  writes them out in large sorted batches, and the next reader of the file (the output check, an
  upload, the guest probe) finds it cached;
* a **larger file** is written with O_DIRECT where qemu-img writes big blocks (:data:`DIRECT_IO_FORMATS`,
  not from :data:`BUFFERED_INPUTS`) and the filesystem supports it, so one conversion does not evict
  the page cache every other task works from and does not stall in dirty-page throttling; the other
  conversions stay buffered (their small compressed or grain-sized writes measured 7-60 % slower
  with O_DIRECT).

The output check (step 3) reads back what matters: for raw output its content (a format hidden in
the guest data, found without qemu-img: ``qemu-img info -f raw`` could only echo the size); for a
container format also ``qemu-img info`` and ``check`` of the metadata qemu-img wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import select
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oslo_utils.imageutils import format_inspector as fi

from .. import confine, partials
from ..config import Config
from ..errors import Cancelled, ConversionFailed, Finding, ImageRejected, ImagingError, UsageError
from ..progress import Progress, ProgressTracker
from ..scratch import NO_SPACE_MESSAGES, is_no_space, no_space_error
from . import qemuimg
from .formats import VHD_COOKIE, check_output_format, to_qemu
from .inspect import InspectionResult, check_image, inspect_image, require_safe, verify_output

log = logging.getLogger(__name__)

#: subformats accepted per output format; the first is the default
SUBFORMATS: dict[str, tuple[str, ...]] = {
    "vmdk": ("streamOptimized",),
    "vhd": ("dynamic", "fixed"),
}
#: output formats that a file larger than the page cache should absorb gets with ``-t none``
#: (O_DIRECT): qemu-img writes them in big blocks. vhd and stream-optimized vmdk output are written
#: in small (compressed) pieces, which measured 40-60 % slower with O_DIRECT (qemu-img 7.2, 4 GiB
#: qcow2 holding 1.5 GiB: vhd 2.7 → 3.8 s, stream-optimized vmdk 37 → 58 s).
DIRECT_IO_FORMATS = frozenset({"raw", "qcow2", "vhdx"})
#: input formats (qemu names) whose conversions keep the page cache whatever the output: VMDK is
#: read grain by grain (64 KiB), and synchronous O_DIRECT writes of that size measured 7-30 %
#: slower than buffered ones (stream-optimized 7.0-8.8 s → 7.9-9.4 s, monolithicSparse 4.9-5.5 s →
#: 5.8-6.4 s, 4 GiB → raw).
BUFFERED_INPUTS = frozenset({"vmdk"})
#: the share of the memory available (``MemAvailable``) that one buffered output may fill; with the
#: default two tasks at once, two outputs together still leave the other tasks' files cached
PAGE_CACHE_SHARE = 0.5
#: seconds between SIGTERM and SIGKILL when stopping qemu-img
TERM_GRACE = 1.0
#: how much of qemu-img's stderr is kept for the error message
STDERR_KEEP = 4000

_PERCENT = re.compile(rb"\(\s*(\d+(?:\.\d+)?)/100%\)")


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
) -> ConversionResult:
    """Convert ``src`` (claimed format ``claimed``, e.g. ``qcow2`` or ``raw.gz``) to ``to_format`` at ``dst``.

    ``workdir`` receives intermediates (the decompressed source, the isolation directory) and
    must be on a filesystem with room for them. ``dst`` is a file path (created or replaced
    atomically) or an existing block device (raw output only; written in place). ``ledger``
    (a step's context) is told the partial output's name before it is created, and when it is gone;
    ``reserve`` is the decompressor's scratch reservation (see :func:`appliance.image.decompress.decompress`).
    ``no_space(directory, doing)`` is the error raised when ``dst``'s filesystem fills up (by default
    ``InsufficientScratch``: ``dst`` is in scratch; a target that is not passes its own).

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
    subformat = _check_subformat(fmt, subformat)
    src = Path(src).absolute()
    dst = Path(dst).absolute()
    workdir = Path(workdir).absolute()
    block_device = _is_block_device(dst)
    if block_device:
        _check_device_target(dst, fmt)
    else:
        _check_file_target(dst)
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
        tracker = ProgressTracker("converting", virtual_size, on_progress)
        job = _Job(source, fmt, subformat, config, workdir, qemu_img, tracker, virtual_size, cancel, no_space)
        if block_device:
            _check_device_size(dst, virtual_size)
            argv, output = job.run(dst, block_device=True)
        else:
            try:
                with partials.partial_file(dst, ledger) as tmp:
                    argv, output = job.run(tmp, block_device=False)
                    partials.publish(tmp, dst)
                    _fsync_dir(dst.parent)
            except OSError as exc:
                if is_no_space(exc):
                    raise no_space(dst.parent, f"writing {dst.name}") from exc
                raise
            output = _with_path(output, dst)
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
        if direct and not block_device and not _supports_direct_io(out_path):
            direct = False  # e.g. tmpfs before Linux 6.6: qemu-img could not open its output
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
                    qemu_img=self.qemu_img,
                )
                policy = confine.qemu_img_convert(self.config.limits, self.virtual_size)
                _run_convert(
                    argv,
                    policy,
                    linked.parent,
                    self.tracker,
                    self.virtual_size,
                    _AnySet(self.cancel, source_check.rejected),
                    out_path,
                    self.no_space,
                )
        except BaseException:
            source_check.join()
            source_check.raise_if_rejected()  # a rejected source explains the failure (or the stop)
            raise
        source_check.join()
        source_check.raise_if_rejected()
        _flush(out_path, self.no_space)
        _raise_if_cancelled(self.cancel)
        return argv, _verify(out_path, self.fmt, self.config, block_device=block_device)


class _AnySet:
    """Set when any of the events is: stops qemu-img on a cancel or a rejected source alike."""

    def __init__(self, *events: threading.Event | None) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


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


def build_command(
    src: Path,
    src_qemu_format: str,
    dst: Path,
    to_format: str,
    subformat: str | None,
    *,
    block_device: bool = False,
    direct_io: bool = False,
    qemu_img: str = qemuimg.QEMU_IMG,
) -> list[str]:
    """The ``qemu-img convert`` argv for one conversion.

    ``direct_io`` writes the output with ``-t none`` (O_DIRECT), as :func:`use_direct_io` decides;
    otherwise qemu-img's default (the page cache, flushed by the caller). A block device is always
    written with O_DIRECT.

    Paths must be absolute: qemu-img reads ``proto:...`` and ``json:{...}`` in a filename as a
    protocol, unless a ``/`` comes first.
    """
    if not (src.is_absolute() and dst.is_absolute()):
        raise ValueError("qemu-img paths must be absolute")
    argv = [qemu_img, "convert", "-p", "-f", src_qemu_format, "-O", to_qemu(to_format)]
    if block_device:
        # the device exists: qemu-img must write into it, not try to create it
        argv.append("-n")
    if block_device or direct_io:
        argv += ["-t", "none"]
    options = _output_options(to_format, subformat)
    if options:
        argv += ["-o", ",".join(options)]
    argv += [str(src), str(dst)]
    return argv


def use_direct_io(
    to_format: str, src_qemu_format: str, *, block_device: bool, output_bytes: int, page_cache_bytes: int
) -> bool:
    """Whether qemu-img writes the output with O_DIRECT: the rule of the module docstring.

    ``output_bytes`` bounds what the output may hold (the virtual size); ``page_cache_bytes`` is what
    the page cache should absorb (:func:`page_cache_bytes`).
    """
    if block_device:
        return True
    if output_bytes <= page_cache_bytes:
        return False
    return to_format in DIRECT_IO_FORMATS and src_qemu_format not in BUFFERED_INPUTS


def page_cache_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """:data:`PAGE_CACHE_SHARE` of the memory available now (0 when the kernel does not say)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * PAGE_CACHE_SHARE)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _output_options(fmt: str, subformat: str | None) -> list[str]:
    if fmt == "vmdk":
        return ["subformat=streamOptimized"]
    if fmt == "vhd":
        # force_size: keep the exact virtual size instead of rounding it to a CHS geometry
        return [f"subformat={subformat or 'dynamic'}", "force_size=on"]
    return []


def _check_subformat(fmt: str, subformat: str | None) -> str | None:
    allowed = SUBFORMATS.get(fmt, ())
    if subformat is None:
        return allowed[0] if allowed else None
    if subformat not in allowed:
        choices = ", ".join(allowed) if allowed else "none"
        raise UsageError(f"subformat {subformat!r} is not available for {fmt} output (choices: {choices})")
    return subformat


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _check_file_target(dst: Path) -> None:
    if not dst.parent.is_dir():
        raise UsageError(f"output directory {dst.parent} does not exist")
    if dst.is_dir():
        raise UsageError(f"output {dst} is a directory; give a file name")
    if dst.exists() and not dst.is_file():
        raise UsageError(f"output {dst} exists and is neither a regular file nor a block device")


def _check_device_target(dst: Path, fmt: str) -> None:
    if fmt != "raw":
        # Measured with qemu-img 7.2 on a loop device: vmdk, vhdx and fixed vhd fail ("Cannot
        # grow device files", "Could not write to allocated cluster"); only raw is reliable.
        raise UsageError(f"block device {dst} can only receive raw output, not {fmt}")
    try:
        # O_EXCL on a block device fails with EBUSY while it is mounted or otherwise claimed.
        fd = os.open(dst, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        raise UsageError(f"cannot write to block device {dst}: {exc.strerror} (is it mounted?)") from exc
    os.close(fd)


def _check_device_size(dst: Path, needed: int) -> None:
    fd = os.open(dst, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size < needed:
        raise UsageError(f"block device {dst} holds {size} bytes, the image needs {needed}")


def _raise_if_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("conversion cancelled")


def _supports_direct_io(path: Path) -> bool:
    """Whether ``path``'s filesystem accepts O_DIRECT.

    tmpfs before Linux 6.6 and some FUSE filesystems refuse it with EINVAL, and qemu-img would
    then fail to open its output.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def _run_convert(
    argv: list[str],
    policy: confine.Policy,
    cwd: Path,
    tracker: ProgressTracker,
    virtual_size: int,
    cancel: threading.Event | _AnySet | None,
    out_path: Path,
    no_space: Callable[[Path, str], ImagingError] = no_space_error,
) -> None:
    """Run qemu-img convert confined by ``policy``, feeding its ``-p`` output to ``tracker``; stop it
    on cancel. A limit that stops it rejects the image (``UnsafeImage.ResourceLimit``).

    A failure because ``out_path``'s filesystem is full is ``no_space``'s error.
    """
    log.debug("running %s", " ".join(argv))
    # own process group: Ctrl-C does not reach it, killpg does
    proc = confine.spawn(argv, policy, cwd=cwd, new_session=True)
    stderr = bytearray()
    readers = [
        threading.Thread(target=_read_progress, args=(proc.stdout, tracker, virtual_size), daemon=True),
        threading.Thread(target=_read_tail, args=(proc.stderr, stderr), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        rc = _wait(proc, cancel)
    except BaseException:
        stop_process_group(proc)
        raise
    finally:
        for t in readers:
            t.join(timeout=5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    text = bytes(stderr).decode("utf-8", "replace")
    killed = qemuimg.limit_finding(confine.Completed(rc, "", text), policy)
    if killed is not None:
        raise ImageRejected([killed])
    if rc != 0:
        message = text.strip() or f"exit status {rc}"
        if rc < 0:
            message = f"killed by signal {-rc}: {message}"
        elif any(marker in message for marker in NO_SPACE_MESSAGES):
            raise no_space(out_path.parent, f"qemu-img convert was writing ({message})")
        raise ConversionFailed(f"qemu-img convert failed: {message}", code="ConversionFailed.QemuImg")
    if stderr:
        log.warning("qemu-img convert: %s", bytes(stderr).decode("utf-8", "replace").strip())


def _wait(proc: subprocess.Popen[bytes], cancel: threading.Event | _AnySet | None, poll: float = 0.1) -> int:
    """Wait for ``proc`` to exit, checking ``cancel`` every ``poll`` seconds; raise Cancelled when set.

    Waits on a pidfd where the kernel has them: ``Popen.wait(timeout)`` sleeps in steps of up to
    50 ms and so notices the exit up to 50 ms late, a cost on every short conversion.
    """
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            if pidfd is not None:
                ready, _, _ = select.select([pidfd], [], [], poll)
                if ready:
                    return proc.wait()
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(timeout=poll)
            if cancel is not None and cancel.is_set():
                raise Cancelled("conversion cancelled")
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read_progress(pipe: Any, tracker: ProgressTracker, virtual_size: int) -> None:
    # qemu-img rewrites one line with "\r    (12.34/100%)"; a chunk may hold several or half
    # of one, so keep the tail after the last separator for the next read.
    pending = b""
    fd = pipe.fileno()
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        pending += chunk
        *complete, pending = re.split(rb"[\r\n]", pending)
        for piece in complete:
            match = _PERCENT.search(piece)
            if match:
                tracker.update(int(float(match.group(1)) / 100.0 * virtual_size))


def _read_tail(pipe: Any, sink: bytearray) -> None:
    fd = pipe.fileno()
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        sink += chunk
        if len(sink) > STDERR_KEEP:
            del sink[: len(sink) - STDERR_KEEP]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = TERM_GRACE) -> None:
    """Stop ``proc`` and everything in its process group: SIGTERM, then SIGKILL after ``grace``.

    ``proc`` must have been started with ``start_new_session=True`` (its pid is the group id).
    Returns once the leader is reaped and the group is empty (or after a further second).
    """
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or its zombie keeps the group alive
        if proc.returncode is not None and not _group_alive(pgid):
            return
        time.sleep(0.02)
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 1.0
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _flush(path: Path, no_space: Callable[[Path, str], ImagingError] = no_space_error) -> None:
    """Flush the output's data, once: qemu-img writes with cache=unsafe and never flushes.
    ``fdatasync`` writes the data and what is needed to read it back (size, block map); the name is
    made durable by the directory's fsync after the rename. A filesystem that finds no room for
    what it had cached (ENOSPC at the flush) is ``no_space``'s error."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space(path.parent, f"flushing {path.name}") from exc
        raise ConversionFailed(
            f"could not flush {path} to disk: {exc.strerror}", code="ConversionFailed.Flush"
        ) from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verify(path: Path, fmt: str, config: Config, *, block_device: bool) -> InspectionResult:
    """Re-inspect the output; a wrong format or a hidden nested format fails the conversion."""
    result = _verify_device(path) if block_device else verify_output(path, fmt, config=config)
    try:
        require_safe(result)
    except ImageRejected as exc:
        codes = ", ".join(f.code for f in result.errors)
        # inspect gives "ConversionFailed.UnexpectedFormat" for a format hidden in the output;
        # any other rejection (corrupt metadata, a policy violation) is an unsafe output.
        code = exc.code if exc.code.startswith("ConversionFailed.") else "ConversionFailed.UnsafeOutput"
        raise ConversionFailed(
            f"the output did not re-inspect as a safe {fmt} image ({codes}): {exc.message}", code=code
        ) from exc
    return result


#: what raw content written to a device may be detected as: plain data, a partition table, an ISO
_RAW_CONTENT = frozenset({"raw", "gpt", "iso"})


def _verify_device(path: Path) -> InspectionResult:
    """The content check of :func:`verify_output` for raw output on a block device.

    verify_output only takes regular files; the check that matters for raw output is that its
    content is not another format (a qcow2 or vmdk header written to the device by a guest that
    carried one would be probed as that format by a later reader), which this repeats.
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        # a fixed VHD is only a footer at the end, which the content inspectors do not look at
        f.seek(max(0, size - 512))
        vhd_footer = size >= 512 and f.read(len(VHD_COOKIE)) == VHD_COOKIE
        f.seek(0)
        wrapper = fi.InspectWrapper(f)
        try:
            while f.tell() < size and wrapper.read(64 * 1024):
                if wrapper.formats is not None:
                    break
        finally:
            wrapper.close()  # closes f too
    names = sorted(str(i) for i in wrapper.formats or []) + (["vhd"] if vhd_footer else [])
    result = InspectionResult(path=path, source=path, format="raw", qemu_format="raw", virtual_size=size)
    result.details["detected_formats"] = names
    if not set(names) <= _RAW_CONTENT:
        result.add(
            Finding.error(
                "ConversionFailed.UnexpectedFormat",
                f"the raw output on {path} is detected as {', '.join(names)}; the device content must not be "
                "used (a format hidden inside another is unsafe)",
            )
        )
    return result


def _with_path(result: InspectionResult, path: Path) -> InspectionResult:
    # The output was inspected under its temporary name; report the name it now has.
    return dataclasses.replace(result, path=path, source=path)
