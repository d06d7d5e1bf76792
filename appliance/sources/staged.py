"""Staged uploads (the ``upload`` import method, Glance's glance-direct): a client sends the disk's
bytes to the appliance itself, then an import names ``upload://{id}`` as its source.

Each upload belongs to an account and its id is the client's choice within that account
(:data:`ID_RE`), so no account can see, touch or even learn of another's uploads: ``upload://x`` of
account A and of account B are two uploads. On disk (``sources.upload.directory``, mode 0700)::

    <directory>/<account>/<id>/meta.json   what was received (JSON, written atomically)
    <directory>/<account>/<id>/data        the bytes (0600, sparse until written)
    <directory>/<account>/<id>/lock        flock: one writer at a time, across processes

Writes (:meth:`UploadArea.put`) are sequential: the upload is a prefix of ``received`` bytes. A range
(``Content-Range: bytes a-b/total``, or the whole body from 0 without one) may start anywhere up to
``received``: the part of it already received is compared with what is stored (a repeated or
overlapping range is checked, and a different byte refuses the whole request: ``Upload.RangeMismatch``),
the rest is appended; a range that starts past ``received`` is a gap (``Upload.RangeGap``) and is
refused before its body is read. Once the total size is known (from a range's ``/total`` or the
length of a whole upload) and every byte of it is received, the upload is complete and immutable
(only ranges that repeat its bytes are accepted). A body whose SHA-256 the request signed
(``payload_sha256``) is committed only once it hashes to it; an unsigned body (HTTP Basic, or SigV4's
``UNSIGNED-PAYLOAD``) is committed as it arrives, so a dropped connection keeps what came and the
client resumes from ``received``. The upload's size cap (``max_size``) and the free space kept on
the filesystem (``min_free``) are checked before a body is read, and again as it arrives.

Uploads expire ``expire_hours`` after their creation: an expired upload is neither written to nor
imported, and :meth:`UploadArea.sweep` (the worker's) removes it unless an active import reads it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..atomicfile import write_json_atomic
from ..config import SourcesConfig, UploadConfig
from ..errors import ImagingError
from ..timestamps import format_time, parse_time, utc_now
from .methods import UPLOAD_SCHEME

#: an upload's id: 1 to 128 letters, digits, ``.``, ``_``, ``-``, starting with a letter or a digit
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: the directory of the uploads of tasks recorded without an account (no API key has that account)
_NO_ACCOUNT_DIR = "-"
#: bytes read from a request body at a time
CHUNK = 1 << 20
#: how long a writer waits for another writer of the same upload before ``Upload.Busy``
LOCK_WAIT = 10.0


class UploadError(ImagingError):
    """A staged upload cannot be written or used; ``code`` says why (``Upload.*``) and ``status``
    is the HTTP status the API answers with."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message, code)
        self.status = status


def not_found(upload_id: str) -> UploadError:
    return UploadError(
        "Upload.NotFound",
        f"there is no upload {upload_id!r} in your account (uploads expire; send it with PUT "
        f"/v1/uploads/{upload_id})",
        404,
    )


def check_id(upload_id: str) -> str:
    if not ID_RE.match(upload_id):
        raise UploadError(
            "Upload.InvalidId",
            f"{upload_id[:64]!r} is not an upload id: 1 to 128 letters, digits, '.', '_' and '-', "
            "starting with a letter or a digit",
        )
    return upload_id


def parse_upload_url(url: str) -> str:
    """The id of ``upload://{id}``; ``Upload.InvalidId`` for anything else."""
    if not url.lower().startswith(UPLOAD_SCHEME):
        raise UploadError("Upload.InvalidId", f"{url[:64]!r} is not an upload://ID URL")
    return check_id(url[len(UPLOAD_SCHEME) :])


@dataclass
class UploadInfo:
    """What is known of one upload (``meta.json``)."""

    id: str
    account: str
    created_at: str
    expires_at: str
    #: bytes received: every byte before this offset is stored
    received: int = 0
    #: the total size, once a request said it
    size: int | None = None
    complete: bool = False
    #: a random tag given when the upload completes: what an import checks it still reads
    etag: str | None = None
    completed_at: str | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return parse_time(self.expires_at) <= (now or utc_now())

    def view(self) -> dict[str, Any]:
        """What the API shows of the upload."""
        return {
            "id": self.id,
            "source": f"{UPLOAD_SCHEME}{self.id}",
            "received": self.received,
            "size": self.size,
            "complete": self.complete,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "completed_at": self.completed_at,
        }


@dataclass(frozen=True)
class Range:
    """What a PUT says it carries: bytes from ``start``, ``length`` of them when known (a
    Content-Range's or the body's Content-Length), and the upload's ``total`` when known."""

    start: int = 0
    length: int | None = None
    total: int | None = None

    @property
    def end(self) -> int | None:
        """One past the last byte, when the length is known."""
        return None if self.length is None else self.start + self.length


_CONTENT_RANGE = re.compile(r"^bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)$")


