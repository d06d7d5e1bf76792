"""The octal escapes of the fields of fstab, ``/proc/self/mountinfo`` and ``/proc/swaps``.

Those tables separate fields by white space, so a space, tab, newline or backslash inside a field is
written as a backslash and three octal digits (``\\040``, ``\\011``, ``\\012``, ``\\134``). The
guest's fstab (:mod:`appliance.guest.fstab`), the mounts the appliance cleans up
(:mod:`appliance.guest.loopdev`) and the device target's in-use checks of mountinfo and swaps
(:mod:`appliance.targets.device`) decode them here, in a foundation module, because ``targets/`` does
not import ``guest/``.
"""

from __future__ import annotations

import re

_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape_mount_field(field: str) -> str:
    """``field`` with each ``\\ooo`` decoded; a backslash not followed by three octal digits is kept."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)
