"""File targets (the embedded default): volumes and images as files in a local directory.

Volumes are sparse RAW files ``<directory>/<vol-id>.raw`` (mode 0600, directory 0700) created at
their full size with ``ftruncate``: nothing is allocated until written, so ``create`` cannot know
whether the data will fit. A create given a ``client_token`` names the volume after it, so a create that
is run again with the same token (the step, after its process was killed) takes the same file again
instead of leaving the first one behind. It refuses only when the filesystem is already below ``min_free``; a
write that later fills the filesystem fails with ``InsufficientStorage`` (see
:func:`~appliance.targets.base.storage_error`).

Images are copied to ``<directory>/<task_id>.<ext>`` through a hidden partial file (mode 0600, named
in the task's cleanup ledger before it exists: :mod:`appliance.partials`) and renamed into place, so
the final name is either absent or complete. The copy tries a reflink first
(btrfs, XFS) and otherwise copies only the data ranges (SEEK_DATA/SEEK_HOLE, zero chunks
skipped), hashing every byte with sha256 on the way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

from .. import schemas
from ..config import parse_size
from ..errors import UsageError
from ..partials import Ledger, partial_file, publish
from ..progress import ProgressCallback, ProgressTracker
from .base import InsufficientStorage, TargetError, Volume, new_volume_id, storage_error, validate_settings
from .encryption import Encryption, EncryptionNotSupported
from .rawio import FICLONE, copy_sparse, fsync_dir, fsync_path, hash_file

#: the settings schema of both file targets (``appliance/schemas/target-file.json``)
VOLUME_SCHEMA: dict[str, Any] = schemas.load("target-file")
IMAGE_SCHEMA: dict[str, Any] = VOLUME_SCHEMA

DEFAULT_MIN_FREE: str = VOLUME_SCHEMA["properties"]["min_free"]["default"]
_VOLUME_NAME = re.compile(r"^vol-[0-9a-f]{8,17}\.raw$")
#: user-facing format name → file extension
EXTENSIONS = {
    "raw": "raw",
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vhd": "vhd",
    "vhdx": "vhdx",
    "qed": "qed",
    "iso": "iso",
}
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mkdir's mode is filtered by the umask, and an existing directory keeps its mode
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise storage_error(exc, f"directory {directory}") from exc


def _check_floor(directory: Path, min_free: int, what: str) -> None:
    free = _free_bytes(directory)
    if free < min_free:
        raise InsufficientStorage(
            f"{directory} has {free} bytes free, less than the {min_free} bytes "
            f"(targets.{what}.min_free) kept free: free space or lower min_free"
        )


def token_volume_id(client_token: str) -> str:
    """The volume id a file volume created with ``client_token`` gets (``vol-`` + 17 hex digits)."""
    return "vol-" + hashlib.sha256(client_token.encode()).hexdigest()[:17]


def extension_for(fmt: str) -> str:
    """File extension for a user-facing format name (``raw``, ``qcow2``, …)."""
    try:
        return EXTENSIONS[fmt.lower()]
    except KeyError:
        raise UsageError(f"unknown image format {fmt!r} (known: {', '.join(EXTENSIONS)})") from None


class _DirectoryTarget:
    """What both file targets share: a directory, a free-space floor, settings and description."""

    #: the settings' schema and where they sit in the configuration (named in errors)
    SCHEMA: dict[str, Any]
    SETTINGS: str

    def __init__(self, directory: Path, min_free: int = parse_size(DEFAULT_MIN_FREE)) -> None:
        self.directory = Path(directory)
        self.min_free = min_free

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Self:
        """Build from the target's settings; :class:`ConfigError` names a bad key."""
        s = validate_settings(settings, cls.SCHEMA, cls.SETTINGS)
        return cls(Path(s["directory"]), parse_size(s.get("min_free", DEFAULT_MIN_FREE)))

    def describe(self) -> dict[str, Any]:
        """``{type, directory, min_free, free_bytes}`` (free_bytes None before the directory exists)."""
        try:
            free: int | None = _free_bytes(self.directory)
        except OSError:
            free = None
        return {
            "type": "file",
            "directory": str(self.directory),
            "min_free": self.min_free,
            "free_bytes": free,
        }


