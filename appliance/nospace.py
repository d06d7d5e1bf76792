"""The no-space error of scratch: a write that found no room (ENOSPC, EDQUOT) becomes
``InsufficientScratch`` through :func:`no_space_error`, the one place that error is made for every
writer into scratch (downloads, decompression, assembled uploads, qemu-img).

A write onto a target that finds no room (a volume, an image directory) is the target's
``InsufficientStorage`` instead (:func:`appliance.targets.base.insufficient_storage`): the space to
free is elsewhere.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import InsufficientScratch

#: the errnos of a write that found no room
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: how those read in a tool's message (qemu-img runs in the C locale)
NO_SPACE_MESSAGES = tuple(os.strerror(e) for e in sorted(NO_SPACE_ERRNOS))


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that found no room (ENOSPC, EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def no_space_error(where: Path | str, doing: str) -> InsufficientScratch:
    """The error of every writer whose write found no room (ENOSPC/EDQUOT) on the filesystem of ``where``.

    ``doing`` says what was being written (``"downloading s3://b/k (5 MiB written)"``). Raise it
    ``from`` the OSError (or with the tool's message) that said so.
    """
    return InsufficientScratch(
        f"no space left on the filesystem of {where} while {doing}; free space there, or lower "
        "scratch.quota (and raise scratch.min_free) so that the quota matches what the disk can hold"
    )