def parse_content_range(value: str | None, content_length: int | None) -> Range:
    """The :class:`Range` of a PUT from its ``Content-Range`` (None: the whole upload, from byte 0,
    as long as the body) and ``Content-Length`` (None: chunked). ``Upload.InvalidRange`` for a
    malformed header or one that disagrees with the length."""
    if value is None:
        return Range(0, content_length, content_length)
    m = _CONTENT_RANGE.match(value.strip())
    if m is None:
        raise UploadError(
            "Upload.InvalidRange",
            f"Content-Range {value[:64]!r} is not 'bytes FIRST-LAST/TOTAL' (TOTAL may be '*' until known)",
        )
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        raise UploadError("Upload.InvalidRange", f"Content-Range {value!r} is not a range of the upload")
    length = last - first + 1
    if content_length is not None and content_length != length:
        raise UploadError(
            "Upload.InvalidRange",
            f"Content-Range {value!r} names {length} bytes but the body is {content_length} bytes",
        )
    return Range(first, length, total)


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
        self._check_range(info, rng)
        need = max(0, (rng.end if rng.end is not None else rng.start) - info.received)
        self._check_space(directory, need)
        if created:
            self._save(directory, info)
        received = self._receive(directory, info, rng, read, payload_sha256)
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

    def _check_range(self, info: UploadInfo, rng: Range) -> None:
        cap = self.config.max_size
        for what, value in (("total size", rng.total), ("range", rng.end)):
            if value is not None and value > cap:
                raise UploadError(
                    "Upload.TooLarge",
                    f"the upload's {what} ({value} bytes) is larger than this appliance accepts "
                    f"({cap} bytes, sources.upload.max_size)",
                    413,
                )
        if info.size is not None and rng.total is not None and rng.total != info.size:
            raise UploadError(
                "Upload.SizeMismatch",
                f"upload {info.id!r} is {info.size} bytes, this request says {rng.total}; upload it again "
                "under another id to change its size",
                409,
            )
        if info.size is not None and rng.end is not None and rng.end > info.size:
            raise UploadError(
                "Upload.InvalidRange", f"the range ends past the upload's size ({info.size} bytes)", 416
            )
        if rng.start > info.received:
            raise UploadError(
                "Upload.RangeGap",
                f"upload {info.id!r} has {info.received} bytes; a range starting at {rng.start} would leave "
                f"a gap: send the bytes from {info.received} on",
                416,
            )
        if info.complete and (rng.end is None or rng.end > info.received):
            raise UploadError(
                "Upload.Complete",
                f"upload {info.id!r} is complete ({info.size} bytes) and can no longer change; upload "
                "under another id",
                409,
            )

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

    def _receive(
        self,
        directory: Path,
        info: UploadInfo,
        rng: Range,
        read: Callable[[int], bytes],
        payload_sha256: str | None,
    ) -> int:
        """Write the body at ``rng.start``; the new prefix to record (``info.received`` when the
        body is signed and did not hash right, or broke before its end)."""
        path = directory / "data"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        sha = hashlib.sha256() if payload_sha256 is not None else None
        pos = rng.start
        end_cap = min(x for x in (rng.end, rng.total, info.size, self.config.max_size) if x is not None)
        committed = info.received
        try:
            while True:
                want = CHUNK if rng.end is None else min(CHUNK, rng.end - pos)
                chunk = read(want) if want > 0 else b""
                if not chunk:
                    break
                if pos + len(chunk) > end_cap:
                    raise UploadError(
                        "Upload.TooLarge" if end_cap == self.config.max_size else "Upload.InvalidRange",
                        f"the body goes past {end_cap} bytes (its range, the upload's size or "
                        "sources.upload.max_size)",
                        413 if end_cap == self.config.max_size else 400,
                    )
                if sha is not None:
                    sha.update(chunk)
                view = memoryview(chunk)
                if pos < info.received:  # bytes already received: they must be the same
                    n = min(len(chunk), info.received - pos)
                    if os.pread(fd, n, pos) != bytes(view[:n]):
                        raise UploadError(
                            "Upload.RangeMismatch",
                            f"bytes from {pos} differ from those upload {info.id!r} already has; nothing of "
                            "this request was kept",
                            409,
                        )
                    view, pos = view[n:], pos + n
                while view:
                    try:
                        written = os.pwrite(fd, view, pos)
                    except OSError as exc:
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise UploadError(
                                "Upload.InsufficientStorage",
                                "the appliance ran out of room for uploads; try later",
                                507,
                            ) from exc
                        raise
                    view, pos = view[written:], pos + written
                if sha is None and pos - committed >= 64 * CHUNK:
                    self._check_space(directory, 0)
            if rng.end is not None and pos < rng.end:
                raise UploadError(
                    "Upload.IncompleteBody",
                    f"the body ended after {pos - rng.start} of {rng.length} bytes; send the rest from "
                    f"byte {max(pos if sha is None else info.received, info.received)}",
                    400,
                )
            if sha is not None and not hmac.compare_digest(sha.hexdigest(), payload_sha256 or ""):
                raise UploadError(
                    "Upload.PayloadMismatch",
                    "the body does not hash to the signed x-amz-content-sha256; nothing of it was kept",
                    400,
                )
            os.fsync(fd)
            return pos
        except BaseException:
            # An unsigned body keeps what arrived in order (the client resumes from there); a signed one
            # keeps nothing it could not verify.
            if sha is None and pos > info.received:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
                    info.received = pos
                    self._save(directory, info)
            raise
        finally:
            os.close(fd)

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


def upload_refs(params: Any) -> set[str]:
    """The upload ids an import task's parameters name (``upload://{id}`` anywhere in them)."""
    found: set[str] = set()
    stack = [params]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and node.lower().startswith(UPLOAD_SCHEME):
            with contextlib.suppress(UploadError):
                found.add(parse_upload_url(node))
    return found
