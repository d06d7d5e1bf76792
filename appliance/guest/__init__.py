"""Static guest validation: what is on a disk image and whether it will boot, as coded findings.

Public API: :func:`validate_image`, :func:`check_request`, :class:`GuestReport`, :data:`CODES`. The
library that reads guest filesystems is confined to :mod:`appliance.guest.reader`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use: the limited child that reads a guest (appliance.guest.probe) imports this
# package too, and must not pay for the parent's side (configuration, jsonschema) on every image.
_EXPORTS = {
    "CODES": ".codes",
    "Code": ".codes",
    "GuestReport": ".report",
    "check_request": ".validate",
    "normalize_architecture": ".validate",
    "validate_image": ".validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
