"""The output of a conversion (:mod:`appliance.image.convert`): where it may go, and what it must be
before it is published.

Before: a file target's directory must exist and the name must not be a directory or anything but a
regular file; a block device takes raw output only, must not be claimed (mounted: ``O_EXCL`` fails) and
must hold the virtual size. After: the output is flushed once (qemu-img never flushes) and re-inspected:
a file as :func:`appliance.image.inspect.verify_output` checks it (the requested format, safe, no format
hidden in the guest data), raw content on a block device by its content alone. A rejected output is
``ConversionFailed`` (``UnexpectedFormat`` or ``UnsafeOutput``).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from pathlib import Path

from oslo_utils.imageutils import format_inspector as fi

from ..config import Config
from ..errors import ConversionFailed, Finding, ImageRejected, ImagingError, UsageError
from ..nospace import is_no_space, no_space_error
from .formats import VHD_COOKIE
from .inspect import InspectionResult, require_safe, verify_output


def is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def check_file_target(dst: Path) -> None:
    if not dst.parent.is_dir():
        raise UsageError(f"output directory {dst.parent} does not exist")
    if dst.is_dir():
        raise UsageError(f"output {dst} is a directory; give a file name")
    if dst.exists() and not dst.is_file():
        raise UsageError(f"output {dst} exists and is neither a regular file nor a block device")


def check_device_target(dst: Path, fmt: str) -> None:
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


def check_device_size(dst: Path, needed: int) -> None:
    fd = os.open(dst, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size < needed:
        raise UsageError(f"block device {dst} holds {size} bytes, the image needs {needed}")


def flush(path: Path, no_space: Callable[[Path, str], ImagingError] = no_space_error) -> None:
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


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: Path, fmt: str, config: Config, *, block_device: bool) -> InspectionResult:
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


def with_path(result: InspectionResult, path: Path) -> InspectionResult:
    # The output was inspected under its temporary name; report the name it now has.
    return dataclasses.replace(result, path=path, source=path)