class FileVolumeTarget(_DirectoryTarget):
    """One sparse RAW file per volume under ``directory``."""

    SCHEMA = VOLUME_SCHEMA
    SETTINGS = "targets.volume"

    def create(
        self,
        task_id: str,
        size_bytes: int,
        *,
        availability_zone: str | None = None,
        client_token: str | None = None,
    ) -> Volume:
        """A new zero-filled sparse file of exactly ``size_bytes``.

        With ``client_token`` the volume id comes from the token: the file an earlier create with it made
        (whose caller never got to use it) is taken again and emptied.
        """
        if size_bytes <= 0:
            raise UsageError(f"volume size must be positive, not {size_bytes}")
        _make_dir(self.directory)
        _check_floor(self.directory, self.min_free, "volume")
        if client_token is None:
            volume_id, flags = new_volume_id(), os.O_EXCL
        else:
            volume_id, flags = token_volume_id(client_token), 0
        path = self.directory / f"{volume_id}.raw"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flags, 0o600)
        except OSError as exc:
            raise storage_error(exc, f"volume file {path}") from exc
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask
            os.ftruncate(fd, 0)  # a file taken again reads as zeros, and stays sparse
            os.ftruncate(fd, size_bytes)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise storage_error(exc, f"volume file {path}") from exc
        os.close(fd)
        info = {
            "type": "file",
            "volume_id": volume_id,
            "path": str(path),
            "size": size_bytes,
            "zeroed": True,
            "task_id": task_id,
            "availability_zone": availability_zone,
        }
        return Volume(volume_id, path, size_bytes, info)

    def _path_of(self, volume_info: Mapping[str, Any]) -> Path:
        volume_id = str(volume_info.get("volume_id", ""))
        path = self.directory / f"{volume_id}.raw"
        # Only ever touch our own files, whatever a stored record says.
        if not _VOLUME_NAME.match(path.name):
            raise UsageError(f"not a file-target volume id: {volume_id!r}")
        return path

    def reopen(self, volume_info: Mapping[str, Any]) -> Volume:
        """The volume file again; ``InvalidVolume.NotFound`` if it is gone."""
        path = self._path_of(volume_info)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise TargetError(
                f"volume {volume_info['volume_id']} ({path}) no longer exists", "InvalidVolume.NotFound"
            ) from None
        # It may hold part of an earlier write: a rewrite must zero what it skips, not assume zeros.
        info = dict(volume_info, path=str(path), size=size, zeroed=False)
        return Volume(str(volume_info["volume_id"]), path, size, info)

    def finalize(self, volume: Volume) -> dict[str, Any]:
        """fsync the file and its directory; returns ``{type, volume_id, path, size, allocated}``."""
        fsync_path(volume.path, f"volume {volume.id}")
        fsync_dir(volume.path.parent)
        st = volume.path.stat()
        return {
            "type": "file",
            "volume_id": volume.id,
            "path": str(volume.path),
            "size": st.st_size,
            "allocated": st.st_blocks * 512,
        }

    def delete(self, volume_info: Mapping[str, Any]) -> None:
        """Remove the volume file (already gone is fine)."""
        path = self._path_of(volume_info)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise TargetError(f"cannot remove {path}: {exc.strerror}", "TargetDeleteFailed") from exc


