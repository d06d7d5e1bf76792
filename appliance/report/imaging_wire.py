"""The imaging-worker protocol's wire: what ``GetInstanceImportTask`` hands out, what
``PutInstanceImportTaskStatus`` answers, and the Eucalyptus failure codes a task ends with.

Replies are parsed with defusedxml (no DTD, no entities) and bounded by the caller; Eucalyptus writes
them in the ``http://www.eucalyptus.com/ns/imaging/2014-02-14/`` namespace, and its worker accepted
``name`` and ``euca:name`` alike, so elements are matched by local name.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ..errors import ImagingError, is_rejection

IMAGING_NS = "http://www.eucalyptus.com/ns/imaging/2014-02-14/"

#: the one table of appliance error codes → the Eucalyptus worker's failure codes (task_exit_codes.py);
#: image rejections (``FormatMismatch``, ``UnsafeImage.*``, …) are ``InvalidInputData``, anything else
#: ``GeneralFailure``. The cloud retires a worker that reports FailureToAttachVolume,
#: FailureToDetachVolume or CertificateFailure.
EUCA_CODES: dict[str, str] = {
    "ManifestInvalid": "InvalidInputData",
    "ManifestUnsupported.Bundle": "InvalidInputData",
    "BundleInvalid.Manifest": "InvalidInputData",
    "BundleInvalid.Signature": "InvalidInputData",
    "BundleInvalid.Key": "InvalidInputData",
    "BundleInvalid.PartOutsideBucket": "InvalidInputData",
    "BundleInvalid.Decrypt": "InvalidInputData",
    "BundleInvalid.Tar": "InvalidInputData",
    "BundleInvalid.Digest": "InvalidInputData",
    "BundleInvalid.Size": "InvalidInputData",
    "BundleInvalid.PartDigest": "FailureToDownloadData",
    "InsufficientVolumeSize": "InvalidInputData",
    "InvalidParameterValue": "InvalidInputData",
    "CertificateFailure": "CertificateFailure",
    "SourceUnavailable": "FailureToDownloadData",
    "SourceIntegrity": "FailureToDownloadData",
    "Source.Changed": "FailureToDownloadData",
    "Source.Stalled": "FailureToDownloadData",
    "UrlNotAllowed": "FailureToDownloadData",
    "Source.Unreachable": "FailureToDownloadData",
    "InsufficientScratch": "InsufficientDiskSize",
    "InsufficientStorage": "InsufficientDiskSize",
    "FailureToAttachVolume": "FailureToAttachVolume",
    "FailureToDetachVolume": "FailureToDetachVolume",
    "ConversionFailed": "FailureToRunWorkflow",
    "StepFailed": "FailureToRunWorkflow",
    "StepTimeout": "FailureToRunWorkflow",
    "Cancelled": "Canceled",
}
#: what the cloud is told of a ``convert_image`` task (Eucalyptus' worker dropped it in 2015)
CONVERT_IMAGE_REFUSED = (
    "GeneralFailure",
    "convert_image (instanceStoreTask) is not supported by this imaging worker; Eucalyptus removed PV to "
    "HVM conversion from its worker in 2015",
)


def euca_code(code: str | None) -> str:
    """The Eucalyptus ``ErrorCode`` for an appliance error code."""
    if is_rejection(code):
        return "InvalidInputData"
    return EUCA_CODES.get(code or "", "GeneralFailure")


class Refused(ImagingError):
    """A task this worker refuses with a Eucalyptus code of its own choosing (``euca_code``)."""

    def __init__(self, euca: str, message: str) -> None:
        super().__init__(message, "TaskRefused")
        self.euca = euca


class PullError(Exception):
    """A call to the Imaging service failed (transport, HTTP status or reply shape)."""


@dataclass(frozen=True)
class RemoteTask:
    """What ``GetInstanceImportTask`` handed out."""

    task_id: str
    task_type: str
    volume_id: str | None
    manifest_url: str | None
    format: str | None
    bytes: int | None
    volume_size: int | None
    #: the reply has an ``instanceStoreTask`` (convert_image)
    instance_store: bool = False

    @property
    def key(self) -> str:
        """The ``pull_tasks`` key: an ImportInstance hands out one worker task per volume, all with the
        conversion task's id, so those are told apart by volume."""
        if self.task_id.startswith("import-i-") and self.volume_id:
            return f"{self.task_id}/{self.volume_id}"
        return self.task_id


def remote_task_id(key: str) -> str:
    """The ``ImportTaskId`` of a ``pull_tasks`` key."""
    return key.split("/", 1)[0]


def _local(tag: str) -> str:
    # the worker's match_name accepted both "name" and "euca:name": compare local names only
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def _find(el: ET.Element | None, *path: str) -> ET.Element | None:
    for name in path:
        if el is None:
            return None
        el = next((c for c in el if _local(c.tag) == name), None)
    return el


def _text(el: ET.Element | None, *path: str) -> str | None:
    found = _find(el, *path)
    text = (found.text or "").strip() if found is not None else ""
    return text or None


def _parse(xml: bytes, what: str) -> ET.Element:
    try:
        return SafeET.fromstring(xml, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (ET.ParseError, DefusedXmlException) as exc:
        raise PullError(f"{what} reply is not XML the service writes: {exc}") from None


def parse_task(xml: bytes) -> RemoteTask | None:
    """The task in a ``GetInstanceImportTaskResponse``, or None when there is no work."""
    root = _parse(xml, "GetInstanceImportTask")
    task_id = _text(root, "importTaskId")
    if not task_id:
        return None
    item = _find(root, "volumeTask", "imageManifestSet", "item")
    size, vsize = _text(item, "bytes"), _text(root, "volumeTask", "volumeSize")
    return RemoteTask(
        task_id=task_id,
        task_type=_text(root, "importTaskType") or "import_volume",
        volume_id=_text(root, "volumeTask", "volumeId"),
        manifest_url=_text(item, "manifestUrl"),
        format=(_text(item, "format") or "").upper() or None,
        bytes=int(size) if size and size.isdigit() else None,
        volume_size=int(vsize) if vsize and vsize.isdigit() else None,
        instance_store=_find(root, "instanceStoreTask") is not None,
    )


def parse_cancelled(xml: bytes) -> bool:
    """Whether a ``PutInstanceImportTaskStatusResponse`` says the task is cancelled."""
    root = _parse(xml, "PutInstanceImportTaskStatus")
    value = _text(root, "cancelled")
    if value not in ("true", "false"):
        raise PullError(f"PutInstanceImportTaskStatus reply has no true/false <cancelled> ({value!r})")
    return value == "true"
