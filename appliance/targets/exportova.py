"""The OVA export: every disk as a streamOptimized VMDK in scratch (its sha256 computed as it is written,
for the ``.mf``), then the OVA (:func:`appliance.image.ovawrite.write_ova`: ``.ovf``, ``.mf``, disks) streamed
into the destination; scratch files removed whatever happens."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import partials
from ..config import Config
from ..errors import UsageError
from ..image.ovawrite import OvaDiskFile, write_ova
from ..image.vmdkwriter import ByteSink, write_stream_vmdk
from ..progress import ProgressCallback, ProgressTracker
from .base import storage_error
from .diskexport import ExportResult, wants_full_sha256
from .exportcheck import SourceCheck
from .exportdest import FileDestination, FileSink, S3Destination
from .exportraw import open_source


@dataclass(frozen=True)
class OvaSource:
    """A disk of an OVA export: the RAW source and the member name its VMDK gets (default diskN.vmdk)."""

    path: Path
    name: str | None = None


def export_ova(
    sources: list[OvaSource],
    destination: FileDestination | S3Destination,
    *,
    name: str,
    config: Config,
    workdir: Path,
    firmware: str = "bios",
    platform: str = "linux",
    cpus: int = 1,
    memory_mib: int = 1024,
    threads: int = 0,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    ledger: partials.Ledger | None = None,
    full_sha256: bool | None = None,
    source_checks: list[SourceCheck | None] | None = None,
) -> ExportResult:
    """The disks ``sources`` (boot disk first) as one OVA of VM ``name`` (module docstring).
    ``firmware`` is ``efi`` for a guest that validated as UEFI, else ``bios``. Each disk's VMDK gets
    its whole sha256 (the ``.mf`` lists it); the OVA's too unless ``full_sha256`` is False.
    ``source_checks``: per disk, what :func:`export_disk`'s ``source_check`` is (verified once the disk
    was read, before its VMDK is packed)."""
    started = time.monotonic()
    if not sources:
        raise UsageError("an OVA export needs at least one disk")
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise UsageError(f"OVA name {name!r}: a plain name")
    sizes = []
    for s in sources:
        with open_source(s.path) as (_fd, size):
            sizes.append(size)
    tracker = ProgressTracker("exporting", 2 * sum(sizes), on_progress)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        tracker.update(done)

    packed: list[OvaDiskFile] = []
    disks: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        for i, (s, size) in enumerate(zip(sources, sizes, strict=True), 1):
            member = s.name or f"{name}-disk{i}.vmdk"
            tmp = stack.enter_context(partials.partial_file(Path(workdir) / member, ledger))
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            sink = FileSink(fd, full=True, chunked=False)  # the .mf lists each VMDK's sha256
            try:
                check = (source_checks or [])[i - 1] if source_checks and i <= len(source_checks) else None
                with open_source(s.path) as (src_fd, _):
                    base = done

                    def step(d: int, base: int = base) -> None:
                        tracker.update(base + d)

                    result = write_stream_vmdk(
                        src_fd,
                        size,
                        sink,
                        extent_name=member,
                        threads=threads,
                        cancel=cancel,
                        on_progress=step,
                        on_read=check.read if check is not None else None,
                    )
                    if check is not None:
                        check.verify(size)
                    done = base + size
                os.ftruncate(fd, sink.offset)
                full, _chunked = sink.digests()
            except OSError as exc:
                raise storage_error(exc, f"scratch ({tmp.name})") from exc
            finally:
                sink.close()
                os.close(fd)
            sha256 = str(full)
            packed.append(OvaDiskFile(tmp, member, sha256, result.virtual_size, result.data_bytes))
            disks.append(
                {
                    "name": member,
                    "virtual_size": result.virtual_size,
                    "size": result.size,
                    "sha256": sha256,
                    "source": str(s.path),
                }
            )

        packed_bytes = max(1, sum(p.path.stat().st_size for p in packed))

        def produce(sink: ByteSink) -> None:
            write_ova(
                sink,
                name,
                packed,
                cpus=cpus,
                memory_mib=memory_mib,
                firmware=firmware,
                platform=platform,
                on_progress=lambda n: advance(n * sum(sizes) // packed_bytes),
                cancel=cancel,
            )

        location = destination.stream(
            produce,
            size_hint=packed_bytes + (64 << 10),
            full_sha256=wants_full_sha256("ova", sum(sizes)) if full_sha256 is None else full_sha256,
        )
    tracker.finish()
    return ExportResult(
        "ova",
        None,
        sum(sizes),
        int(location["size"]),
        location.get("sha256"),
        location,
        time.monotonic() - started,
        disks,
    )
