"""What the controller's store holds and returns: appliances (without their secrets), lifecycle
events, the credentials a signature check needs, and what an appliance reports; its coded errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from ..database import Row
from ..errors import StoreError


class ApplianceExists(StoreError):
    code = "ApplianceExists"


class ApplianceNotFound(StoreError):
    code = "ApplianceNotFound"


@dataclass(frozen=True)
class ApplianceRow:
    """One appliance as stored, without its secret."""

    seq: int
    id: str
    dynamic: bool
    config_version: int
    registered_at: str
    assigned_to: str | None
    assigned_at: str | None
    status: str
    health: str | None
    addresses: list[str]
    parameters: dict[str, Any] | None
    errors: list[dict[str, Any]]
    tasks: list[dict[str, Any]]
    last_seen: str | None
    last_seq: int
    updated_at: str
    #: the configuration version the appliance last reported running (None: not reported)
    applied_version: int | None = None

    @classmethod
    def from_row(cls, row: Row) -> ApplianceRow:
        d = dict(row)
        d["dynamic"] = bool(d["dynamic"])
        for key in ("addresses", "parameters", "errors", "tasks"):
            d[key] = None if d[key] is None else json.loads(d[key])
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class EventRow:
    id: int
    time: str
    appliance_id: str
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Credentials:
    """What the protocol needs to check an appliance's signatures: its secret and last report seq."""

    appliance_id: str
    secret: str
    last_seq: int

    @classmethod
    def from_row(cls, row: Row) -> Credentials:
        return cls(row["id"], row["secret"], int(row["last_seq"]))


@dataclass(frozen=True)
class Update:
    """What an appliance reported (None: not part of this report, the stored value stays)."""

    status: str | None = None
    health: str | None = None
    addresses: list[str] | None = None
    parameters: dict[str, Any] | None = None
    errors: list[dict[str, Any]] | None = None
    tasks: list[dict[str, Any]] | None = None
    applied_version: int | None = None


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)
