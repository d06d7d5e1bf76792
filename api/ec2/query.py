"""EC2 Query request parsing: flattened wire parameters → the nested, typed input structure.

Driven by botocore's model (:mod:`api.ec2.model`), so it accepts exactly what botocore's
``EC2Serializer`` emits: ``queryName``, else capitalised ``locationName``, else the member name;
lists always flattened as ``Name.N`` / ``Name.N.Member`` (1-based, contiguous). The result uses
botocore member names (``Image``, ``DiskImages``, ``LaunchSpecification``…), with integers,
floats, booleans and timestamps converted.

botocore validates required members and types client-side but never enums, and old clients send
spellings the current model lacks, so this module also

- validates enum values server-side (the model's enums, plus the documented values of members
  the model types as free strings), normalising case where AWS accepts any case;
- accepts the euca2ools forms ``LaunchSpecification.Monitoring.Enabled``,
  ``LaunchSpecification.UserData`` without ``.Data``, ``LaunchSpecification.KeyName`` and
  ``Platform=Linux``.

Numbers and list indexes are ASCII digits only (``str.isdigit`` and ``int`` also take
superscript or Arabic-Indic digits; AWS does not), and every numeric member is checked against
AWS's bounds (:data:`BOUNDS`) before a handler sees it: a 4,300-digit ``MaxResults`` or a
``Volume.Size`` of 2**63-1 is a client error, never an exception in the handler or a task that
fails later.

Errors are EC2 errors: ``MissingParameter``, ``InvalidParameterValue``, ``UnknownParameter``. A value
quoted in a message is cut short (:func:`api.ec2.errors.shown`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.model import ListShape, Shape, StringShape, StructureShape

from . import model
from .errors import Ec2Error, dry_run_operation, invalid_value, missing_parameter, shown

#: Parameters every request may carry that are not operation input (protocol and SigV2 auth);
#: SigV4 presigned parameters (``X-Amz-*``) are skipped by prefix.
PROTOCOL_PARAMS = frozenset(
    {"Action", "Version", "AWSAccessKeyId", "SignatureVersion", "SignatureMethod", "Signature",
     "Timestamp", "Expires", "SecurityToken"}
)  # fmt: skip
PROTOCOL_PREFIXES = ("X-Amz-",)

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

# ASCII digits only: ``\d`` and ``int()`` also accept other Unicode digits.
_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_FLOAT_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")
#: a list index: 1-based, no leading zero, ASCII digits
_INDEX_RE = re.compile(r"^[1-9][0-9]*$")
#: longer indexes cannot be contiguous within ``api.max_request_bytes``
MAX_INDEX_DIGITS = 9
_INT_RANGES = {"integer": 2**31, "long": 2**63}
#: digits of the largest long (2**63 - 1); longer numbers are refused before ``int()`` (which has
#: its own limit of 4,300 digits)
_MAX_INT_DIGITS = 19

GiB = 1 << 30
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


class _Items(dict):
    """A list under construction: ``{index: value}`` until the indexes are checked."""


def is_protocol_param(name: str) -> bool:
    """Whether ``name`` is a protocol/auth parameter rather than operation input."""
    return name in PROTOCOL_PARAMS or name.startswith(PROTOCOL_PREFIXES)


def parse(action: str, params: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The input structure of ``action`` (botocore member names) from decoded wire parameters.

    ``params`` maps each wire name to the list of values it was given (as ``parse_qs`` returns).
    Raises :class:`~api.ec2.errors.Ec2Error` (``UnknownParameter``, ``MissingParameter``,
    ``InvalidParameterValue``); ``KeyError`` if the model has no operation ``action``.
    """
    shape = model.operation(action).input_shape
    parser = _Parser(action)
    tree: dict[str, Any] = {}
    for key, values in params.items():
        if is_protocol_param(key):
            continue
        if len(values) != 1:
            raise invalid_value(f"The parameter {shown(key)} must be specified exactly once")
        parser.place(tree, shape, key, values[0])
    return parser.finish(shape, tree, "")