class FileImageTarget(_DirectoryTarget):
    """Finished images as ``<directory>/<task_id>.<ext>`` files."""

    SCHEMA = IMAGE_SCHEMA
    SETTINGS = "targets.image"
    #: plain files: nothing here encrypts them
    sse_algorithms: frozenset[str] = frozenset()

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
        fence: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Copy ``path`` into place atomically; returns ``{type, path, format, size, sha256,
        encryption}`` (``encryption`` None: the file is stored as it is).

        Refuses up front (``InsufficientStorage``) when the data to copy would leave less than
        ``min_free``, and any ``encryption`` (``EncryptionNotSupported``): a plain file is not
        encrypted, and saying it is would be a lie. The copy is written to a partial file (mode
        0600) whose name ``ledger`` learns before it exists (:mod:`appliance.partials`); it is
        removed on any failure or cancel.
        """
        if not _TASK_ID.match(task_id):
            raise UsageError(f"not a valid task id for a file name: {task_id!r}")
        if encryption is not None:
            raise EncryptionNotSupported(
                f"the file image target (targets.image.type: file, {self.directory}) cannot store an "
                f"image encrypted ({encryption.algorithm}); configure the s3 image target to import "
                "encrypted images"
            )
        ext = extension_for(format)
        _make_dir(self.directory)
        final = self.directory / f"{task_id}.{ext}"
        src_fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(src_fd)
            needed = st.st_blocks * 512
            free = _free_bytes(self.directory)
            if free - needed < self.min_free:
                raise InsufficientStorage(
                    f"storing {path.name} needs about {needed} bytes in {self.directory}, which has "
                    f"{free} bytes free and keeps {self.min_free} free (targets.image.min_free)"
                )
            tracker = ProgressTracker("writing", st.st_size, on_progress)
            try:
                with partial_file(final, ledger) as tmp:
                    dst_fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        sha256 = self._copy(src_fd, dst_fd, st.st_size, path, tracker, cancel)
                        os.fsync(dst_fd)
                    finally:
                        os.close(dst_fd)
                    if fence is not None:
                        fence()
                    publish(tmp, final, 0o600)
                    fsync_dir(self.directory)
            except OSError as exc:
                raise storage_error(exc, f"image file {final}") from exc
        finally:
            os.close(src_fd)
        tracker.finish()
        return {
            "type": "file",
            "path": str(final),
            "format": format.lower(),
            "size": st.st_size,
            "sha256": sha256,
            "encryption": None,
        }

    def store_streamed(
        self,
        task_id: str,
        write: Callable[[Path], None],
        *,
        format: str,
        ledger: Ledger | None = None,
        encryption: Encryption | None = None,
        fence: Callable[[], None] | None = None,
        reuse_partial: Path | None = None,
        keep_partial_on: tuple[type[BaseException], ...] = (),
        hash_output: bool = True,
    ) -> dict[str, Any]:
        """Store an image written in place, without a copy in scratch: ``write(path)`` fills the new
        partial file ``path`` (mode 0600, empty, so it reads as zeros: holes stay holes) and checks it;
        then the file is fsynced, hashed, ``fence`` is called and it is published as :meth:`store`
        publishes. Any failure of ``write`` (or a cancel) removes the partial: nothing is stored.
        Returns what :meth:`store` returns. ``EncryptionNotSupported`` as :meth:`store`, before
        anything is written.

        A resumable writer: ``reuse_partial`` is the partial an earlier run of the task kept (``write``
        gets it as it is when it still is one, see :func:`appliance.partials.partial_file`), and the
        errors in ``keep_partial_on`` leave the partial in place for the next run. ``hash_output``
        False: the caller digested what it wrote (the file is not read again; ``sha256`` is None)."""
        if not _TASK_ID.match(task_id):
            raise UsageError(f"not a valid task id for a file name: {task_id!r}")
        if encryption is not None:
            raise EncryptionNotSupported(
                f"the file image target (targets.image.type: file, {self.directory}) cannot store an "
                f"image encrypted ({encryption.algorithm}); configure the s3 image target to import "
                "encrypted images"
            )
        _make_dir(self.directory)
        final = self.directory / f"{task_id}.{extension_for(format)}"
        _check_floor(self.directory, self.min_free, "image")
        try:
            with partial_file(final, ledger, reuse=reuse_partial, keep_on=keep_partial_on) as tmp:
                write(tmp)
                fsync_path(tmp, f"image file {final}")
                if hash_output:
                    sha256: str | None
                    sha256, size = hash_file(tmp)
                else:
                    sha256, size = None, tmp.stat().st_size
                if fence is not None:
                    fence()
                publish(tmp, final, 0o600)
                fsync_dir(self.directory)
        except OSError as exc:
            raise storage_error(exc, f"image file {final}") from exc
        return {
            "type": "file",
            "path": str(final),
            "format": format.lower(),
            "size": size,
            "sha256": sha256,
            "encryption": None,
        }

    @staticmethod
    def _copy(
        src_fd: int,
        dst_fd: int,
        size: int,
        path: Path,
        tracker: ProgressTracker,
        cancel: threading.Event | None,
    ) -> str:
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                raise
        else:
            # Shared extents: nothing was copied, the hash still needs one read of the data.
            digest, _ = hash_file(path, cancel)
            tracker.update(size)
            return digest
        hasher = hashlib.sha256()
        copy_sparse(
            src_fd, dst_fd, size, dst_zeroed=True, hasher=hasher, on_bytes=tracker.update, cancel=cancel
        )
        os.ftruncate(dst_fd, size)  # a trailing hole is not written
        return hasher.hexdigest()

    def delete(self, location: Mapping[str, Any]) -> None:
        """Remove a stored image (already gone is fine); refuses paths outside ``directory``."""
        path = Path(str(location.get("path", "")))
        if path.parent != self.directory or not path.name or path.name.startswith("."):
            raise UsageError(f"refusing to delete {path}: not an image in {self.directory}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
