"""Converting an untrusted OVA: every disk unpacked, verified and inspected
(:func:`appliance.image.ova.unpack_ova`), then converted with :func:`appliance.image.convert.convert_image`,
boot disk first."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..partials import Ledger
from ..progress import Progress
from .convert import ConversionResult, convert_image
from .ova import unpack_ova


@dataclass(frozen=True)
class OvaConversion:
    """An OVA converted: the package's facts and each disk's conversion, boot disk first."""

    package: dict[str, Any]
    outputs: list[ConversionResult]

    def to_dict(self) -> dict[str, Any]:
        return {"ova": self.package, "outputs": [o.to_dict() for o in self.outputs]}


def output_names(dst: Path, count: int) -> list[Path]:
    """Where the disks of an OVA converted to ``dst`` go: ``dst`` for the boot disk, then
    ``<stem>-disk2<suffix>``, ``<stem>-disk3<suffix>``, … beside it."""
    return [dst] + [dst.with_name(f"{dst.stem}-disk{i}{dst.suffix}") for i in range(2, count + 1)]


def convert_ova(
    src: Path,
    dst: Path,
    to_format: str,
    *,
    config: Config,
    workdir: Path,
    subformat: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
    ledger: Ledger | None = None,
) -> OvaConversion:
    """Unpack and verify the OVA ``src`` (:func:`unpack_ova`, in ``workdir``) and convert each disk
    (boot disk first) to ``to_format`` at :func:`output_names`. A rejected OVA writes nothing; a failed
    conversion removes the outputs already written."""
    directory = Path(workdir) / f"ova.{os.getpid()}.{threading.get_ident()}"
    with open(src, "rb") as f:
        package = unpack_ova(f, directory, config=config, cancel=cancel)
    written: list[Path] = []
    try:
        outputs = []
        for disk, out in zip(package.disks, output_names(Path(dst), len(package.disks)), strict=True):
            assert disk.inspection is not None
            outputs.append(
                convert_image(
                    disk.path,
                    out,
                    to_format,
                    disk.inspection.format,
                    config=config,
                    workdir=workdir,
                    subformat=subformat,
                    on_progress=on_progress,
                    cancel=cancel,
                    ledger=ledger,
                )
            )
            written.append(out)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        package.remove()
    return OvaConversion(package.to_dict(), outputs)
