"""Targets: where converted disks are written, chosen by ``config.targets``.

``get_volume_target(config)`` returns the :class:`~.base.VolumeTarget` of ``targets.volume.type``
(``file``, ``device``, ``ec2``); ``get_image_target(config)`` the :class:`~.base.ImageTarget` of
``targets.image.type`` (``file``, ``s3``). Implementations are imported on demand, so boto3 is
only loaded when a cloud target is configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import ImageTarget, InsufficientStorage, TargetError, Volume, VolumeTarget, write_raw

if TYPE_CHECKING:
    from ..config import Config

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
        from .file import FileVolumeTarget

        return FileVolumeTarget.from_settings(settings)
    if kind == "device":
        from .device import DeviceVolumeTarget

        return DeviceVolumeTarget.from_settings(settings)
    if kind == "ec2":
        from .ec2 import Ec2VolumeTarget

        return Ec2VolumeTarget.from_settings(settings)
    raise ConfigError(f"targets.volume.type: unknown volume target {kind!r} (file, device, ec2)")


def get_image_target(config: Config) -> ImageTarget:
    """The image target configured in ``targets.image``; :class:`ConfigError` for bad settings."""
    settings = config.targets["image"]
    kind = settings.get("type")
    if kind == "file":
        from .file import FileImageTarget

        return FileImageTarget.from_settings(settings)
    if kind == "s3":
        from .s3 import S3ImageTarget

        return S3ImageTarget.from_settings(settings)
    raise ConfigError(f"targets.image.type: unknown image target {kind!r} (file, s3)")
