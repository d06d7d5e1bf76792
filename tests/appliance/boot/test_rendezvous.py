"""The rendezvous signing scheme, checked against an independent HMAC computation."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from appliance.boot import rendezvous
from appliance.boot.rendezvous import RendezvousError

SECRET = "controller-shared-secret-0123456789"
PATH = "/ctl/v1/appliances/appl-1/config"


def test_signature_is_hmac_sha256_of_the_documented_canonical_string() -> None:
    body = b'{"imaging": {}}'
    expected_msg = f"RESPONSE\n{PATH}\n1700000000\n{hashlib.sha256(body).hexdigest()}".encode()
    expected = hmac.new(SECRET.encode(), expected_msg, hashlib.sha256).hexdigest()
    headers = rendezvous.signed_headers("appl-1", SECRET, "RESPONSE", PATH, body, now=1700000000)
    assert headers == {
        "X-Imaging-Appliance": "appl-1",
        "X-Imaging-Timestamp": "1700000000",
        "X-Imaging-Signature": expected,
    }
    rendezvous.verify(SECRET, "RESPONSE", PATH, headers, body, now=1700000100)


@pytest.mark.parametrize(
    ("kind", "path", "body", "secret", "reason"),
    [
        ("RESPONSE", PATH, b'{"imaging": {"x": 1}}', SECRET, "signature is invalid"),
        ("RESPONSE", "/ctl/v1/appliances/other/config", b"{}", SECRET, "signature is invalid"),
        ("GET", PATH, b"{}", SECRET, "signature is invalid"),
        ("RESPONSE", PATH, b"{}", "another-secret-0123456789abcdef", "signature is invalid"),
    ],
    ids=["altered-body", "other-path", "request-replayed-as-response", "wrong-secret"],
)
def test_verification_refuses_anything_but_the_signed_message(
    kind: str, path: str, body: bytes, secret: str, reason: str
) -> None:
    headers = rendezvous.signed_headers("appl-1", SECRET, "RESPONSE", PATH, b"{}", now=1700000000)
    with pytest.raises(RendezvousError, match=reason):
        rendezvous.verify(secret, kind, path, headers, body, now=1700000000)


def test_stale_timestamp_is_refused() -> None:
    headers = rendezvous.signed_headers("appl-1", SECRET, "GET", PATH, b"", now=1700000000)
    with pytest.raises(RendezvousError, match="away from this clock"):
        rendezvous.verify(SECRET, "GET", PATH, headers, b"", now=1700000000 + rendezvous.MAX_SKEW + 1)


def test_unsigned_message_is_refused() -> None:
    with pytest.raises(RendezvousError, match="not signed"):
        rendezvous.verify(SECRET, "GET", PATH, {"X-Imaging-Appliance": "appl-1"}, b"", now=1700000000)
