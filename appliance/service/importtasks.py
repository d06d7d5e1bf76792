"""What an import task is, independent of any request: its kinds and id forms, the disks a request
describes (:class:`DiskImage`, :class:`DiskContainer`), the device names of an image's disks, and whom a
request acts for (:class:`Caller`).

The service that creates tasks is :mod:`.imports`; the views of a task's result are
:mod:`.importviews`. Both (and :mod:`.imports`, for the callers that import these names from it) build
on this module.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Credential

GiB = 1 << 30

IMPORT_VOLUME = "import-volume"
IMPORT_INSTANCE = "import-instance"
IMPORT_IMAGE = "import-image"
IMPORT_SNAPSHOT = "import-snapshot"
CONVERSION_KINDS = (IMPORT_VOLUME, IMPORT_INSTANCE)
IMAGE_KINDS = (IMPORT_IMAGE,)
SNAPSHOT_KINDS = (IMPORT_SNAPSHOT,)
KINDS = CONVERSION_KINDS + IMAGE_KINDS + SNAPSHOT_KINDS

#: the id prefix of each kind
ID_PREFIX = {
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
#: a device name a DiskContainer may give
DEVICE_NAME = re.compile(r"^/dev/(?:sd|xvd|hd|vd)[a-z]{1,2}[0-9]{0,2}$")


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
    """One disk of an ImportImage/ImportSnapshot request: an URL or a bucket/key; ``expected_sha256``:
    the sha256 its source must have (beyond AWS, :mod:`appliance.service.expected`)."""

    format: str | None = None
    url: str | None = None
    bucket: str | None = None
    key: str | None = None
    description: str | None = None
    device_name: str | None = None
    expected_sha256: str | None = None


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
        return ID_PREFIX[kind] + "".join(secrets.choice(_ALNUM) for _ in range(8))
    return ID_PREFIX[kind] + secrets.token_hex(9)[:17]


def kind_of(task_id: str) -> str | None:
    """The task kind whose id form ``task_id`` has, or None."""
    for kind, pattern in TASK_ID_PATTERNS.items():
        if pattern.match(task_id):
            return kind
    return None
