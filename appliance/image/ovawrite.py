"""Writing an OVA: ``.ovf``, ``.mf``, then the disks, as one tar stream to a forward-only sink.

The layout of ``ova-ovf.md`` §7 — members ``NAME.ovf``, ``NAME.mf`` (a ``SHA256(file)= hex`` line for the
descriptor and for each disk), then the disks in ``References`` order; GNU tar (sizes over 8 GiB in
base-256, as ``ova-compose`` writes), owner and group 0, mode 0644, regular files only, no compression. The
tar goes to any forward-only sink (a file, an S3 multipart upload): each disk's size and digest are known
before its header is written, because the disks are finished files (the caller writes the stream-optimized
VMDKs first and gives their sha256, which is checked again while the bytes are copied into the tar).
"""

from __future__ import annotations

import hashlib
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import Cancelled
from .ova import manifest
from .ovamember import flat_name
from .ovf import MAX_DISKS
from .ovfenvelope import OvfDisk, envelope
from .vmdkwriter import ByteSink


@dataclass(frozen=True)
class OvaDiskFile:
    """A finished disk file to pack: its path, the name it gets in the OVA, its sha256 and capacity."""

    path: Path
    name: str
    sha256: str
    capacity: int
    populated: int = 0


@dataclass(frozen=True)
class OvaWriteResult:
    """What :func:`write_ova` wrote: the tar's size and sha256, the descriptor, and the manifest."""

    size: int
    sha256: str
    ovf: bytes
    manifest: bytes
    members: list[str]


class _Counted:
    """A file-like front of a sink for ``tarfile`` (``write`` only), counting and hashing."""

    def __init__(self, sink: ByteSink) -> None:
        self.sink = sink
        self.size = 0
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sink.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)


class _HashingReader:
    """A file read forward for ``tarfile.addfile``, hashed, cancellable."""

    def __init__(self, f: BinaryIO, cancel: threading.Event | None, progress: Callable[[int], None] | None):
        self.f, self.cancel, self.progress = f, cancel, progress
        self.sha = hashlib.sha256()
        self.done = 0

    def read(self, n: int = -1) -> bytes:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("OVA export cancelled")
        data = self.f.read(n)
        self.sha.update(data)
        self.done += len(data)
        if self.progress is not None:
            self.progress(len(data))
        return data


def write_ova(
    sink: ByteSink,
    name: str,
    disks: list[OvaDiskFile],
    *,
    cpus: int = 1,
    memory_mib: int = 1024,
    firmware: str = "bios",
    platform: str = "linux",
    on_progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> OvaWriteResult:
    """Write the OVA of VM ``name`` with ``disks`` (boot disk first) to ``sink`` (module docstring).
    ``on_progress(n)`` gets each count of disk bytes copied."""
    if not disks or len(disks) > MAX_DISKS:
        raise ValueError(f"an OVA holds 1..{MAX_DISKS} disks, not {len(disks)}")
    names = [d.name for d in disks]
    if len(set(names)) != len(names) or any(not flat_name(n) for n in names):
        raise ValueError(f"disk names must be distinct bare file names: {names}")
    sizes = [d.path.stat().st_size for d in disks]
    ovf = envelope(
        name,
        [OvfDisk(d.name, s, d.capacity, d.populated) for d, s in zip(disks, sizes, strict=True)],
        cpus=cpus,
        memory_mib=memory_mib,
        firmware=firmware,
        platform=platform,
    )
    ovf_name, mf_name = f"{name}.ovf", f"{name}.mf"
    mf = manifest([(ovf_name, hashlib.sha256(ovf).hexdigest()), *((d.name, d.sha256) for d in disks)])
    out = _Counted(sink)
    now = int(time.time())
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:  # type: ignore[call-overload]
        for member, body in ((ovf_name, ovf), (mf_name, mf)):
            tar.addfile(_info(member, len(body), now), _BytesReader(body))
        for d, size in zip(disks, sizes, strict=True):
            with open(d.path, "rb") as f:
                reader = _HashingReader(f, cancel, on_progress)
                tar.addfile(_info(d.name, size, now), reader)
            if reader.done != size or reader.sha.hexdigest() != d.sha256:
                raise ValueError(f"{d.path} changed while it was packed (its sha256 is not {d.sha256})")
    return OvaWriteResult(out.size, out.sha.hexdigest(), ovf, mf, [ovf_name, mf_name, *names])


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk = self.data[self.pos : end]
        self.pos += len(chunk)
        return chunk


def _info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid = size, mtime, 0o644, 0, 0
    ti.uname = ti.gname = "root"
    ti.type = tarfile.REGTYPE
    return ti
