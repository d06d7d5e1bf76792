"""Export writers: "write this source disk as format F to S3 key K, report progress, abort cleanly".

:class:`ExportWriter` is the interface the export step (:mod:`appliance.steps.export`) writes
through; :func:`get_export_writer` picks the implementation. The first one,
:class:`QemuImgExportWriter`, converts the RAW source with ``qemu-img convert -f raw`` to a
scratch file (VMDK as ``subformat=streamOptimized``, VHD as a dynamic ``vpc``; RAW from a regular
file is uploaded as it is) under the sandbox policy (:func:`appliance.image.convert.convert_image`
runs qemu-img confined and re-inspects its output), then uploads it with the S3 image target's
multipart upload (sha256 user metadata, parts hashed as sent, the upload aborted on any failure or
cancel). The streaming writers (stream-VMDK writer, VHD writer, parallel multipart upload with
verified ETags) replace this implementation behind the same interface.

:meth:`ExportWriter.remove` deletes the object and aborts every incomplete multipart upload of its
key: what a cancelled or failed export, or the undo of a finished one, leaves behind is nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import Config
from ..image.convert import convert_image
from ..partials import Ledger
from ..progress import Progress, ProgressCallback
from .s3 import S3ImageTarget

#: DiskImageFormat (lower-case) → (qemu-img output format, subformat)
QEMU_FORMATS: dict[str, tuple[str, str | None]] = {
    "vmdk": ("vmdk", None),  # convert_image writes VMDK as subformat=streamOptimized
    "vhd": ("vhd", "dynamic"),
    "raw": ("raw", None),
}


@runtime_checkable
class ExportWriter(Protocol):
    """Writes one source disk as an exported object."""

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
        ledger: Ledger | None = None,
    ) -> dict[str, Any]:
        """Write the RAW disk ``source`` (a file or a block device) as ``disk_format`` (``vmdk``,
        ``vhd``, ``raw``) to ``s3://bucket/key`` with user ``metadata`` (plus ``sha256``); returns
        ``{bucket, key, etag, sha256, size, format, conversion}``. Intermediates go to ``workdir``
        (announced to ``ledger``) and are gone when this returns or raises. On any failure or
        ``cancel`` nothing is left in the bucket: no object, no incomplete multipart upload.
        ``fence`` is called right before the object is published."""
        ...

    def remove(self, bucket: str, key: str) -> None:
        """Delete ``s3://bucket/key`` and abort incomplete multipart uploads of that key."""
        ...


class _KeyedS3Target(S3ImageTarget):
    """The S3 image target's upload, to one given key of a given bucket."""

    def __init__(self, settings: Mapping[str, Any], bucket: str, key: str) -> None:
        super().__init__(dict(settings) | {"bucket": bucket, "prefix": ""})
        self._key = key

    def key_for(self, task_id: str, format: str) -> str:
        return self._key


class QemuImgExportWriter:
    """qemu-img to a scratch file, then the S3 multipart upload (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        #: boto3 settings for the user's buckets: the same as for S3 sources (endpoint, keys)
        self.s3_settings = dict(config.sources.s3)

    def _target(self, bucket: str, key: str) -> _KeyedS3Target:
        return _KeyedS3Target(self.s3_settings, bucket, key)

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
        ledger: Ledger | None = None,
    ) -> dict[str, Any]:
        fmt, subformat = QEMU_FORMATS[disk_format.lower()]
        target = self._target(bucket, key)
        converted: Path | None = None
        conversion: dict[str, Any] | None = None
        try:
            if fmt == "raw" and source.is_file():
                upload = source
            else:
                converted = workdir / f"export.{fmt}"

                def converting(p: Progress) -> None:
                    if on_progress is not None:
                        on_progress(Progress("converting", p.done, p.total, p.percent, p.rate, p.eta))

                result = convert_image(
                    source,
                    converted,
                    fmt,
                    "raw",
                    config=self.config,
                    workdir=workdir,
                    subformat=subformat,
                    on_progress=converting,
                    cancel=cancel,
                    ledger=ledger,
                )
                upload = result.dst
                conversion = {
                    "command": result.command,
                    "seconds": round(result.seconds, 3),
                    "subformat": result.subformat,
                    "bytes": result.output.actual_size,
                }
            stored = target.store(
                key,
                upload,
                format=fmt,
                on_progress=on_progress,
                cancel=cancel,
                fence=fence,
                metadata=metadata,
            )
        except BaseException:
            # the upload aborted itself; an object completed before a late failure goes too
            self.remove(bucket, key)
            raise
        finally:
            if converted is not None and converted.exists():
                converted.unlink()
                if ledger is not None:
                    ledger.ledger_removed(converted)
        stored.pop("type", None)
        stored.pop("encryption", None)
        return stored | {"format": disk_format.lower(), "conversion": conversion}

    def remove(self, bucket: str, key: str) -> None:
        self._target(bucket, key).delete({"bucket": bucket, "key": key})


def get_export_writer(config: Config) -> ExportWriter:
    """The export writer of this appliance."""
    return QemuImgExportWriter(config)
