"""OVA members as they stream out of the tar: the rules a member must meet before anything of it is kept
(:func:`check_member`: a regular file with a flat name; :func:`flat_name`, also the rule for the names an
OVA is written with), and a disk member stored sparse in the private directory while it is hashed
(:func:`store_member`). Reading the package as a whole is :mod:`appliance.image.ova`'s."""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import Cancelled, ImageRejected

_CHUNK = 1 << 20
_reject = ImageRejected.nothing_imported


def flat_name(name: str) -> bool:
    if not name or name in (".", "..") or len(name.encode("utf-8", "surrogateescape")) > 255:
        return False
    return not any(c in name for c in "/\\\0") and name.isprintable()


def check_member(ti: tarfile.TarInfo) -> None:
    if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or ti.sparse is not None:
        kind = {
            tarfile.SYMTYPE: "a symbolic link",
            tarfile.LNKTYPE: "a hard link",
            tarfile.CHRTYPE: "a character device",
            tarfile.BLKTYPE: "a block device",
            tarfile.FIFOTYPE: "a FIFO",
            tarfile.CONTTYPE: "a contiguous file",
            tarfile.GNUTYPE_SPARSE: "a sparse file",
        }.get(ti.type, f"of tar type {ti.type!r}")
        raise _reject(
            "Ova.UnsafeMember", f"the OVA member {ti.name[:100]!r} is {kind}; only regular files are allowed"
        )
    parts = ti.name.split("/")
    if ti.name.startswith("/") or ".." in parts or not flat_name(ti.name):
        raise _reject(
            "Ova.UnsafeMember",
            f"the OVA member name {ti.name[:100]!r} is not a plain file name (absolute, '..', a directory "
            "or a control character)",
        )
    if ti.size < 0:
        raise _reject("Ova.Corrupt", f"the OVA member {ti.name!r} has a negative size")


@dataclass
class Member:
    name: str
    size: int
    path: Path | None
    digests: dict[str, str]
    body: bytes | None = None


def store_member(
    f: IO[bytes],
    dst: Path,
    size: int,
    algorithms: set[str],
    cancel: threading.Event | None,
    progress: Callable[[int], None] | None,
) -> dict[str, str]:
    """Copy ``size`` bytes of member ``f`` into the new file ``dst`` (holes for zero blocks), hashing."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    zero = bytes(_CHUNK)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        pos = 0
        while pos < size:
            if cancel is not None and cancel.is_set():
                raise Cancelled("OVA import cancelled")
            chunk = f.read(min(_CHUNK, size - pos))
            if not chunk:
                raise _reject(
                    "Ova.Corrupt",
                    f"the OVA ends inside {dst.name} ({pos} of the {size} bytes its header claims)",
                )
            for h in hashers.values():
                h.update(chunk)
            if chunk != zero[: len(chunk)]:
                view = memoryview(chunk)
                at = pos
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
            pos += len(chunk)
            if progress is not None:
                progress(len(chunk))
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return {a: h.hexdigest() for a, h in hashers.items()}
