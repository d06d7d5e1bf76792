"""Import tasks: the appliance side of VM Import (ImportVolume, ImportInstance, ImportImage, ImportSnapshot).

:class:`ImportService` turns validated import requests into tasks in the store, each run by the
worker through the shipped workflow of its kind (``appliance/workflows/<kind>.yaml``). It owns the
rules that do not depend on the wire protocol: task id forms, the active-task limit, size sanity,
URL safety (checked when the request arrives, again on every fetch), idempotency tokens,
server-side encryption (what a request may ask of the configured image target) and
cancellation. The HTTP layer (``api/ec2``) only parses, calls this and renders.

The active-task limit and the client tokens are enforced by the store when it creates the task
(:meth:`~appliance.store.Store.create_task`): the API's worker processes each run a service, and
only the store sees all of their requests at once.

Tenancy: every task belongs to the account that created it (:class:`Caller`); a caller describes
and cancels only the tasks of the accounts it sees, and to it any other task does not exist (the
same ``TaskNotFound`` as an unknown id). Every look-up is a query of the store by id and account,
so any appliance sharing the store answers for tasks another one created.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from ..config import Config, Credential
from ..errors import IncorrectState, InvalidTaskId, ResourceLimitExceeded, TaskNotFound, UsageError
from ..sources.methods import (
    S3,
    UPLOAD_SCHEME,
    check_enabled,
    is_upload_url,
    method_of_manifest,
    method_of_url,
)
from ..sources.s3names import check_bucket, check_key
from ..sources.staged import UploadArea, parse_upload_url
from ..sources.urlfilter import UrlPolicy, parse_s3_url
from ..store import ActiveTaskLimit, Store, Task
from ..targets import ImageTarget, get_image_target
from ..targets.encryption import Encryption, EncryptionNotSupported, requested
from ..timestamps import format_time, utc_now
from ..workflow.engine import Engine
from . import bootparams, expected

GiB = 1 << 30

IMPORT_VOLUME = "import-volume"
IMPORT_INSTANCE = "import-instance"
IMPORT_IMAGE = "import-image"
IMPORT_SNAPSHOT = "import-snapshot"
CONVERSION_KINDS = (IMPORT_VOLUME, IMPORT_INSTANCE)
IMAGE_KINDS = (IMPORT_IMAGE,)
SNAPSHOT_KINDS = (IMPORT_SNAPSHOT,)
KINDS = CONVERSION_KINDS + IMAGE_KINDS + SNAPSHOT_KINDS

_PREFIX = {
    IMPORT_VOLUME: "import-vol-",
    IMPORT_INSTANCE: "import-i-",
    IMPORT_IMAGE: "import-ami-",
    IMPORT_SNAPSHOT: "import-snap-",
}
#: the id forms EC2 clients know: 8 lower-case alphanumerics for conversion tasks (and the 17
#: hex digits of newer ids), 17 hex digits for image and snapshot imports
TASK_ID_PATTERNS = {
    IMPORT_VOLUME: re.compile(r"^import-vol-(?:[a-z0-9]{8}|[0-9a-f]{17})$"),
    IMPORT_INSTANCE: re.compile(r"^import-i-(?:[a-z0-9]{8}|[0-9a-f]{17})$"),
    IMPORT_IMAGE: re.compile(r"^import-ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$"),
    IMPORT_SNAPSHOT: re.compile(r"^import-snap-(?:[0-9a-f]{8}|[0-9a-f]{17})$"),
}
_ALNUM = string.ascii_lowercase + string.digits

#: formats of the legacy conversion tasks (DiskImageFormat) and of image/snapshot imports
VOLUME_FORMATS = ("VMDK", "RAW", "VHD")
CONTAINER_FORMATS = ("VMDK", "RAW", "VHD", "VHDX")
#: ImportImage also takes an OVA (its boot disk becomes the image, its other disks data disks)
IMAGE_CONTAINER_FORMATS = (*CONTAINER_FORMATS, "OVA")
#: disks of one ImportImage (its DiskContainers, or the disks of its OVA): AWS's limit of volumes
#: per imported VM ("At most 21 volumes per VM; import extra disks with ImportSnapshot")
MAX_IMAGE_DISKS = 21
#: the device names the disks of an image get unless their DiskContainer names one: the boot disk
#: /dev/sda1 (as AWS's imported images), the data disks /dev/sdb, /dev/sdc, … in request order
BOOT_DEVICE = "/dev/sda1"
_DEVICE_NAME = re.compile(r"^/dev/(?:sd|xvd|hd|vd)[a-z]{1,2}[0-9]{0,2}$")


def device_names(given: Sequence[str | None]) -> list[str]:
    """The device name of each disk of an image: the one its DiskContainer gave, else /dev/sda1 for
    the first (boot) disk and /dev/sd{b,c,…} by position for the others."""
    return [
        name or (BOOT_DEVICE if n == 0 else f"/dev/sd{chr(ord('a') + n)}") for n, name in enumerate(given)
    ]


@dataclass(frozen=True)
class DiskImage:
    """One disk of a legacy conversion task: what the client uploaded and the volume it wants."""

    format: str
    bytes: int
    manifest_url: str
    volume_size: int
    description: str | None = None


@dataclass(frozen=True)
class DiskContainer:
    """One disk of an ImportImage/ImportSnapshot request: an URL or a bucket/key."""

    format: str | None = None
    url: str | None = None
    bucket: str | None = None
    key: str | None = None
    description: str | None = None
    device_name: str | None = None


#: the account of tasks recorded without one: tasks of ``imaging run`` and of the controller (pull
#: mode), and API tasks from before accounts existed
NO_ACCOUNT = ""


@dataclass(frozen=True)
class Caller:
    """Whom a request acts for: ``account`` owns the tasks it creates (and scopes its client
    tokens); ``sees`` are the accounts whose tasks it may describe and cancel (None: every
    account, the operator's view). The default is the operator: no account, sees everything."""

    account: str = NO_ACCOUNT
    sees: frozenset[str] | None = None

    @classmethod
    def of(cls, credential: Credential) -> Caller:
        """An API key acting for its own account. A key configured without an account (its access
        key names its account) also sees the tasks recorded without one, so a set-up from before
        accounts existed keeps seeing the tasks it created then."""
        sees = {credential.account} if credential.account_configured else {credential.account, NO_ACCOUNT}
        return cls(credential.account, frozenset(sees))

    @classmethod
    def acting_for(cls, account: str) -> Caller:
        """A front end acting for ``account``: its tasks only."""
        return cls(account, frozenset({account}))


def new_task_id(kind: str) -> str:
    """A fresh id of the form EC2 clients expect for ``kind``."""
    if kind in CONVERSION_KINDS:
        return _PREFIX[kind] + "".join(secrets.choice(_ALNUM) for _ in range(8))
    return _PREFIX[kind] + secrets.token_hex(9)[:17]


def kind_of(task_id: str) -> str | None:
    """The task kind whose id form ``task_id`` has, or None."""
    for kind, pattern in TASK_ID_PATTERNS.items():
        if pattern.match(task_id):
            return kind
    return None


class ImportService:
    """Creates, lists and cancels import tasks. Thread-safe as far as the store is."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.store = store or Store(config.store)
        self._engine: Engine | None = None
        self._policy: UrlPolicy | None = None
        self._image_target: ImageTarget | None = None

    # -- helpers --------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.config, self.store)
        return self._engine

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

    def _submit(
        self, kind: str, params: dict[str, Any], *, client_token: str | None = None, account: str = NO_ACCOUNT
    ) -> Task:
        """Create the task unless ``tasks.max_active`` tasks are active; with a ``client_token``
        that ``account`` already used for the same request, the task created then."""
        # Absent optional members are left out so the workflow's declared defaults apply.
        params = {k: v for k, v in params.items() if v is not None}
        try:
            task_id = self.engine.submit(
                kind,
                params,
                task_id=new_task_id(kind),
                kind=kind,
                max_active=self.config.max_active_tasks,
                client_token=client_token,
                client_account=account,
            )
        except ActiveTaskLimit as exc:
            raise ResourceLimitExceeded(
                f"{exc.message}; wait for one to finish or cancel one "
                "(tasks.max_active in the appliance configuration)"
            ) from exc
        return self.store.get_task(task_id)

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
        self, c: DiskContainer, formats: Sequence[str], account: str = NO_ACCOUNT
    ) -> dict[str, Any]:
        fmt = c.format.upper() if c.format else None
        if fmt is not None and fmt not in formats:
            raise UsageError(f"disk container format {c.format!r} is not one of {', '.join(formats)}")
        if bool(c.url) == bool(c.bucket or c.key):
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
        return asdict(c) | {"format": fmt}

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

    # -- creating -------------------------------------------------------------------------------

    def import_volume(
        self,
        image: DiskImage,
        *,
        availability_zone: str | None,
        description: str | None,
        account: str = NO_ACCOUNT,
        signed_manifest: bool = False,
        volume_id: str | None = None,
        expected_sha256: str | None = None,
    ) -> Task:
        """ImportVolume: a disk uploaded as manifest parts, written as RAW onto a new volume of
        ``account``. Pull mode passes ``signed_manifest`` (the URL is a Eucalyptus download manifest,
        verified against the cloud certificate) and the ``volume_id`` the cloud created for it.
        ``expected_sha256`` (beyond AWS, :mod:`appliance.service.expected`): the upload's sha256."""
        params = self._disk_image(image) | {
            "availability_zone": availability_zone,
            "description": description,
            "signed_manifest": signed_manifest or None,
            "volume_id": volume_id,
            "expected_sha256": _expected(expected_sha256),
        }
        return self._submit(IMPORT_VOLUME, params, account=account)

    def import_instance(
        self,
        image: DiskImage,
        *,
        platform: str,
        architecture: str | None,
        instance_type: str | None,
        description: str | None,
        launch: dict[str, Any],
        kernel_id: str | None = None,
        ramdisk_id: str | None = None,
        virtualization_type: str | None = None,
        account: str = NO_ACCOUNT,
        expected_sha256: str | None = None,
    ) -> Task:
        """ImportInstance (single volume, like AWS): the volume import plus the launch description,
        for ``account``; ``expected_sha256`` as for :meth:`import_volume`.

        ``kernel_id``/``ramdisk_id``/``virtualization_type`` (beyond AWS, see
        :mod:`appliance.service.bootparams`) are validated and recorded for the controller.
        """
        boot = bootparams.check(kernel_id, ramdisk_id, virtualization_type)
        params = self._disk_image(image) | {
            "availability_zone": (launch.get("Placement") or {}).get("AvailabilityZone"),
            "description": description,
            "volume_description": image.description,
            "platform": platform,
            "architecture": architecture,
            "instance_type": instance_type,
            "launch": launch,
            "expected_sha256": _expected(expected_sha256),
        }
        params |= boot.to_dict()
        return self._submit(IMPORT_INSTANCE, params, account=account)

    def import_image(
        self,
        containers: Sequence[DiskContainer],
        *,
        architecture: str | None = None,
        platform: str | None = None,
        boot_mode: str | None = None,
        license_type: str | None = None,
        hypervisor: str | None = None,
        description: str | None = None,
        client_token: str | None = None,
        tags: Iterable[dict[str, str]] = (),
        kernel_id: str | None = None,
        ramdisk_id: str | None = None,
        virtualization_type: str | None = None,
        encryption: Encryption | None = None,
        account: str = NO_ACCOUNT,
        expected_sha256: str | None = None,
    ) -> Task:
        """ImportImage: the first disk is the boot disk (the image's root volume), the others its
        data disks, each fetched, inspected, converted and stored the same way (at most
        :data:`MAX_IMAGE_DISKS`). An OVA carries its own disks, so it is the only container.
        ``expected_sha256`` (beyond AWS, :mod:`appliance.service.expected`): the first disk's.

        ``kernel_id``/``ramdisk_id``/``virtualization_type`` (beyond AWS, see
        :mod:`appliance.service.bootparams`) are validated and recorded for the controller. A
        ``client_token`` makes the request idempotent for ``account`` (the API caller); the same
        token with different parameters is ``IdempotentParameterMismatch``. ``encryption`` (from
        :meth:`encryption`) is applied by the image target when it stores the disk.
        """
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
            if name is not None and not _DEVICE_NAME.match(name):
                raise UsageError(
                    f"DiskContainer.{n}.DeviceName {name[:40]!r} is not a device name such as /dev/sdb"
                )
        named = device_names(names)
        if len(set(named)) != len(named):
            dup = next(d for d in named if named.count(d) > 1)
            raise UsageError(
                f"two disks of the image would be {dup}: give each DiskContainer its own DeviceName"
            )
        boot = bootparams.check(kernel_id, ramdisk_id, virtualization_type, boot_mode=boot_mode)
        disks = [self._container(c, IMAGE_CONTAINER_FORMATS, account) for c in containers]
        if expected_sha256:
            disks[0]["expected_sha256"] = _expected(expected_sha256)
        params = boot.to_dict() | {
            "disk_containers": disks,
            "architecture": architecture,
            "platform": platform,
            "boot_mode": boot_mode,
            "license_type": license_type,
            "hypervisor": hypervisor,
            "description": description,
            "client_token": client_token,
            "tags": list(tags),
            **self._check_encryption(encryption),
        }
        return self._submit(IMPORT_IMAGE, params, client_token=client_token, account=account)

    def import_snapshot(
        self,
        container: DiskContainer,
        *,
        description: str | None = None,
        client_token: str | None = None,
        tags: Iterable[dict[str, str]] = (),
        encryption: Encryption | None = None,
        account: str = NO_ACCOUNT,
        expected_sha256: str | None = None,
    ) -> Task:
        """ImportSnapshot: one disk converted to RAW and stored by the image target; ``client_token``,
        ``account``, ``encryption`` and ``expected_sha256`` as for :meth:`import_image`."""
        disk = self._container(container, CONTAINER_FORMATS, account)
        if expected_sha256:
            disk["expected_sha256"] = _expected(expected_sha256)
        params = {
            "disk_container": disk,
            "description": description,
            "client_token": client_token,
            "tags": list(tags),
            **self._check_encryption(encryption),
        }
        return self._submit(IMPORT_SNAPSHOT, params, client_token=client_token, account=account)

    # -- reading and cancelling -----------------------------------------------------------------

    def get(self, task_id: str, kinds: Collection[str], accounts: Collection[str] | None = None) -> Task:
        """The task ``task_id`` if it is one of ``kinds`` and (``accounts`` given) belongs to one of
        ``accounts`` (:attr:`Caller.sees`); ``InvalidTaskId`` for a malformed id, ``TaskNotFound``,
        in the same words, for an unknown task and for one of another account."""
        kind = kind_of(task_id)
        if kind is None or kind not in kinds:
            forms = ", ".join(_PREFIX[k] + "…" for k in kinds)
            raise InvalidTaskId(f"the task id {task_id!r} is malformed; expected {forms}")
        try:
            task = self.store.get_task(task_id, account=accounts)
        except TaskNotFound:
            raise TaskNotFound(f"the task {task_id!r} does not exist") from None
        if task.kind != kind:
            raise TaskNotFound(f"the task {task_id!r} does not exist")
        return task

    def list(
        self, kinds: Collection[str], ids: Sequence[str] = (), accounts: Collection[str] | None = None
    ) -> list[Task]:
        """Tasks of ``kinds`` (of ``accounts``, when given), newest first; with ``ids``, exactly
        those (each must exist, as :meth:`get` says)."""
        if ids:
            return [self.get(i, kinds, accounts) for i in dict.fromkeys(ids)]
        return self.store.list_tasks(kind=list(kinds), limit=None, account=accounts)

    def cancel(
        self,
        task_id: str,
        kinds: Collection[str],
        reason: str | None = None,
        accounts: Collection[str] | None = None,
    ) -> Task:
        """Cancel an active task (its run stops, undoes what it did, and ends ``cancelled``); the task
        is found as :meth:`get` finds it."""
        task = self.get(task_id, kinds, accounts)
        if task.state.terminal:
            raise IncorrectState(f"the task {task_id} is {task.state} and can no longer be cancelled")
        return self.store.request_cancel(task_id, reason=reason or "Cancelled by user")


def _expected(value: str | None) -> str | None:
    """An expected sha256 checked (lower-case hex), or None."""
    return expected.check_sha256(value, expected.MEMBER) if value else None


#: task kinds whose result is a bootable image the controller registers with boot settings
BOOTABLE_KINDS = (IMPORT_IMAGE, IMPORT_INSTANCE)
#: how deep :func:`guest_report` looks for a ``guest`` member in the registered results
_GUEST_DEPTH = 4


def guest_report(result: Any) -> dict[str, Any] | None:
    """The guest validation report (``GuestReport.to_dict()``) in a task result, or None.

    The workflows may register it directly (``result["guest"]``) or inside another step's result
    (an import-disk include's, or a hook point's ``image`` facts: ``{..., "guest": {...}}``); the
    shallowest dict member named ``guest`` that has a ``layout`` or ``findings`` is it.
    """
    level = [result] if isinstance(result, dict) else []
    for _ in range(_GUEST_DEPTH):
        found = [
            node["guest"]
            for node in level
            if isinstance(node.get("guest"), dict) and {"layout", "findings"} & node["guest"].keys()
        ]
        if found:
            return found[0]
        level = [v for node in level for v in node.values() if isinstance(v, dict)]
    return None


def validated_report(events: Sequence[Any]) -> dict[str, Any] | None:
    """The report of the last ``guest.validated`` event among ``events`` (the guest.validate step
    emits one; when validation fails the task, the task result has no report but the event does)."""
    for event in reversed(events):
        if event.kind == "guest.validated" and isinstance(event.data.get("report"), dict):
            return event.data["report"]
    return None


def boot_settings(task: Task, guest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``{kernel_id, ramdisk_id, virtualization_type, layout}`` of an image or instance import
    (None for other kinds): what the request asked for, and the disk layout (``disk`` or
    ``partition``) the guest validation found, each None until known or when not given."""
    if task.kind not in BOOTABLE_KINDS:
        return None
    params = task.params or {}
    # workflow defaults store an absent setting as ""
    boot: dict[str, Any] = {f: params.get(f) or None for f in bootparams.FIELDS}
    boot["layout"] = (guest or {}).get("layout")
    return boot


#: task kinds that store an image with the image target, and so may encrypt it
ENCRYPTABLE_KINDS = IMAGE_KINDS + SNAPSHOT_KINDS


def encryption_report(task: Task) -> dict[str, Any] | None:
    """``{requested, applied}`` of an image or snapshot import (None for other kinds): the
    encryption the request asked for and the encryption the stored image has, as the image target
    read it back (each ``{algorithm, kms_key_id}`` or None; ``applied`` is None until the image is
    stored, and stays None for an image stored unencrypted)."""
    if task.kind not in ENCRYPTABLE_KINDS:
        return None
    params = task.params or {}
    # validated when the task was submitted; workflow defaults store an absent key as ""
    wanted = requested(bool(params.get("encrypted")), params.get("kms_key_id") or None)
    return {"requested": wanted.to_dict() if wanted else None, "applied": outcome(task)["encryption"]}


def _snapshot_id(task_id: str, n: int) -> str:
    """The snapshot id of disk ``n`` (1 = the boot disk) of the ImportImage ``task_id``: the boot
    disk's is ``snap-`` + the task id's 17 hex digits (as ever), a data disk's 17 hex digits derived
    from the task id and its position, so every disk has its own, the same on every read."""
    digits = task_id[-17:]
    if n == 1:
        return f"snap-{digits}"
    return "snap-" + hashlib.sha256(f"{task_id}/disk{n}".encode()).hexdigest()[:17]


def _disk_size(disk: dict[str, Any]) -> int | None:
    source_image = disk.get("source_image") or {}
    stored = disk.get("stored") or {}
    size = source_image.get("virtual_size") or stored.get("size")
    return int(size) if size is not None else None


def _disk_view(disk: Any) -> dict[str, Any]:
    """An import-disk include's result with a streamed disk's facts (``image.stream``'s result,
    registered as ``streamed``) where the scratch path registers them: ``stored``, ``source_image``,
    ``guest``."""
    disk = dict(disk) if isinstance(disk, dict) else {}
    streamed = disk.get("streamed") or {}
    for key in ("stored", "source_image", "guest"):
        if not disk.get(key) and streamed.get(key):
            disk[key] = streamed[key]
    return disk


def image_disks(task: Task) -> list[dict[str, Any]]:
    """Every disk an ImportImage stored, boot disk first (empty until the task completes, and for
    other kinds): ``index`` (1 = the boot disk), ``device_name``, ``snapshot_id``, ``format`` (the
    source's, as inspected), ``size`` (bytes of the disk), ``location`` (where the image target
    stored it), ``container`` (the index of the DiskContainer it came from, 1-based) and ``ova_disk``
    (its member name when it came out of an OVA).

    The order is the request's: the DiskContainers in order; for an OVA, its disks in the OVF's order
    (its boot disk first)."""
    if task.kind != IMPORT_IMAGE or not isinstance(task.result, dict):
        return []
    result = task.result
    boot = _disk_view(result.get("disk"))
    if not boot.get("stored"):
        return []
    containers = (task.params or {}).get("disk_containers") or []
    ova = (boot.get("opened") or {}).get("ova") or {}
    ova_names = [d.get("name") for d in ova.get("disks") or []]
    found: list[tuple[dict[str, Any], int, str | None]] = [(boot, 1, ova_names[0] if ova_names else None)]
    found += [(_disk_view(d), n, None) for n, d in enumerate(result.get("data_disks") or [], 2)]
    found += [
        (d or {}, 1, name) for d, name in zip(result.get("ova_data_disks") or [], ova_names[1:], strict=False)
    ]
    # a DiskContainer's DeviceName names its disk (an OVA's: its boot disk); the others by position
    given = [
        (containers[c - 1].get("device_name") or None)
        if c <= len(containers) and (n == 0 or not ova)
        else None
        for n, (_d, c, _name) in enumerate(found)
    ]
    names = device_names(given)
    out = []
    for n, ((disk, container, ova_disk), device) in enumerate(zip(found, names, strict=True), 1):
        source_image = disk.get("source_image") or {}
        out.append(
            {
                "index": n,
                "device_name": device,
                "snapshot_id": _snapshot_id(task.id, n),
                "format": source_image.get("format"),
                "size": _disk_size(disk),
                "location": disk.get("stored") or None,
                "container": container,
                "ova_disk": ova_disk,
            }
        )
    return out


def block_device_mappings(disks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The EC2 ``BlockDeviceMappings`` of an image of ``disks`` (:func:`image_disks`): every disk at
    its device, from its snapshot; what ``image.register`` (RegisterImage) takes."""
    return [
        {
            "DeviceName": d["device_name"],
            "Ebs": {"SnapshotId": d["snapshot_id"], "VolumeSize": -(-(d["size"] or 0) // GiB) or None},
        }
        for d in disks
    ]


def outcome(task: Task) -> dict[str, Any]:
    """What an import produced, flat: ``volume_id``, ``instance_id``, ``snapshot_id``, ``image_id``,
    ``size`` (bytes of the disk), ``location``, ``encryption`` (what the stored image has,
    ``{algorithm, kms_key_id}``) — each None until known; of an image, its boot disk's — plus
    ``guest`` (the guest validation report, None until there is one), ``boot``
    (:func:`boot_settings`), and for an ImportImage ``disks`` (:func:`image_disks`: every disk, boot
    disk first) and ``block_device_mappings`` (:func:`block_device_mappings`).

    The shipped workflows register their results under step names (``volume``, ``imported``,
    ``ids``, ``disk``, ``disk.streamed``); this is the one place that knows where each lives.
    """
    result = task.result if isinstance(task.result, dict) else {}
    volume = result.get("volume") or (result.get("imported") or {}).get("volume") or {}
    ids = result.get("ids") or {}
    disk = _disk_view(result.get("disk"))  # streamed into the image target, or through scratch
    stored = disk.get("stored") or {}
    source_image = disk.get("source_image") or {}
    written = result.get("written") or (result.get("imported") or {}).get("written") or {}
    guest = guest_report(result)
    disks = image_disks(task)
    return {
        "volume_id": volume.get("id"),
        "instance_id": (result.get("instance") or {}).get("instance_id"),
        "snapshot_id": ids.get("snapshot_id"),
        "image_id": ids.get("image_id"),
        "size": source_image.get("virtual_size") or stored.get("size") or written.get("virtual_size"),
        "location": stored or None,
        "encryption": stored.get("encryption"),
        "guest": guest,
        "boot": boot_settings(task, guest),
        "disks": disks,
        "block_device_mappings": block_device_mappings(disks) if disks else None,
    }
