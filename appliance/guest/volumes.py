"""The volumes of a guest disk (its partitions, or the bare filesystem) opened for analysis, and the
report and findings the analysis accumulates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import Finding, Severity
from .codes import finding
from .reader import Disk, UnsupportedFilesystem, open_filesystem
from .safefs import GuestFS

#: partitions looked at, at most (a crafted chain of extended partitions can list thousands)
MAX_PARTITIONS = 128


@dataclass
class Volume:
    """A partition (or the whole bare filesystem) and what it holds."""

    entry: dict[str, Any]
    fs: GuestFS | None = None
    partuuid: str | None = None
    partlabel: str | None = None

    @property
    def number(self) -> int | None:
        return self.entry["number"]


@dataclass
class Analysis:
    """Accumulates the report while the disk is examined."""

    findings: list[Finding] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def add(self, code: str, message: str, severity: Severity | str | None = None) -> None:
        self.findings.append(finding(code, message, severity))


def _where(vol: Volume) -> str:
    return f"partition {vol.number}" if vol.number is not None else "the filesystem"


def open_volumes(disk: Disk, a: Analysis) -> list[Volume]:
    streams: list[tuple[dict[str, Any], Any, Any]] = []
    if disk.table is not None:
        parts = disk.partitions
        if len(parts) > MAX_PARTITIONS:
            a.add(
                "Guest.Unreadable",
                f"the partition table lists {len(parts)} partitions; only the first "
                f"{MAX_PARTITIONS} were examined",
                "warning",
            )
            parts = parts[:MAX_PARTITIONS]
        for p in parts:
            entry = {
                "number": p.number,
                "start": p.start,
                "size": p.size,
                "type": p.type,
                "type_name": p.type_name,
                "filesystem": None,
                "label": None,
                "uuid": None,
                "bootable": p.bootable,
                "esp": p.esp,
                "bios_boot": p.bios_boot,
            }
            streams.append((entry, p, lambda n=p.number: disk.open_partition(n)))
    else:
        entry = {
            "number": None,
            "start": 0,
            "size": disk.size,
            "type": None,
            "type_name": None,
            "filesystem": None,
            "label": None,
            "uuid": None,
            "bootable": False,
            "esp": False,
            "bios_boot": False,
        }
        streams.append((entry, None, disk.open_whole))
    volumes = []
    for entry, raw, opener in streams:
        vol = Volume(entry, partuuid=raw.partuuid if raw else None, partlabel=raw.name if raw else None)
        volumes.append(vol)
        try:
            fs = open_filesystem(opener())
        except UnsupportedFilesystem as exc:
            entry.update(filesystem=exc.name, label=exc.label, uuid=exc.uuid, supported=False)
            continue
        except Exception as exc:
            a.add(
                "Guest.Unreadable",
                f"{_where(vol)} could not be read ({type(exc).__name__}: {exc}); it was skipped",
                "warning",
            )
            continue
        if fs is not None:
            vol.fs = GuestFS(fs)
            entry.update(filesystem=fs.kind, label=fs.label, uuid=fs.uuid, supported=True)
    return volumes


def filesystem_findings(volumes: list[Volume], a: Analysis) -> bool:
    """Findings about filesystems; whether any supported filesystem exists."""
    supported = [v for v in volumes if v.fs is not None]
    unsupported = [
        v for v in volumes if v.entry.get("supported") is False and v.entry["filesystem"] != "swap"
    ]
    for v in unsupported:
        name = v.entry["filesystem"]
        a.add(
            "Guest.UnsupportedFilesystem",
            f"{_where(v)} holds {name}, which the validator cannot read; "
            + ("nothing on this disk could be checked: " if not supported else "it was not checked: ")
            + "move the root and /boot filesystems to ext4, xfs, btrfs or ntfs (no LVM or encryption), or "
            "import the disk as a data volume",
            "error" if not supported else "warning",
        )
    if not supported and not unsupported:
        a.add(
            "Guest.NoFilesystem",
            "no partition holds a recognisable filesystem (ext2/3/4, xfs, btrfs, vfat, ntfs); check that the "
            "system disk was exported, not an empty, encrypted or LVM/RAID member disk",
        )
    return bool(supported)
