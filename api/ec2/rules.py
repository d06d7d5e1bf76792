"""The server-side rules of EC2 Query parameters that botocore's model does not carry, by action and
member path (``*``: any list index), applied by the parser (:mod:`api.ec2.query`):

- :data:`ALIASES`: the wire spellings of older clients (euca2ools) mapped to botocore's;
- :data:`EXTRA_MEMBERS`, :data:`EXTRA_ITEM_MEMBERS`: members the model lacks, accepted as strings;
- :data:`BOUNDS`: AWS's range of every numeric member (:class:`Bound`);
- :data:`ENUMS`: allowed values (:class:`Enum`) where the model has none (botocore validates enums
  client-side never, and old clients send spellings the current model lacks) or allows too few.

A value out of its rule is an ``InvalidParameterValue`` (a value quoted in a message is cut short:
:func:`api.ec2.errors.shown`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import invalid_value, shown

#: Wire spellings of older clients (euca2ools / requestbuilder) → the botocore spelling.
ALIASES: dict[str, dict[str, str]] = {
    "ImportInstance": {
        "LaunchSpecification.Monitoring.Enabled": "LaunchSpecification.Monitoring",
        "LaunchSpecification.UserData": "LaunchSpecification.UserData.Data",
    },
}

#: Members the current model lacks: wire name → member path. Accepted as strings; handlers
#: validate them. ``KeyName``: older API versions had it (euca2ools sends it). Kernel, ramdisk
#: and virtualization type: beyond AWS, from Eucalyptus (:mod:`appliance.service.bootparams`), spelled
#: like RunInstances' ``KernelId``/``RamdiskId`` and RegisterImage's ``VirtualizationType``.
#: ``ExpectedSha256``: the source's expected sha256, beyond AWS (:mod:`appliance.service.expected`).
EXTRA_MEMBERS: dict[str, dict[str, tuple[str, ...]]] = {
    "ImportInstance": {
        "LaunchSpecification.KeyName": ("LaunchSpecification", "KeyName"),
        "LaunchSpecification.KernelId": ("LaunchSpecification", "KernelId"),
        "LaunchSpecification.RamdiskId": ("LaunchSpecification", "RamdiskId"),
        "LaunchSpecification.VirtualizationType": ("LaunchSpecification", "VirtualizationType"),
        "ExpectedSha256": ("ExpectedSha256",),
    },
    "ImportImage": {
        "KernelId": ("KernelId",),
        "RamdiskId": ("RamdiskId",),
        "VirtualizationType": ("VirtualizationType",),
        "ExpectedSha256": ("ExpectedSha256",),
    },
    "ImportSnapshot": {
        "ExpectedSha256": ("ExpectedSha256",),
        "DiskContainer.ExpectedSha256": ("DiskContainer", "ExpectedSha256"),
    },
    "ImportVolume": {"ExpectedSha256": ("ExpectedSha256",)},
}

#: Members the model lacks inside a structure of a list, by the structure's member path (``*``: any
#: index): accepted as strings like :data:`EXTRA_MEMBERS`. ``DiskContainer.N.ExpectedSha256``: the
#: expected sha256 of each disk of an ImportImage, beyond AWS (:mod:`appliance.service.expected`).
EXTRA_ITEM_MEMBERS: dict[str, dict[tuple[str, ...], frozenset[str]]] = {
    "ImportImage": {("DiskContainers", "*"): frozenset({"ExpectedSha256"})},
}

TiB = 1 << 40


@dataclass(frozen=True)
class Bound:
    """AWS's range for a numeric member; ``what`` completes "must be …" in the error message."""

    low: float
    high: float
    what: str

    def check(self, key: str, raw: str, value: float) -> None:
        if not self.low <= value <= self.high:
            raise invalid_value(
                f"Value ({shown(raw)}) for parameter {key} is invalid. It must be {self.what}."
            )


_VOLUME_SIZE = Bound(1, 16384, "a volume size from 1 to 16384 (GiB), the largest EBS volume")
_IMAGE_BYTES = Bound(1, 16 * TiB, "the image size in bytes, from 1 to 17592186044416 (16 TiB)")
_MAX_RESULTS = Bound(1, 1000, "from 1 to 1000")
_UPLOAD_SIZE = Bound(0, 16384, "the uploaded size in GiB, from 0 to 16384")

