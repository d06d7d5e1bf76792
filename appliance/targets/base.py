"""What a target is: where converted disks end up.

Two kinds, chosen by configuration (``targets.volume`` / ``targets.image``, each ``{"type": ...}``):

- a :class:`VolumeTarget` gives the converter a writable file or block device (:class:`Volume`) of at
  least the requested size, for ImportVolume/ImportInstance; the RAW disk is written onto it (by
  ``qemu-img convert -n -O raw SRC volume.path`` or :func:`.rawio.write_raw`), then
  :meth:`~VolumeTarget.finalize` flushes and detaches it;
- an :class:`ImageTarget` stores a finished image file (ImportImage/ImportSnapshot results).

Every target is idempotent in ``delete`` (the undo path): a resource that is already gone is fine.
This module also holds the coded errors shared by the implementations; the byte-level writing (the
sparse-aware copy, zeroing, flushing) is :mod:`.rawio`.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .. import schemas
from ..errors import Cancelled, ConfigError, ImagingError
from ..partials import Ledger
from ..progress import ProgressCallback
from .encryption import Encryption


class TargetError(ImagingError):
    """A target could not be prepared, written, finalized or removed; ``code`` says which way."""

    code = "TargetError"


class InsufficientStorage(TargetError):
    """The target's storage is full (ENOSPC/EDQUOT while writing, or below its free-space floor)."""

    code = "InsufficientStorage"


@dataclass(frozen=True)
class Volume:
    """A writable disk of ``size`` bytes at ``path`` (a regular file or a block device).

    ``info`` is JSON-able and is what the caller stores in the task: :meth:`VolumeTarget.reopen`
    and :meth:`VolumeTarget.delete` take it back after a worker restart. It always holds ``type``,
    ``volume_id``, ``path``, ``size`` and ``zeroed`` (whether unwritten ranges already read as zeros,
    which lets writers skip holes).
    """

    id: str
    path: Path
    size: int
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class VolumeTarget(Protocol):
    """Creates, finds again, finalizes and deletes volumes for conversion tasks."""

    def create(
        self,
        task_id: str,
        size_bytes: int,
        *,
        availability_zone: str | None = None,
        client_token: str | None = None,
    ) -> Volume:
        """A new volume of at least ``size_bytes``, ready to be written.

        ``client_token`` names this creation, as EC2's CreateVolume ClientToken does: a target that
        honours it returns, for a token an earlier create was given, the volume that create made or began
        to make (emptied again), so a step run again after a crash never leaves a volume behind. The
        file target honours it; see each target for the others.
        """
        ...

    def reopen(self, volume_info: Mapping[str, Any]) -> Volume:
        """The volume described by ``volume_info`` (from :attr:`Volume.info`), writable again."""
        ...

    def finalize(self, volume: Volume) -> dict[str, Any]:
        """Flush (and detach where that applies); return the description stored in the task result."""
        ...

    def delete(self, volume_info: Mapping[str, Any]) -> None:
        """Undo :meth:`create`; a volume that is already gone is fine."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings and state worth showing in ``/v1/info`` (never credentials)."""
        ...


@runtime_checkable
class ImageTarget(Protocol):
    """Stores finished image files and deletes them again."""

    #: the server-side encryption algorithms (:mod:`.encryption`) :meth:`store` can apply; empty
    #: for a target that cannot encrypt
    sse_algorithms: frozenset[str]

    def store(
        self,
        task_id: str,
        path: Path,
        *,
        format: str,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        ledger: Ledger | None = None,
        encryption: Encryption | None = None,
        fence: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Store ``path`` for ``task_id``; returns the location (with ``type``), ``size``, ``sha256``
        and ``encryption``: the encryption the stored image has (``Encryption.to_dict()``, or None).

        A target that writes a local partial file announces it to ``ledger`` (see
        :mod:`appliance.partials`) before it exists. With ``encryption`` the image is stored
        encrypted so, or not at all (``EncryptionNotSupported``, ``EncryptionNotApplied``).
        ``fence`` is called right before the image is published (the file renamed into place, the
        object's upload completed): it raises when the task's run lost its lease, and nothing is
        published then.
        """
        ...

    def delete(self, location: Mapping[str, Any]) -> None:
        """Remove what :meth:`store` returned; already gone is fine."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings worth showing in ``/v1/info`` (never credentials)."""
        ...


def boto_client(service: str, settings: Mapping[str, Any], **botocore_config: Any) -> Any:
    """A boto3 client for a target's settings (``endpoint_url``, ``region``, ``access_key``,
    ``secret_key``), with standard retries; ``botocore_config`` adds or overrides botocore options.

    Each client comes from a private session: creating clients from the shared default session is
    not thread-safe. Without access_key/secret_key boto3's default credential chain applies.
    """
    # boto3 is heavy (about half a second to import) and only cloud targets and sources need it
    import boto3
    from botocore.config import Config as BotoConfig

    options: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": 5}, **botocore_config}
    return boto3.session.Session().client(
        service,
        endpoint_url=settings.get("endpoint_url"),
        region_name=settings.get("region"),
        aws_access_key_id=settings.get("access_key"),
        aws_secret_access_key=settings.get("secret_key"),
        config=BotoConfig(**options),
    )


def new_volume_id() -> str:
    """A fresh id in the EC2 form ``vol-`` + 17 hex digits."""
    return "vol-" + secrets.token_hex(9)[:17]


def validate_settings(settings: Mapping[str, Any], schema: dict[str, Any], where: str) -> dict[str, Any]:
    """Check target ``settings`` against ``schema``; :class:`ConfigError` names ``where.<key>``.

    Paths (config.py makes ``directory`` a :class:`Path`) are validated as strings.
    """
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    errors = sorted(schemas.validator_for(schema).iter_errors(plain), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            key = ".".join([where, *(str(p) for p in e.absolute_path)])
            lines.append(f"{key}: {e.message}")
        raise ConfigError("; ".join(lines))
    return plain


def remove_object(client: Any, bucket: str, key: str) -> None:
    """Delete ``s3://bucket/key`` and abort every multipart upload still open for exactly that key
    (not for the longer keys it begins); an object already gone is fine. Raises what S3 raises."""
    client.delete_object(Bucket=bucket, Key=key)
    listing = client.list_multipart_uploads(Bucket=bucket, Prefix=key)
    for upload in listing.get("Uploads", []):
        if upload["Key"] == key:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])


def check_cancel(cancel: threading.Event | None, what: str) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled")


def storage_error(exc: OSError, where: str) -> TargetError:
    """The coded error for an ``OSError`` raised while writing ``where``.

    Full storage (ENOSPC, EDQUOT) becomes :class:`InsufficientStorage`; anything else
    ``TargetWriteFailed``. Writers other than :func:`write_raw` (e.g. a qemu-img wrapper) may use it too.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return insufficient_storage(where, exc.strerror or os.strerror(exc.errno))
    return TargetError(f"cannot write {where}: {exc.strerror or exc}", "TargetWriteFailed")


def insufficient_storage(where: str, detail: str) -> InsufficientStorage:
    """The error of a write that found the storage of a target (``where``: a volume, an image file)
    full; ``detail`` says what reported it (the OS's words, or a tool's message).

    A full target is ``InsufficientStorage``; a full scratch disk is ``InsufficientScratch``
    (:func:`appliance.nospace.no_space_error`): the operator frees space in a different place.
    """
    return InsufficientStorage(
        f"no space left on the storage of {where}: free space or enlarge the target storage, "
        f"or lower the size of the image ({detail})"
    )
