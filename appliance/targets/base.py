"""What a target is: where converted disks end up.

Two kinds, chosen by configuration (``targets.volume`` / ``targets.image``, each ``{"type": ...}``):

- a :class:`VolumeTarget` gives the converter a writable file or block device (:class:`Volume`) of at
  least the requested size, for ImportVolume/ImportInstance; the RAW disk is written onto it (by
  ``qemu-img convert -n -O raw SRC volume.path`` or :func:`write_raw`), then :meth:`~VolumeTarget.finalize`
  flushes and detaches it;
- an :class:`ImageTarget` stores a finished image file (ImportImage/ImportSnapshot results).

Every target is idempotent in ``delete`` (the undo path): a resource that is already gone is fine.
This module also holds the coded errors and the sparse-aware copy shared by the implementations.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .. import schemas
from ..errors import Cancelled, ConfigError, ImagingError, UsageError
from ..partials import Ledger
from ..progress import ProgressCallback, ProgressTracker
from .encryption import Encryption

CHUNK = 4 * 1024 * 1024
_ZEROS = bytes(CHUNK)
#: ioctl numbers from <linux/fs.h>
BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
FICLONE = 0x40049409
#: fallocate(2) mode bits from <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class TargetError(ImagingError):
    """A target could not be prepared, written, finalized or removed; ``code`` says which way."""

    code = "TargetError"


class InsufficientStorage(TargetError):
    """The target's storage is full (ENOSPC/EDQUOT while writing, or below its free-space floor)."""

    code = "InsufficientStorage"


@dataclass(frozen=True)
class Volume:
    """A writable disk of ``size`` bytes at ``path`` (a regular file or a block device).

    ``info`` is JSON-able and is what the caller stores in the task: :meth:`VolumeTarget.reopen`
    and :meth:`VolumeTarget.delete` take it back after a worker restart. It always holds ``type``,
    ``volume_id``, ``path``, ``size`` and ``zeroed`` (whether unwritten ranges already read as zeros,
    which lets writers skip holes).
    """

    id: str
    path: Path
    size: int
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class VolumeTarget(Protocol):
    """Creates, finds again, finalizes and deletes volumes for conversion tasks."""

    def create(
        self,
        task_id: str,
        size_bytes: int,
        *,
        availability_zone: str | None = None,
        client_token: str | None = None,
    ) -> Volume:
        """A new volume of at least ``size_bytes``, ready to be written.

        ``client_token`` names this creation, as EC2's CreateVolume ClientToken does: a target that
        honours it returns, for a token an earlier create was given, the volume that create made or began
        to make (emptied again), so a step run again after a crash never leaves a volume behind. The
        file target honours it; see each target for the others.
        """
        ...

    def reopen(self, volume_info: Mapping[str, Any]) -> Volume:
        """The volume described by ``volume_info`` (from :attr:`Volume.info`), writable again."""
        ...

    def finalize(self, volume: Volume) -> dict[str, Any]:
        """Flush (and detach where that applies); return the description stored in the task result."""
        ...

    def delete(self, volume_info: Mapping[str, Any]) -> None:
        """Undo :meth:`create`; a volume that is already gone is fine."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings and state worth showing in ``/v1/info`` (never credentials)."""
        ...


@runtime_checkable
class ImageTarget(Protocol):
    """Stores finished image files and deletes them again."""

    #: the server-side encryption algorithms (:mod:`.encryption`) :meth:`store` can apply; empty
    #: for a target that cannot encrypt
    sse_algorithms: frozenset[str]

    def store(
        self,
        task_id: str,
        path: Path,
        *,
        format: str,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        ledger: Ledger | None = None,
        encryption: Encryption | None = None,
    ) -> dict[str, Any]:
        """Store ``path`` for ``task_id``; returns the location (with ``type``), ``size``, ``sha256``
        and ``encryption``: the encryption the stored image has (``Encryption.to_dict()``, or None).

        A target that writes a local partial file announces it to ``ledger`` (see
        :mod:`appliance.partials`) before it exists. With ``encryption`` the image is stored
        encrypted so, or not at all (``EncryptionNotSupported``, ``EncryptionNotApplied``).
        """
        ...

    def delete(self, location: Mapping[str, Any]) -> None:
        """Remove what :meth:`store` returned; already gone is fine."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings worth showing in ``/v1/info`` (never credentials)."""
        ...


