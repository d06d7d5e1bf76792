"""The ``qemu-img convert`` command of one conversion (:mod:`appliance.image.convert`): its arguments,
the output options of each format, and how qemu-img writes the output (its ``-t`` cache mode).

The cache mode follows one rule, :func:`use_direct_io`:

* a **block device** is written with O_DIRECT (``-t none``): nothing in this process reads the volume
  back through the page cache, a device may be far larger than memory, and a volume handed to a
  guest must not depend on dirty pages of ours;
* a **file** that the page cache can absorb (its virtual size, an upper bound of what qemu-img writes,
  is at most :data:`PAGE_CACHE_SHARE` of the memory available) is written through the page cache
  (qemu-img's default, ``cache=unsafe``), dropped behind the writer, and flushed once, with
  ``fdatasync``, before the output check and the rename. On the 4 GiB benchmark disk (qcow2 → raw,
  page cache dropped, flush included) the page cache was faster than O_DIRECT: 1.78 s against
  2.09 s with ``-t none``, medians 3.26 s against 3.73 s on a loaded machine, and with the drop-behind
  1.2-1.3 s against 1.4-1.6 s (bench/README.md): qemu-img issues its writes asynchronously and the
  kernel writes them out in large sorted batches;
* a **larger file** is written with O_DIRECT where qemu-img writes big blocks (:data:`DIRECT_IO_FORMATS`,
  not from :data:`BUFFERED_INPUTS`) and the filesystem supports it, so one conversion does not evict
  the page cache every other task works from and does not stall in dirty-page throttling; the other
  conversions stay buffered (their small compressed or grain-sized writes measured 7-60 % slower
  with O_DIRECT).

A buffered file output is dropped behind the writer (:class:`appliance.pagecache.DropBehind`)
while qemu-img writes it. The **source** is read with O_DIRECT (``-T none``, :func:`use_direct_input`)
when it is not in the page cache already, its filesystem accepts O_DIRECT and qemu-img reads its format
in big pieces (not :data:`BUFFERED_INPUTS`): a cold source read through the cache only fills the cache
with pages nothing reads again (:mod:`appliance.pagecache` says why that costs so much here).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import pagecache
from ..errors import UsageError
from . import qemuimg
from .formats import to_qemu

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


def build_command(
    src: Path,
    src_qemu_format: str,
    dst: Path,
    to_format: str,
    subformat: str | None,
    *,
    block_device: bool = False,
    direct_io: bool = False,
    direct_input: bool = False,
    qemu_img: str = qemuimg.QEMU_IMG,
) -> list[str]:
    """The ``qemu-img convert`` argv for one conversion.

    ``direct_io`` writes the output with ``-t none`` (O_DIRECT), as :func:`use_direct_io` decides;
    otherwise qemu-img's default (the page cache, flushed by the caller). A block device is always
    written with O_DIRECT. ``direct_input`` reads the source with ``-T none`` (:func:`use_direct_input`).

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
    if direct_input:
        argv += ["-T", "none"]
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


def use_direct_input(src_qemu_format: str, source: Path) -> bool:
    """Whether qemu-img reads ``source`` with O_DIRECT (``-T none``): the rule of the module docstring."""
    if src_qemu_format in BUFFERED_INPUTS:
        return False
    return _reads_direct(source) and not pagecache.mostly_cached(source)


def _reads_direct(path: Path) -> bool:
    """Whether ``path`` can be opened for reading with O_DIRECT (see :func:`supports_direct_io`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


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


def check_subformat(fmt: str, subformat: str | None) -> str | None:
    """The subformat of ``fmt`` output: the one asked for if the format has it, else its default."""
    allowed = SUBFORMATS.get(fmt, ())
    if subformat is None:
        return allowed[0] if allowed else None
    if subformat not in allowed:
        choices = ", ".join(allowed) if allowed else "none"
        raise UsageError(f"subformat {subformat!r} is not available for {fmt} output (choices: {choices})")
    return subformat


def supports_direct_io(path: Path) -> bool:
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
