"""The export step's writer interface over the export writers: a disk (:func:`export_disk`) or several
as one OVA (:func:`export_ova`) written to an S3 object by a multipart upload, removed on any failure."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import partials
from ..config import Config
from ..progress import ProgressCallback
from .base import TargetError, boto_client, remove_object
from .diskexport import ExportResult, export_disk
from .exportcheck import SourceCheck
from .exportdest import S3Destination
from .exportova import OvaSource, export_ova


def _location(result: ExportResult) -> dict[str, Any]:
    """What an export to S3 wrote: its location without ``type``."""
    return {k: v for k, v in result.location.items() if k != "type"}


class StreamingExportWriter:
    """The export step's writer interface ("write this source disk as format F to S3 key K, report
    progress, abort cleanly": ``write(source, *, disk_format, bucket, key, workdir, metadata, …)`` and
    ``remove(bucket, key)``) over these writers: a VMDK or RAW disk streams straight into a parallel
    multipart upload, a VHD goes through qemu-img in scratch. The S3 client is made from
    ``config.sources.s3`` (the user's buckets)."""

    def __init__(self, config: Config, *, part_size: int = 64 << 20, threads: int = 4) -> None:
        self.config = config
        self.part_size, self.threads = part_size, threads
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = boto_client("s3", self.config.sources.s3, max_pool_connections=self.threads + 2)
        return self._client

    def write(
        self,
        source: Path,
        *,
        disk_format: str,
        bucket: str,
        key: str,
        workdir: Path,
        metadata: Mapping[str, str],
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        fence: Callable[[], None] | None = None,
        ledger: partials.Ledger | None = None,
        source_check: SourceCheck | None = None,
    ) -> dict[str, Any]:
        """Write ``source`` as ``disk_format`` to ``s3://bucket/key`` with ``metadata`` (plus
        ``sha256``); returns ``{bucket, key, etag, sha256, size, parts, format, seconds}``.
        ``source_check``: :func:`export_disk`'s (a mismatch aborts the upload)."""

        def export(dest: S3Destination) -> ExportResult:
            return export_disk(
                source,
                disk_format,
                dest,
                config=self.config,
                workdir=workdir,
                on_progress=on_progress,
                cancel=cancel,
                ledger=ledger,
                source_check=source_check,
            )

        result = self._upload(bucket, key, metadata, cancel, fence, export)
        return _location(result) | {"format": result.format, "seconds": round(result.seconds, 3)}

    def write_ova(
        self,
        sources: list[Path],
        *,
        name: str,
        bucket: str,
        key: str,
        workdir: Path,
        metadata: Mapping[str, str],
        firmware: str = "bios",
        platform: str = "linux",
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        fence: Callable[[], None] | None = None,
        ledger: partials.Ledger | None = None,
        source_checks: list[SourceCheck | None] | None = None,
    ) -> dict[str, Any]:
        """The disks ``sources`` (boot disk first) as one OVA of VM ``name`` (:func:`export_ova`: the
        VMDKs in ``workdir``, then the tar streamed) to ``s3://bucket/key``; returns
        ``{bucket, key, etag, sha256, size, parts, format: "ova", seconds, disks, firmware}``."""

        def export(dest: S3Destination) -> ExportResult:
            return export_ova(
                [OvaSource(p) for p in sources],
                dest,
                name=name,
                config=self.config,
                workdir=workdir,
                firmware=firmware,
                platform=platform,
                on_progress=on_progress,
                cancel=cancel,
                ledger=ledger,
                source_checks=source_checks,
            )

        result = self._upload(bucket, key, metadata, cancel, fence, export)
        return _location(result) | {
            "format": "ova",
            "seconds": round(result.seconds, 3),
            "disks": result.disks,
            "firmware": firmware,
        }

    def _upload(
        self,
        bucket: str,
        key: str,
        metadata: Mapping[str, str],
        cancel: threading.Event | None,
        fence: Callable[[], None] | None,
        export: Callable[[S3Destination], ExportResult],
    ) -> ExportResult:
        """``export`` into a multipart upload to ``s3://bucket/key``; on any failure or cancel the
        upload aborts itself and a completed object is deleted (:meth:`remove`)."""
        dest = S3Destination(
            self.client,
            bucket,
            key,
            part_size=self.part_size,
            threads=self.threads,
            metadata=dict(metadata),
            cancel=cancel,
            fence=fence,
        )
        try:
            return export(dest)
        except BaseException:
            self.remove(bucket, key)
            raise

    def remove(self, bucket: str, key: str) -> None:
        """Delete the object and abort every incomplete multipart upload of its key (gone already: fine)."""
        try:
            remove_object(self.client, bucket, key)
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code == "NoSuchBucket":
                return
            raise TargetError(
                f"removing s3://{bucket}/{key} failed: {code or type(exc).__name__}", "TargetDeleteFailed"
            ) from exc
