"""The staged-upload protocol (the ``upload`` import method, Glance's glance-direct): what names an
upload (its id, ``upload://{id}``), what is known of one (:class:`UploadInfo`), the range a PUT carries
(``Content-Range``) and the rules a range must follow, and the coded errors (``Upload.*``) with the HTTP
status the API answers them with. The storage is :mod:`appliance.sources.staged`'s.

Each upload belongs to an account and its id is the client's choice within that account
(:data:`ID_RE`), so no account can see, touch or even learn of another's uploads: ``upload://x`` of
account A and of account B are two uploads.

Writes are sequential: the upload is a prefix of ``received`` bytes. A range (``Content-Range: bytes
a-b/total``, or the whole body from 0 without one) may start anywhere up to ``received``; a range that
starts past ``received`` is a gap (``Upload.RangeGap``) and is refused before its body is read. Once the
total size is known (from a range's ``/total`` or the length of a whole upload) and every byte of it is
received, the upload is complete and immutable (only ranges that repeat its bytes are accepted).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import ImagingError
from ..timestamps import parse_time, utc_now
from .methods import UPLOAD_SCHEME

#: an upload's id: 1 to 128 letters, digits, ``.``, ``_``, ``-``, starting with a letter or a digit
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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


def check_range(info: UploadInfo, rng: Range, cap: int) -> None:
    """The rules of a PUT's range against what the upload has (module docstring); ``cap``: the
    size cap (``sources.upload.max_size``). Checked before the body is read."""
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
