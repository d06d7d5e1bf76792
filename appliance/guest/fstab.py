"""The guest's ``/etc/fstab`` parsed, the one reading of it that both the static validation of a
Linux guest (:mod:`appliance.guest.linux`, which checks each entry against the disk's volumes) and
the guest mounts (:mod:`appliance.guest.mount`, which mounts the entries on the same disk) use.

The text is the guest's (untrusted): a line that does not parse is skipped, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..mountfields import unescape_mount_field


@dataclass
class FstabEntry:
    #: the device as the guest names it (``UUID=…``, ``LABEL=…``, ``/dev/…``, ``none``)
    spec: str
    mountpoint: str
    fstype: str
    options: list[str]


def parse_fstab(text: str) -> list[FstabEntry]:
    """The entries of an fstab, in order: octal escapes such as ``\\040`` decoded; blank and comment
    lines and lines of fewer than two fields skipped; a missing type is ``auto`` and missing options
    ``defaults`` (as mount(8) reads them); the dump and pass fields ignored."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [unescape_mount_field(f) for f in line.split()[:4]]
        if len(fields) < 2:
            continue
        fstype = fields[2] if len(fields) > 2 else "auto"
        options = fields[3].split(",") if len(fields) > 3 else ["defaults"]
        entries.append(FstabEntry(fields[0], fields[1], fstype, options))
    return entries