class _Parser:
    def __init__(self, action: str) -> None:
        self.action = action
        self.aliases = ALIASES.get(action, {})
        self.extras = EXTRA_MEMBERS.get(action, {})
        self.item_extras = EXTRA_ITEM_MEMBERS.get(action, {})
        self.enums = ENUMS.get(action, {})
        self.bounds = BOUNDS.get(action, {})

    def place(self, tree: dict[str, Any], shape: Shape | None, key: str, raw: str) -> None:
        """Put one wire parameter into ``tree`` at the position its name describes."""
        if key in self.extras:
            *parents, leaf = self.extras[key]
            node: dict[Any, Any] = tree
            for name in parents:
                node = node.setdefault(name, {})
            self._set(node, leaf, raw, key)
            return
        wire = self.aliases.get(key, key)
        if shape is None:
            raise _unknown(key)
        segments = wire.split(".")
        node = tree
        current = shape
        path: list[str] = []
        i = 0
        while True:
            if isinstance(current, StructureShape):
                if i >= len(segments):
                    raise _unknown(key)  # a structure given a value directly
                found = model.request_members(current).get(segments[i])
                if found is None:
                    if i == len(segments) - 1 and segments[i] in self.item_extras.get(tuple(path), ()):
                        self._set(node, segments[i], raw, key)  # an extra member of a list's item
                        return
                    raise _unknown(key)
                name, member = found
                slot: Any = name
                path.append(name)
                i += 1
            elif isinstance(current, ListShape):
                if i >= len(segments):
                    # ``Name=`` with no index: the query serializers' form of an empty list
                    if raw != "":
                        raise _unknown(key)
                    return
                index = segments[i]
                if not _INDEX_RE.match(index):
                    raise _unknown(key)
                if len(index) > MAX_INDEX_DIGITS:
                    raise invalid_value(
                        f"The list index {shown(index)} in parameter {shown(key)} is out of range: "
                        "lists are numbered 1, 2, 3…"
                    )
                slot, member = int(index), current.member
                path.append("*")
                i += 1
            else:
                raise _unknown(key)  # segments left over below a scalar
            if member.type_name in ("structure", "list"):
                child = node.get(slot)
                if child is None:
                    child = node[slot] = _Items() if member.type_name == "list" else {}
                elif not isinstance(child, dict):
                    raise _unknown(key)
                if member.type_name == "list" and i >= len(segments):
                    if raw != "":
                        raise _unknown(key)
                    return
                node, current = child, member
                continue
            if i != len(segments):
                raise _unknown(key)
            self._set(node, slot, self._convert(member, tuple(path), key, raw), key)
            return

    @staticmethod
    def _set(node: dict[Any, Any], slot: Any, value: Any, key: str) -> None:
        if slot in node:
            raise invalid_value(f"The parameter {shown(key)} is specified more than once")
        node[slot] = value

    def _convert(self, shape: Shape, path: tuple[str, ...], key: str, raw: str) -> Any:
        kind = shape.type_name
        if kind in ("integer", "long"):
            value = _integer(raw, _INT_RANGES[kind])
            if value is None:
                raise invalid_value(
                    f"Value ({shown(raw)}) for parameter {key} is invalid. Expected an integer."
                )
            self._check_bound(path, key, raw, value)
            return value
        if kind in ("double", "float"):
            number = float(raw) if _FLOAT_RE.match(raw) else math.nan
            if not math.isfinite(number):
                raise invalid_value(
                    f"Value ({shown(raw)}) for parameter {key} is invalid. Expected a number."
                )
            self._check_bound(path, key, raw, number)
            return number
        if kind == "boolean":
            if raw.lower() not in ("true", "false"):
                raise invalid_value(
                    f"Value ({shown(raw)}) for parameter {key} is invalid. Expected true or false."
                )
            return raw.lower() == "true"
        if kind == "timestamp":
            return _timestamp(key, raw)
        rule = self.enums.get(path)
        if rule is None and isinstance(shape, StringShape) and shape.enum:
            rule = Enum(tuple(shape.enum))
        return rule.check(key, raw) if rule else raw

    def _check_bound(self, path: tuple[str, ...], key: str, raw: str, value: float) -> None:
        bound = self.bounds.get(path)
        if bound is None:
            # BOUNDS lists every numeric member of the served actions; a model update that adds
            # one must not let it through unchecked.
            raise _unknown(key)
        bound.check(key, raw, value)

    def finish(self, shape: Shape | None, value: Any, wire: str) -> Any:
        """Turn index maps into lists (checking 1..N) and check required members."""
        if shape is None:
            return {}
        if isinstance(shape, StructureShape):
            members = model.request_members(shape)
            by_name = {name: wire_name for wire_name, (name, _) in members.items()}
            out = {}
            for name, child in value.items():
                member = shape.members.get(name)
                child_wire = _join(wire, by_name.get(name, name))
                out[name] = self.finish(member, child, child_wire) if member is not None else child
            for name in shape.required_members:
                if name not in out:
                    raise missing_parameter(_first_required(_join(wire, by_name[name]), shape.members[name]))
            return out
        if isinstance(shape, ListShape):
            indexes = sorted(value)
            if indexes != list(range(1, len(indexes) + 1)):
                raise invalid_value(
                    f"The elements of list parameter {wire} must be numbered 1, 2, 3… without gaps "
                    f"(got {', '.join(map(str, indexes))})"
                )
            return [self.finish(shape.member, value[i], f"{wire}.{i}") for i in indexes]
        return value


def _first_required(wire: str, shape: Shape) -> str:
    """Name the missing leaf, not the structure: ``Image.Format`` rather than ``Image``."""
    while isinstance(shape, StructureShape) and shape.required_members:
        name = shape.required_members[0]
        member = shape.members[name]
        wire = _join(wire, model.request_name(name, member))
        shape = member
    return wire


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _integer(raw: str, limit: int) -> int | None:
    """The integer ``raw`` spells in ASCII digits if ``abs(value) < limit``, else None."""
    if not _INT_RE.match(raw):
        return None
    digits = raw.lstrip("+-").lstrip("0") or "0"  # leading zeros do not count (nor go to int())
    if len(digits) > _MAX_INT_DIGITS:
        return None
    value = -int(digits) if raw.startswith("-") else int(digits)
    return value if abs(value) < limit else None


def _timestamp(key: str, raw: str) -> datetime:
    try:
        if not raw.isascii():
            raise ValueError(raw)  # fromisoformat takes some non-ASCII digits
        value = datetime.fromisoformat(raw)
        # in UTC, so that no later conversion can leave datetime's range (year 1 to 9999)
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise invalid_value(
            f"Value ({shown(raw)}) for parameter {key} is invalid. Expected an ISO-8601 timestamp."
        ) from None


def _unknown(key: str) -> Ec2Error:
    return Ec2Error("UnknownParameter", f"The parameter {shown(key)} is not recognized")


def check_dry_run(data: Mapping[str, Any]) -> None:
    """Raise ``DryRunOperation`` when the parsed request has ``DryRun=true``.

    Called by each handler after authentication and validation, before anything is changed, so
    a dry run answers "would have succeeded" only for a request that would get that far.
    """
    if data.get("DryRun"):
        raise dry_run_operation()
