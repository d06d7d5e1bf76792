"""EC2 Query request parsing: flattened wire parameters → the nested, typed input structure.

Driven by botocore's model (:mod:`api.ec2.model`), so it accepts exactly what botocore's
``EC2Serializer`` emits: ``queryName``, else capitalised ``locationName``, else the member name;
lists always flattened as ``Name.N`` / ``Name.N.Member`` (1-based, contiguous). The result uses
botocore member names (``Image``, ``DiskImages``, ``LaunchSpecification``…), with integers,
floats, booleans and timestamps converted.

botocore validates required members and types client-side but never enums, and old clients send
spellings the current model lacks, so this parser also applies the rules of :mod:`api.ec2.rules`:

- validates enum values server-side (the model's enums, plus the documented values of members
  the model types as free strings), normalising case where AWS accepts any case;
- accepts the euca2ools forms ``LaunchSpecification.Monitoring.Enabled``,
  ``LaunchSpecification.UserData`` without ``.Data``, ``LaunchSpecification.KeyName`` and
  ``Platform=Linux``.

Numbers and list indexes are ASCII digits only (``str.isdigit`` and ``int`` also take
superscript or Arabic-Indic digits; AWS does not), and every numeric member is checked against
AWS's bounds (:data:`api.ec2.rules.BOUNDS`) before a handler sees it: a 4,300-digit ``MaxResults`` or a
``Volume.Size`` of 2**63-1 is a client error, never an exception in the handler or a task that
fails later.

Errors are EC2 errors: ``MissingParameter``, ``InvalidParameterValue``, ``UnknownParameter``. A value
quoted in a message is cut short (:func:`api.ec2.errors.shown`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from botocore.model import ListShape, Shape, StringShape, StructureShape

from . import model
from .errors import Ec2Error, dry_run_operation, invalid_value, missing_parameter, shown
from .rules import ALIASES, BOUNDS, ENUMS, EXTRA_ITEM_MEMBERS, EXTRA_MEMBERS, Enum

#: Parameters every request may carry that are not operation input (protocol and SigV2 auth);
#: SigV4 presigned parameters (``X-Amz-*``) are skipped by prefix.
PROTOCOL_PARAMS = frozenset(
    {"Action", "Version", "AWSAccessKeyId", "SignatureVersion", "SignatureMethod", "Signature",
     "Timestamp", "Expires", "SecurityToken"}
)  # fmt: skip
PROTOCOL_PREFIXES = ("X-Amz-",)

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
