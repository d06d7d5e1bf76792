"""Targets: where converted disks are written, chosen by ``config.targets``.

``get_volume_target(config)`` returns the :class:`~.base.VolumeTarget` of ``targets.volume.type``
(``file``, ``device``, ``ec2``); ``get_image_target(config)`` the :class:`~.base.ImageTarget` of
``targets.image.type`` (``file``, ``s3``). The cloud targets (``ec2``, ``s3``) are imported on
demand, so boto3 is only loaded when one is configured.

Exports write through :class:`~.export.ExportWriter` (``get_export_writer(config)`` in
:mod:`.export`); reading a cloud instance's disk for an export is :mod:`.ec2_export`.
"""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError
from .base import ImageTarget, InsufficientStorage, TargetError, Volume, VolumeTarget
from .device import DeviceVolumeTarget
from .file import FileImageTarget, FileVolumeTarget
from .rawio import write_raw

__all__ = [
    "ImageTarget",
    "InsufficientStorage",
    "TargetError",
    "Volume",
    "VolumeTarget",
    "get_image_target",
    "get_volume_target",
    "write_raw",
]


def get_volume_target(config: Config) -> VolumeTarget:
    """The volume target configured in ``targets.volume``; :class:`ConfigError` for bad settings."""
    settings = config.targets["volume"]
    kind = settings.get("type")
    if kind == "file":
        return FileVolumeTarget.from_settings(settings)
    if kind == "device":
        return DeviceVolumeTarget.from_settings(settings)
    if kind == "ec2":
        from .ec2 import Ec2VolumeTarget  # boto3: heavy, loaded only for a cloud target

        return Ec2VolumeTarget.from_settings(settings)
    raise ConfigError(f"targets.volume.type: unknown volume target {kind!r} (file, device, ec2)")


def get_image_target(config: Config) -> ImageTarget:
    """The image target configured in ``targets.image``; :class:`ConfigError` for bad settings."""
    settings = config.targets["image"]
    kind = settings.get("type")
    if kind == "file":
        return FileImageTarget.from_settings(settings)
    if kind == "s3":
        from .s3 import S3ImageTarget  # boto3: heavy, loaded only for a cloud target

        return S3ImageTarget.from_settings(settings)
    raise ConfigError(f"targets.image.type: unknown image target {kind!r} (file, s3)")