def boto_client(service: str, settings: Mapping[str, Any], **botocore_config: Any) -> Any:
    """A boto3 client for a target's settings (``endpoint_url``, ``region``, ``access_key``,
    ``secret_key``), with standard retries; ``botocore_config`` adds or overrides botocore options.

    Each client comes from a private session: creating clients from the shared default session is
    not thread-safe. Without access_key/secret_key boto3's default credential chain applies.
    """
    # boto3 is heavy (about half a second to import) and only cloud targets and sources need it
    import boto3
    from botocore.config import Config as BotoConfig

    options: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": 5}, **botocore_config}
    return boto3.session.Session().client(
        service,
        endpoint_url=settings.get("endpoint_url"),
        region_name=settings.get("region"),
        aws_access_key_id=settings.get("access_key"),
        aws_secret_access_key=settings.get("secret_key"),
        config=BotoConfig(**options),
    )


def new_volume_id() -> str:
    """A fresh id in the EC2 form ``vol-`` + 17 hex digits."""
    return "vol-" + secrets.token_hex(9)[:17]


def validate_settings(settings: Mapping[str, Any], schema: dict[str, Any], where: str) -> dict[str, Any]:
    """Check target ``settings`` against ``schema``; :class:`ConfigError` names ``where.<key>``.

    Paths (config.py makes ``directory`` a :class:`Path`) are validated as strings.
    """
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    errors = sorted(schemas.validator_for(schema).iter_errors(plain), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            key = ".".join([where, *(str(p) for p in e.absolute_path)])
            lines.append(f"{key}: {e.message}")
        raise ConfigError("; ".join(lines))
    return plain


def check_cancel(cancel: threading.Event | None, what: str) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled")


def storage_error(exc: OSError, where: str) -> TargetError:
    """The coded error for an ``OSError`` raised while writing ``where``.

    Full storage (ENOSPC, EDQUOT) becomes :class:`InsufficientStorage`; anything else
    ``TargetWriteFailed``. Writers other than :func:`write_raw` (e.g. a qemu-img wrapper) may use it too.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return insufficient_storage(where, exc.strerror or os.strerror(exc.errno))
    return TargetError(f"cannot write {where}: {exc.strerror or exc}", "TargetWriteFailed")


def insufficient_storage(where: str, detail: str) -> InsufficientStorage:
    """The error of a write that found the storage of a target (``where``: a volume, an image file)
    full; ``detail`` says what reported it (the OS's words, or a tool's message).

    A full target is ``InsufficientStorage``; a full scratch disk is ``InsufficientScratch``
    (:func:`appliance.scratch.no_space_error`): the operator frees space in a different place.
    """
    return InsufficientStorage(
        f"no space left on the storage of {where}: free space or enlarge the target storage, "
        f"or lower the size of the image ({detail})"
    )


def block_device_size(fd: int) -> int:
    """Size in bytes of the block device open as ``fd`` (BLKGETSIZE64)."""
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return struct.unpack("Q", buf)[0]


def segments(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, is_data)`` ranges covering ``[0, size)`` of the file open as ``fd``.

    Uses SEEK_DATA/SEEK_HOLE; where the filesystem cannot tell, everything is data.
    """
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                yield pos, size, False
                return
            yield pos, size, True
            return
        data = min(data, size)
        if data > pos:
            yield pos, data, False
        if data >= size:
            return
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        yield data, hole, True
        pos = hole


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        n = os.pwrite(fd, buf, offset)
        buf = buf[n:]
        offset += n


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range of a regular file (it then reads as zeros); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _zero_range(fd: int, offset: int, length: int, is_block: bool) -> None:
    """Make ``[offset, offset+length)`` read as zeros on a destination that is not known to be zeroed."""
    if is_block:
        try:
            # Lets the device zero efficiently (a loop device punches holes in its backing file).
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                raise
    elif _punch_hole(fd, offset, length):
        return
    end = offset + length
    while offset < end:
        n = min(CHUNK, end - offset)
        _pwrite_all(fd, memoryview(_ZEROS)[:n], offset)
        offset += n


def copy_sparse(
    src_fd: int,
    dst_fd: int,
    size: int,
    *,
    dst_zeroed: bool,
    dst_is_block: bool = False,
    hasher: Any | None = None,
    on_bytes: Callable[[int], object] | None = None,
    cancel: threading.Event | None = None,
) -> int:
    """Copy ``size`` bytes from ``src_fd`` to ``dst_fd`` (same offsets), skipping what need not be written.

    Holes and all-zero chunks of the source are skipped when the destination already reads as zeros
    (``dst_zeroed``); otherwise they are zeroed on it. ``hasher`` (a hashlib object) sees every byte,
    holes included. ``on_bytes`` gets the offset reached; ``cancel`` is checked per chunk. Returns the
    number of bytes actually written.
    """
    written = 0
    hole_view = memoryview(_ZEROS)
    for start, end, is_data in segments(src_fd, size):
        pos = start
        while pos < end:
            check_cancel(cancel, "copy")
            n = min(CHUNK, end - pos)
            if is_data:
                chunk = os.pread(src_fd, n, pos)
                if len(chunk) != n:
                    raise TargetError(
                        f"source shrank while copying (short read at {pos})", "TargetWriteFailed"
                    )
                if hasher is not None:
                    hasher.update(chunk)
                if chunk == _ZEROS[:n]:
                    if not dst_zeroed:
                        _zero_range(dst_fd, pos, n, dst_is_block)
                else:
                    _pwrite_all(dst_fd, memoryview(chunk), pos)
                    written += n
            else:
                if hasher is not None:
                    hasher.update(hole_view[:n])
                if not dst_zeroed:
                    _zero_range(dst_fd, pos, n, dst_is_block)
            pos += n
            if on_bytes is not None:
                on_bytes(pos)
    return written


def hash_file(path: Path, cancel: threading.Event | None = None) -> tuple[str, int]:
    """``(sha256 hex, size)`` of ``path``, reading only its data ranges (holes hash as zeros)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for start, end, is_data in segments(fd, size):
            pos = start
            while pos < end:
                check_cancel(cancel, "hashing")
                n = min(CHUNK, end - pos)
                h.update(os.pread(fd, n, pos) if is_data else memoryview(_ZEROS)[:n])
                pos += n
    finally:
        os.close(fd)
    return h.hexdigest(), size


def write_raw(
    volume: Volume,
    source: Path,
    *,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> int:
    """Write the RAW image ``source`` onto ``volume`` from offset 0; returns the image size in bytes.

    Sparse-aware: holes and zero chunks are skipped on a zeroed volume (``info["zeroed"]``) and
    zeroed otherwise, so stale data on a reused device never shows through. Progress is reported in
    phase ``writing``. Raises :class:`UsageError` if the image is larger than the volume,
    :class:`InsufficientStorage` when the storage fills up, :class:`Cancelled` on ``cancel``. Does not
    flush: :meth:`VolumeTarget.finalize` does.
    """
    size = source.stat().st_size
    if size > volume.size:
        raise UsageError(f"the image ({size} bytes) is larger than volume {volume.id} ({volume.size} bytes)")
    tracker = ProgressTracker("writing", size, on_progress)
    src_fd = os.open(source, os.O_RDONLY)
    try:
        try:
            dst_fd = os.open(volume.path, os.O_WRONLY)
        except OSError as exc:
            raise storage_error(exc, f"volume {volume.id} ({volume.path})") from exc
        try:
            is_block = stat.S_ISBLK(os.fstat(dst_fd).st_mode)
            copy_sparse(
                src_fd,
                dst_fd,
                size,
                dst_zeroed=bool(volume.info.get("zeroed")),
                dst_is_block=is_block,
                on_bytes=tracker.update,
                cancel=cancel,
            )
        except OSError as exc:
            raise storage_error(exc, f"volume {volume.id} ({volume.path})") from exc
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    tracker.finish()
    return size


def fsync_path(path: Path, where: str) -> None:
    """Flush ``path`` (a file or block device) to stable storage; ENOSPC/EIO become coded errors."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise storage_error(exc, where) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise storage_error(exc, where) from exc
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
