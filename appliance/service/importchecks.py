"""The request checks of import tasks: what :class:`~.imports.ImportService` verifies before it
creates a task, independent of the wire protocol — a disk image's size and manifest URL, a disk
container's format and source (URL safety, S3 naming, enabled import methods, a staged upload that
is the caller's and complete), the disks of an image (how many, OVA alone, device names) and the
server-side encryption the configured image target can apply.

:class:`ImportChecks` is the base of the service; its public checks (:meth:`~ImportChecks.check_url`,
:meth:`~ImportChecks.check_method`, :meth:`~ImportChecks.check_containers`,
:meth:`~ImportChecks.encryption`) are what the HTTP layer calls before a dry run answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from ..config import Config
from ..errors import UsageError
from ..sources.methods import (
    S3,
    UPLOAD_SCHEME,
    check_enabled,
    is_upload_url,
    method_of_manifest,
    method_of_url,
)
from ..sources.s3names import check_bucket, check_key
from ..sources.staged import UploadArea
from ..sources.stagedproto import parse_upload_url
from ..sources.urlfilter import UrlPolicy, parse_s3_url
from ..targets import ImageTarget, get_image_target
from ..targets.encryption import Encryption, EncryptionNotSupported, requested
from ..timestamps import format_time, utc_now
from . import expected
from .importtasks import (
    DEVICE_NAME,
    MAX_IMAGE_DISKS,
    NO_ACCOUNT,
    VOLUME_FORMATS,
    DiskContainer,
    DiskImage,
    GiB,
    device_names,
)


class ImportChecks:
    """The checks of import requests against the configuration (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._policy: UrlPolicy | None = None
        self._image_target: ImageTarget | None = None

    def check_url(self, url: str) -> None:
        """Refuse an URL the SSRF policy would refuse at fetch time (raises ``UrlNotAllowed``)."""
        if self._policy is None:
            self._policy = UrlPolicy.from_config(self.config.sources)
        self._policy.check(url)

    def encryption(self, encrypted: bool, kms_key_id: str | None) -> Encryption | None:
        """The server-side encryption an ImportImage/ImportSnapshot asks for (None: none), by EC2's
        rules (:func:`appliance.targets.encryption.requested`: ``InvalidParameterDependency``,
        ``InvalidParameterValue``), refused with ``EncryptionNotSupported`` when the configured image
        target cannot apply it."""
        wanted = requested(encrypted, kms_key_id)
        self._check_encryption(wanted)
        return wanted

    def _check_encryption(self, wanted: Encryption | None) -> dict[str, Any]:
        """The task parameters of ``wanted`` once the image target is known to be able to apply it."""
        if wanted is None:
            return {"encrypted": False}
        if self._image_target is None:
            self._image_target = get_image_target(self.config)
        if wanted.algorithm not in self._image_target.sse_algorithms:
            kind = self.config.targets["image"]["type"]
            what = (
                "does not encrypt the images it stores"
                if not self._image_target.sse_algorithms
                else f"cannot encrypt with {wanted.algorithm}"
            )
            raise EncryptionNotSupported(
                f"Encrypted=true cannot be honoured: this appliance stores images with the {kind} image "
                f"target (targets.image.type: {kind}), which {what}; import without Encrypted and "
                "KmsKeyId, or have the operator configure the s3 image target"
            )
        return {"encrypted": True, "kms_key_id": wanted.kms_key_id}

    def _expiration(self) -> str:
        return format_time(utc_now() + timedelta(hours=self.config.expiration_hours))

    def _disk_image(self, image: DiskImage) -> dict[str, Any]:
        fmt = (image.format or "").upper()
        if fmt not in VOLUME_FORMATS:
            raise UsageError(f"Image.Format {image.format!r} is not one of {', '.join(VOLUME_FORMATS)}")
        if image.bytes <= 0:
            raise UsageError("Image.Bytes must be the size of the disk image in bytes, greater than 0")
        if image.volume_size < 1:
            raise UsageError("Volume.Size must be at least 1 (GiB)")
        if image.bytes > image.volume_size * GiB and fmt != "VHD":
            # RAW: the file is the disk; VMDK: euca2ools sends the virtual size. A VHD's size is
            # only known from its footer, checked again when the upload is inspected.
            raise UsageError(
                f"the {fmt} image is {image.bytes} bytes but Volume.Size is {image.volume_size} GiB; "
                f"use a volume of at least {-(-image.bytes // GiB)} GiB"
            )
        self.check_method(method_of_manifest(image.manifest_url), "ImportManifestUrl")
        if is_upload_url(image.manifest_url):
            parse_upload_url(image.manifest_url)  # the upload itself may come later: the task waits for it
        elif not image.manifest_url.startswith(("https://", "http://")):
            # the manifest and its parts are read over HTTP (presigned URLs), never as s3://
            raise UsageError(
                f"ImportManifestUrl {image.manifest_url[:120]!r} must be the presigned https:// URL "
                "of the import manifest (or upload://ID, a staged upload)"
            )
        else:
            self.check_url(image.manifest_url)
        return {
            "image_format": fmt,
            "image_bytes": image.bytes,
            "manifest_url": image.manifest_url,
            "volume_size": image.volume_size,
            "expiration_time": self._expiration(),
        }

    def _container(
        self,
        c: DiskContainer,
        formats: Sequence[str],
        account: str = NO_ACCOUNT,
        prefix: str = "DiskContainer",
    ) -> dict[str, Any]:
        """The task parameters of one disk container (``prefix``: its name in the request, e.g.
        ``DiskContainer.2``); its expected sha256 in lower-case hex when it gives one."""
        fmt = c.format.upper() if c.format else None
        if fmt is not None and fmt not in formats:
            raise UsageError(f"disk container format {c.format!r} is not one of {', '.join(formats)}")
        if not (c.url or c.bucket or c.key):
            raise UsageError("give a disk container its source: a Url or a UserBucket (S3Bucket and S3Key)")
        if c.url and (c.bucket or c.key):
            raise UsageError("give a disk container either Url or UserBucket (S3Bucket and S3Key), not both")
        if c.url:
            if not c.url.startswith(("s3://", "https://", "http://", UPLOAD_SCHEME)):
                raise UsageError(f"Url {c.url!r} must be an s3://, https:// or upload:// URL")
            self.check_method(method_of_url(c.url), "Url")
            if c.url.startswith("s3://"):
                parse_s3_url(c.url)  # S3's naming rules for the bucket and the key
            elif is_upload_url(c.url):
                self.uploads.ready(account, parse_upload_url(c.url))  # the caller's, and complete
            else:
                self.check_url(c.url)
        elif not (c.bucket and c.key):
            raise UsageError("UserBucket needs both S3Bucket and S3Key")
        else:
            self.check_method(S3, "UserBucket")
            check_bucket(c.bucket, "UserBucket.S3Bucket")
            check_key(c.key, "UserBucket.S3Key")
        out = asdict(c) | {"format": fmt}
        digest = out.pop("expected_sha256")  # only a disk that has one carries one (as ever)
        if digest:
            out["expected_sha256"] = expected.check_sha256(digest, f"{prefix}.{expected.MEMBER}")
        return out

    def check_method(self, method: str, what: str) -> None:
        """Refuse an import method the operator did not enable (``ImportMethodDisabled``)."""
        check_enabled(self.config.sources, method, what)

    def check_containers(self, containers: Sequence[DiskContainer]) -> None:
        """The import method of each disk container is enabled (checked before a dry run answers)."""
        for c in containers:
            if c.url:
                self.check_method(method_of_url(c.url), "Url")
            elif c.bucket or c.key:
                self.check_method(S3, "UserBucket")

    @property
    def uploads(self) -> UploadArea:
        return UploadArea.from_sources(self.config.sources)

    def check_image_disks(self, containers: Sequence[DiskContainer]) -> None:
        """The disks of an ImportImage: at least one, at most :data:`MAX_IMAGE_DISKS`, an OVA as the
        only one, each DeviceName a device name and no two disks at the same device."""
        if not containers:
            raise UsageError("ImportImage needs a DiskContainer")
        if len(containers) > MAX_IMAGE_DISKS:
            raise UsageError(
                f"ImportImage takes at most {MAX_IMAGE_DISKS} DiskContainers (disks of one image), not "
                f"{len(containers)}; import further disks with ImportSnapshot"
            )
        if len(containers) > 1 and any((c.format or "").upper() == "OVA" for c in containers):
            raise UsageError(
                "an OVA carries the disks of its VM: give it as the only DiskContainer (its data disks "
                "are imported with its boot disk)"
            )
        names = [c.device_name for c in containers]
        for n, name in enumerate(names, 1):
            if name is not None and not DEVICE_NAME.match(name):
                raise UsageError(
                    f"DiskContainer.{n}.DeviceName {name[:40]!r} is not a device name such as /dev/sdb"
                )
        named = device_names(names)
        if len(set(named)) != len(named):
            dup = next(d for d in named if named.count(d) > 1)
            raise UsageError(
                f"two disks of the image would be {dup}: give each DiskContainer its own DeviceName"
            )