#: AWS's bounds of every numeric member of every action (member path, ``*`` = any list index).
#: Every integer, long and double member of the actions served must be listed here (a test checks
#: it): the model only says "integer", and an unchecked one reaches the task or the store.
BOUNDS: dict[str, dict[tuple[str, ...], Bound]] = {
    "ImportVolume": {("Image", "Bytes"): _IMAGE_BYTES, ("Volume", "Size"): _VOLUME_SIZE},
    "ImportInstance": {
        ("DiskImages", "*", "Image", "Bytes"): _IMAGE_BYTES,
        ("DiskImages", "*", "Volume", "Size"): _VOLUME_SIZE,
        # a partition placement group has at most 7 partitions per Availability Zone
        ("LaunchSpecification", "Placement", "PartitionNumber"): Bound(1, 7, "from 1 to 7"),
    },
    "ImportImage": {("ClientData", "UploadSize"): _UPLOAD_SIZE},
    "ImportSnapshot": {("ClientData", "UploadSize"): _UPLOAD_SIZE},
    "DescribeImportImageTasks": {("MaxResults",): _MAX_RESULTS},
    "DescribeImportSnapshotTasks": {("MaxResults",): _MAX_RESULTS},
    "DescribeExportImageTasks": {("MaxResults",): Bound(1, 500, "from 1 to 500")},
    # EBS's limits (io2 Block Express and gp3 at their largest)
    "CreateImage": {
        ("BlockDeviceMappings", "*", "Ebs", "VolumeSize"): Bound(1, 65536, "from 1 to 65536 GiB"),
        ("BlockDeviceMappings", "*", "Ebs", "Iops"): Bound(100, 256000, "from 100 to 256000"),
        ("BlockDeviceMappings", "*", "Ebs", "Throughput"): Bound(125, 2000, "from 125 to 2000 MiB/s"),
        ("BlockDeviceMappings", "*", "Ebs", "VolumeInitializationRate"): Bound(
            100, 300, "from 100 to 300 MiB/s"
        ),
        ("BlockDeviceMappings", "*", "Ebs", "EbsCardIndex"): Bound(0, 15, "from 0 to 15"),
    },
}


@dataclass(frozen=True)
class Enum:
    """Allowed values of one member; ``fold`` matches any case and returns the canonical spelling."""

    values: tuple[str, ...]
    fold: bool = False
    #: canonical value → message: recognised values this appliance refuses
    refused: Mapping[str, str] = field(default_factory=dict)

    def check(self, key: str, raw: str) -> str:
        if self.fold:
            canonical = {v.lower(): v for v in self.values}.get(raw.lower())
        else:
            canonical = raw if raw in self.values else None
        if canonical is None:
            raise invalid_value(
                f"Value ({shown(raw)}) for parameter {key} is invalid. Valid values: {', '.join(self.values)}"
            )
        if canonical in self.refused:
            raise invalid_value(self.refused[canonical])
        return canonical


_DISK_IMAGE_FORMAT = Enum(("VMDK", "RAW", "VHD"), fold=True)
_PLATFORM = Enum(("Windows", "Linux"), fold=True)
_TASK_STATE_FILTER = {
    ("Filters", "*", "Name"): Enum(("task-state",)),
    ("Filters", "*", "Values", "*"): Enum(("active", "completed", "deleting", "deleted")),
}

#: Server-side enum rules by action and member path (``*`` = any list index). They replace the
#: model's enum for that member (e.g. ``Platform`` also allows ``Linux``) or add one where the
#: model has a free string with documented values.
ENUMS: dict[str, dict[tuple[str, ...], Enum]] = {
    "ImportVolume": {("Image", "Format"): _DISK_IMAGE_FORMAT},
    "ImportInstance": {
        ("DiskImages", "*", "Image", "Format"): _DISK_IMAGE_FORMAT,
        ("Platform",): _PLATFORM,
    },
    "ImportImage": {
        ("Architecture",): Enum(("i386", "x86_64", "arm64"), fold=True),
        ("Platform",): _PLATFORM,
        ("Hypervisor",): Enum(("xen",), fold=True),
        ("LicenseType",): Enum(("AWS", "BYOL"), fold=True),
        ("BootMode",): Enum(
            ("legacy-bios", "uefi", "uefi-preferred"),
            refused={"uefi-preferred": "The uefi-preferred boot mode isn't supported for importing images."},
        ),
        ("DiskContainers", "*", "Format"): Enum(
            ("OVA", "VHD", "VHDX", "VMDK", "RAW"),
            fold=True,
        ),
        ("TagSpecifications", "*", "ResourceType"): Enum(("import-image-task",)),
    },
    "ImportSnapshot": {
        ("DiskContainer", "Format"): Enum(("VHD", "VMDK", "RAW"), fold=True),
        ("TagSpecifications", "*", "ResourceType"): Enum(("import-snapshot-task",)),
    },
    "DescribeImportImageTasks": _TASK_STATE_FILTER,
    "DescribeImportSnapshotTasks": _TASK_STATE_FILTER,
    "CreateInstanceExportTask": {
        ("ExportToS3Task", "DiskImageFormat"): _DISK_IMAGE_FORMAT,
        ("TagSpecifications", "*", "ResourceType"): Enum(("export-instance-task",)),
    },
    "ExportImage": {
        ("DiskImageFormat",): _DISK_IMAGE_FORMAT,
        ("TagSpecifications", "*", "ResourceType"): Enum(("export-image-task",)),
    },
    # AWS documents no filter names for DescribeExportTasks; these two are the useful ones
    "DescribeExportTasks": {
        ("Filters", "*", "Name"): Enum(("state", "instance-id")),
    },
    "DescribeExportImageTasks": {
        ("Filters", "*", "Name"): Enum(("task-state", "image-id")),
    },
    "DescribeBundleTasks": {
        ("Filters", "*", "Name"): Enum(
            (
                "bundle-id",
                "error-code",
                "error-message",
                "instance-id",
                "progress",
                "s3-bucket",
                "s3-prefix",
                "start-time",
                "state",
                "update-time",
            )
        ),
    },
}
