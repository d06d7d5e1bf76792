"""The body of a staged upload's PUT written into the upload's data file: bytes the upload already has
are compared with what is stored (a repeated or overlapping range is checked, and a different byte
refuses the whole request: ``Upload.RangeMismatch``), the rest is appended at its offset. A body whose
SHA-256 the request signed (``payload_sha256``) is committed only once it hashes to it; an unsigned body
(HTTP Basic, or SigV4's ``UNSIGNED-PAYLOAD``) is committed as it arrives, so a dropped connection keeps
what came and the client resumes from ``received``. The size cap and the free space are checked again as
the body arrives. The upload's storage and locking are :mod:`appliance.sources.staged`'s.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path

from .stagedproto import Range, UploadError, UploadInfo

#: bytes read from a request body at a time
CHUNK = 1 << 20


def receive_body(
    path: Path,
    info: UploadInfo,
    rng: Range,
    read: Callable[[int], bytes],
    payload_sha256: str | None,
    *,
    max_size: int,
    check_space: Callable[[], None],
    save: Callable[[UploadInfo], None],
) -> int:
    """Write the body at ``rng.start`` into the upload's data file ``path``; the new prefix to record
    (``info.received`` when the body is signed and did not hash right, or broke before its end).
    ``max_size``: the size cap; ``check_space``: raises ``Upload.InsufficientStorage`` when the
    filesystem is short of its kept free space; ``save``: records ``info``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    sha = hashlib.sha256() if payload_sha256 is not None else None
    pos = rng.start
    end_cap = min(x for x in (rng.end, rng.total, info.size, max_size) if x is not None)
    committed = info.received
    try:
        while True:
            want = CHUNK if rng.end is None else min(CHUNK, rng.end - pos)
            chunk = read(want) if want > 0 else b""
            if not chunk:
                break
            if pos + len(chunk) > end_cap:
                raise UploadError(
                    "Upload.TooLarge" if end_cap == max_size else "Upload.InvalidRange",
                    f"the body goes past {end_cap} bytes (its range, the upload's size or "
                    "sources.upload.max_size)",
                    413 if end_cap == max_size else 400,
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
                check_space()
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
                save(info)
        raise
    finally:
        os.close(fd)
