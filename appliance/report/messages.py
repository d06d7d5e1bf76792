"""The push protocol's wire format: versioned JSON messages signed with HMAC-SHA256.

Every message is one JSON object, sent as the body of ``POST <controller.url>/v1/reports``::

    {"ver": 1, "appliance_id": "...", "seq": 42, "ts": "2026-11-22T05:00:00.000000Z",
     "type": "heartbeat" | "task", ...type-specific members...}

- ``seq`` strictly increases per appliance, across restarts (it is the outbox row id). It is not
  contiguous: coalesced heartbeats and throttled progress ticks leave gaps.
- ``ts`` is when this delivery attempt was made (UTC), so a receiver can refuse stale replays even
  of messages that waited in the outbox through a long outage; event times are inside the payload.
- The payload is redacted: no secret, presigned URL signature or URL user info leaves this way.
- The header ``X-Imaging-Signature: sha256=<hex>`` carries HMAC-SHA256(secret, exact body bytes);
  ``X-Imaging-Appliance`` repeats the appliance id so a receiver can pick the right key first.

Pull requests (``/services/Imaging``) are signed as Eucalyptus expects instead (:mod:`.euca_auth`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime
from typing import Any

from ..redact import redact
from ..timestamps import format_time

VERSION = 1
SIGNATURE_HEADER = "X-Imaging-Signature"
APPLIANCE_HEADER = "X-Imaging-Appliance"
SIGNATURE_PREFIX = "sha256="
REPORTS_PATH = "/v1/reports"
IMAGING_PATH = "/services/Imaging"
TYPES = ("heartbeat", "task")


def sign(secret: str, body: bytes) -> str:
    """The signature header value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body`` (constant-time comparison)."""
    if not header or not header.startswith(SIGNATURE_PREFIX):
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


def encode(appliance_id: str, seq: int, payload: dict[str, Any], ts: datetime | None = None) -> bytes:
    """The body of one message: ``payload`` (with its ``type``), redacted (:mod:`appliance.redact`),
    wrapped in the versioned envelope."""
    message = {
        "ver": VERSION,
        "appliance_id": appliance_id,
        "seq": seq,
        "ts": format_time(ts),
        **redact(payload),
    }
    return json.dumps(message, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def headers(secret: str, appliance_id: str, body: bytes, content_type: str) -> dict[str, str]:
    """HTTP headers of a signed request."""
    return {
        "Content-Type": content_type,
        SIGNATURE_HEADER: sign(secret, body),
        APPLIANCE_HEADER: appliance_id,
    }
