"""Staged uploads on the appliance's disk (the ``upload`` import method: a client sends the disk's bytes
to the appliance itself, then an import names ``upload://{id}`` as its source): where each upload
lives, one writer at a time, its metadata, and its expiry. The protocol (ids, ranges, errors) is
:mod:`appliance.sources.stagedproto`'s, the writing of a body :mod:`appliance.sources.stagedbody`'s.

On disk (``sources.upload.directory``, mode 0700)::

    <directory>/<account>/<id>/meta.json   what was received (JSON, written atomically)
    <directory>/<account>/<id>/data        the bytes (0600, sparse until written)
    <directory>/<account>/<id>/lock        flock: one writer at a time, across processes

The upload's size cap (``max_size``) and the free space kept on the filesystem (``min_free``) are
checked before a body is read (:meth:`UploadArea.put`), and again as it arrives.

Uploads expire ``expire_hours`` after their creation: an expired upload is neither written to nor
imported, and :meth:`UploadArea.sweep` (the worker's) removes it unless an active import reads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path

from ..atomicfile import write_json_atomic
from ..config import SourcesConfig, UploadConfig
from ..timestamps import format_time, utc_now
from .stagedbody import receive_body
from .stagedproto import Range, UploadError, UploadInfo, check_id, check_range, not_found

#: the directory of the uploads of tasks recorded without an account (no API key has that account)
_NO_ACCOUNT_DIR = "-"
#: how long a writer waits for another writer of the same upload before ``Upload.Busy``
LOCK_WAIT = 10.0


class UploadArea:
    """The staged uploads under ``sources.upload`` (module docstring)."""

    def __init__(self, config: UploadConfig) -> None:
        self.config = config
        self.root = config.directory

    @classmethod
    def from_sources(cls, sources: SourcesConfig | None) -> UploadArea:
        if sources is None or sources.upload is None:
            raise UploadError(
                "Upload.NotConfigured", "staged uploads are not configured (sources.upload)", 503
            )
        return cls(sources.upload)

    # -- where ----------------------------------------------------------------------------------

    def _dir(self, account: str, upload_id: str) -> Path:
        return self.root / (account or _NO_ACCOUNT_DIR) / check_id(upload_id)

    def data_path(self, account: str, upload_id: str) -> Path:
        return self._dir(account, upload_id) / "data"

    @contextlib.contextmanager
    def _locked(self, directory: Path, *, create: bool) -> Iterator[None]:
        if create:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.chmod(self.root, 0o700)
        try:
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise not_found(directory.name) from None
        try:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise UploadError(
                            "Upload.Busy",
                            f"another request is writing upload {directory.name!r}; retry when it is done",
                            409,
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    # -- reading --------------------------------------------------------------------------------

    def _load(self, directory: Path) -> UploadInfo | None:
        try:
            data = json.loads((directory / "meta.json").read_text())
        except FileNotFoundError:
            return None
        return UploadInfo(**data)

    def _save(self, directory: Path, info: UploadInfo) -> None:
        write_json_atomic(directory / "meta.json", asdict(info), 0o600)

    def get(self, account: str, upload_id: str, *, now: datetime | None = None) -> UploadInfo:
        """The upload ``upload_id`` of ``account``; ``Upload.NotFound`` (also for an expired one)."""
        info = self._load(self._dir(account, upload_id))
        if info is None or info.expired(now):
            raise not_found(upload_id)
        return info

    def ready(self, account: str, upload_id: str, *, now: datetime | None = None) -> UploadInfo:
        """The upload if it is complete (what an import needs); ``Upload.NotFound``, ``Upload.Incomplete``."""
        info = self.get(account, upload_id, now=now)
        if not info.complete:
            have = f"{info.received} of {info.size}" if info.size is not None else f"{info.received}"
            raise UploadError(
                "Upload.Incomplete",
                f"upload {upload_id!r} is not complete ({have} bytes received); send the rest with PUT "
                f"/v1/uploads/{upload_id} and a Content-Range from byte {info.received}",
                409,
            )
        return info

    def uploads_of(self, accounts: Collection[str] | None) -> list[UploadInfo]:
        """The uploads of ``accounts`` (None: every account), oldest first; expired ones left out."""
        out: list[UploadInfo] = []
        now = utc_now()
        for meta in sorted(self.root.glob("*/*/meta.json")):
            info = self._load(meta.parent)
            if info is None or info.expired(now):
                continue
            if accounts is None or info.account in accounts:
                out.append(info)
        return sorted(out, key=lambda i: i.created_at)

    # -- writing --------------------------------------------------------------------------------

    def put(
        self,
        account: str,
        upload_id: str,
        rng: Range,
        read: Callable[[int], bytes],
        *,
        payload_sha256: str | None = None,
        now: datetime | None = None,
    ) -> tuple[UploadInfo, bool]:
        """Store the bytes ``read(n)`` returns (b"" at the end of the body) as ``rng`` of the upload,
        creating it; ``(info, created)``. ``payload_sha256``: the body must hash to it, else nothing
        of it is kept (``Upload.PayloadMismatch``). Raises :class:`UploadError` (module docstring);
        an exception of ``read`` (a dropped connection) propagates once what came is recorded."""
        now = now or utc_now()
        directory = self._dir(account, upload_id)
        with self._locked(directory, create=True):
            try:
                return self._put(directory, account, upload_id, rng, read, payload_sha256, now)
            except BaseException:
                if not (directory / "meta.json").exists():  # refused before anything was kept
                    shutil.rmtree(directory, ignore_errors=True)
                raise

    def _put(
        self,
        directory: Path,
        account: str,
        upload_id: str,
        rng: Range,
        read: Callable[[int], bytes],
        payload_sha256: str | None,
        now: datetime,
    ) -> tuple[UploadInfo, bool]:
        cfg = self.config
        info = self._load(directory)
        created = info is None or info.expired(now)
        if info is None or info.expired(now):
            if info is not None:  # an expired upload under the same id: a new one replaces it
                (directory / "data").unlink(missing_ok=True)
            info = UploadInfo(
                id=upload_id,
                account=account,
                created_at=format_time(now),
                expires_at=format_time(now + timedelta(hours=cfg.expire_hours)),
            )
        check_range(info, rng, cfg.max_size)
        need = max(0, (rng.end if rng.end is not None else rng.start) - info.received)
        self._check_space(directory, need)
        if created:
            self._save(directory, info)
        received = receive_body(
            directory / "data",
            info,
            rng,
            read,
            payload_sha256,
            max_size=cfg.max_size,
            check_space=lambda: self._check_space(directory, 0),
            save=lambda i: self._save(directory, i),
        )
        info.received = max(info.received, received)
        if rng.total is not None:
            info.size = rng.total
        elif rng.length is None and rng.start == 0 and info.size is None:
            info.size = received  # a chunked body without Content-Range: the whole upload, ended
        if info.size is not None and info.received >= info.size and not info.complete:
            info.received = info.size
            info.complete = True
            info.etag = secrets.token_hex(16)
            info.completed_at = format_time(utc_now())
        self._save(directory, info)
        return info, created

    def _check_space(self, directory: Path, need: int) -> None:
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        if free - need < self.config.min_free:
            raise UploadError(
                "Upload.InsufficientStorage",
                f"the appliance has no room for {need} more bytes of uploads (sources.upload.min_free "
                f"{self.config.min_free} bytes kept free); try later or import from object storage",
                507,
            )

    # -- removing -------------------------------------------------------------------------------

    def delete(self, account: str, upload_id: str, in_use: Callable[[str, str], bool]) -> None:
        """Remove the upload; ``Upload.InUse`` (409) while an active import reads it."""
        directory = self._dir(account, upload_id)
        if self._load(directory) is None:
            raise not_found(upload_id)
        if in_use(account, upload_id):
            raise UploadError(
                "Upload.InUse",
                f"upload {upload_id!r} is being imported; cancel that import first, or let it finish",
                409,
            )
        with self._locked(directory, create=False):
            shutil.rmtree(directory, ignore_errors=True)

    def sweep(self, in_use: Callable[[str, str], bool], *, now: datetime | None = None) -> list[Path]:
        """Remove expired uploads that no active import reads; the directories removed."""
        now = now or utc_now()
        removed: list[Path] = []
        for meta in sorted(self.root.glob("*/*/meta.json")):
            directory = meta.parent
            try:
                info = self._load(directory)
            except (ValueError, TypeError):
                info = None  # unreadable metadata: judged by its age alone
            if info is not None and not info.expired(now):
                continue
            if info is not None and in_use(info.account, info.id):
                continue
            if info is None and time.time() - meta.stat().st_mtime < self.config.expire_hours * 3600:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
        return removed
