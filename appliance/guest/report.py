"""The guest report: what validation found, as a value with a stable JSON form (issue5 contract A)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import Finding, Severity


def _empty_os() -> dict[str, Any]:
    return {"family": None, "distribution": None, "version": None, "pretty_name": None, "architecture": None}


@dataclass(frozen=True)
class GuestReport:
    """Layout, partitions, boot mode, operating system and the ``Guest.*`` findings of one image.

    ``details`` holds the rest of the probe's answer (``fstab`` entries, ``uefi_loaders``, …) and is
    merged into :meth:`to_dict`.
    """

    layout: str = "unknown"
    partition_table: str | None = None
    partitions: list[dict[str, Any]] = field(default_factory=list)
    boot_mode: str | None = None
    os: dict[str, Any] = field(default_factory=_empty_os)
    root: dict[str, Any] | None = None
    kernels: list[str] = field(default_factory=list)
    initrds: list[str] = field(default_factory=list)
    bootloader: dict[str, Any] | None = None
    findings: list[Finding] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        """The error findings (the image should not be imported as requested)."""
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def with_findings(self, findings: list[Finding]) -> GuestReport:
        """A copy with ``findings`` instead (errors first, then warnings, then info, each in order)."""
        order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
        return replace(self, findings=sorted(findings, key=lambda f: order[f.severity]))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the contract's keys, plus ``details`` and ``ok``."""
        d = dict(self.details)
        d.update(
            layout=self.layout,
            partition_table=self.partition_table,
            partitions=self.partitions,
            boot_mode=self.boot_mode,
            os=self.os,
            root=self.root,
            kernels=self.kernels,
            initrds=self.initrds,
            bootloader=self.bootloader,
            findings=[f.to_dict() for f in self.findings],
            ok=self.ok,
        )
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuestReport:
        """Rebuild a report from :meth:`to_dict` (or the probe's) output."""
        known = {
            "layout",
            "partition_table",
            "partitions",
            "boot_mode",
            "os",
            "root",
            "kernels",
            "initrds",
            "bootloader",
            "findings",
            "ok",
        }
        findings = [
            Finding(f["code"], Severity(f["severity"]), f["message"]) for f in data.get("findings", [])
        ]
        report = cls(
            layout=data.get("layout", "unknown"),
            partition_table=data.get("partition_table"),
            partitions=list(data.get("partitions") or []),
            boot_mode=data.get("boot_mode"),
            os={**_empty_os(), **(data.get("os") or {})},
            root=data.get("root"),
            kernels=list(data.get("kernels") or []),
            initrds=list(data.get("initrds") or []),
            bootloader=data.get("bootloader"),
            details={k: v for k, v in data.items() if k not in known},
        )
        return report.with_findings(findings)
