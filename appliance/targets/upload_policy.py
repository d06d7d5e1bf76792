"""The S3 upload policy of a BundleInstance, checked before anything is uploaded under it.

``Storage.S3.UploadPolicy`` is base64 of a POST-policy JSON document (``ec2-bundles.md`` §11.3), and
``Storage.S3.UploadPolicySignature`` base64 of HMAC-SHA1 over that base64 text with the secret key of
``Storage.S3.AWSAccessKeyId`` (S3's browser-POST signature, version 2). :func:`check_upload_policy`
verifies the signature first (constant-time), then reads the document: it must not have expired, must
name the bucket, allow every key the bundle will write (``["starts-with", "$key", P]`` with P a prefix of
the bundle's prefix, or ``["eq", "$key", …]`` / ``{"key": …}`` only for a single object, which a bundle is
not), and name the canned ACL the objects get. Anything else — a forged or re-encoded policy, another
bucket, a key outside the grant, an expired or malformed document — is refused with a coded error
(``UploadPolicyInvalid.Signature``, ``.Expired``, ``.Bucket``, ``.Key``, ``.Acl``, ``.Malformed``) and
nothing is uploaded. The secret and the signature never appear in a message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import ImagingError

MAX_POLICY_BYTES = 16 * 1024
#: canned ACLs a bundle's objects may get (euca2ools' choices, and private)
ACLS = ("ec2-bundle-read", "aws-exec-read", "public-read", "private")


class UploadPolicyInvalid(ImagingError):
    code = "UploadPolicyInvalid"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message, f"UploadPolicyInvalid.{kind}")


@dataclass(frozen=True)
class UploadPolicy:
    """What a verified policy allows."""

    bucket: str
    #: every key must start with this
    key_prefix: str
    acl: str
    expiration: datetime
    #: largest object allowed by a ``content-length-range`` condition (None: no such condition)
    max_length: int | None


def sign_upload_policy(policy_b64: str, secret: str) -> str:
    """base64(HMAC-SHA1(secret, policy_b64)): the signature S3 and EC2 expect."""
    digest = hmac.new(secret.encode(), policy_b64.encode("ascii"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _parse_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise UploadPolicyInvalid("Malformed", "the upload policy has no expiration")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UploadPolicyInvalid(
            "Malformed", "the upload policy's expiration is not an ISO 8601 time"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _conditions(doc: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(operator, field without ``$``, value) of every condition."""
    raw = doc.get("conditions")
    if not isinstance(raw, list):
        raise UploadPolicyInvalid("Malformed", "the upload policy has no list of conditions")
    out: list[tuple[str, str, Any]] = []
    for cond in raw:
        if isinstance(cond, dict) and len(cond) == 1:
            ((name, value),) = cond.items()
            out.append(("eq", str(name).lower(), value))
        elif isinstance(cond, list) and len(cond) == 3 and isinstance(cond[0], str):
            op, name, value = cond[0].lower(), cond[1], cond[2]
            if op == "content-length-range":
                out.append((op, "", (name, value)))
            elif op in ("eq", "starts-with") and isinstance(name, str) and name.startswith("$"):
                out.append((op, name[1:].lower(), value))
            else:
                raise UploadPolicyInvalid(
                    "Malformed", f"the upload policy has an unknown condition {op[:40]!r}"
                )
        else:
            raise UploadPolicyInvalid("Malformed", "the upload policy has a malformed condition")
    return out


def check_upload_policy(
    policy_b64: str,
    signature_b64: str,
    secret: str,
    *,
    bucket: str,
    prefix: str,
    now: datetime | None = None,
) -> UploadPolicy:
    """Verify the policy and signature for a bundle written as ``bucket``/``prefix``…; raises
    :class:`UploadPolicyInvalid` (module docstring)."""
    if len(policy_b64) > MAX_POLICY_BYTES * 2:
        raise UploadPolicyInvalid("Malformed", "the upload policy is too large")
    expected = sign_upload_policy(policy_b64, secret)
    if not hmac.compare_digest(expected.encode(), signature_b64.strip().encode()):
        raise UploadPolicyInvalid(
            "Signature",
            "the upload policy's signature does not verify with the secret of its AWSAccessKeyId: it was "
            "forged or changed after it was signed",
        )
    return read_upload_policy(policy_b64, bucket=bucket, prefix=prefix, now=now)


def read_upload_policy(
    policy_b64: str, *, bucket: str, prefix: str, now: datetime | None = None
) -> UploadPolicy:
    """The grant of a policy whose signature :func:`check_upload_policy` verified (the worker reads the
    policy a queued BundleInstance kept, to enforce it while uploading); :class:`UploadPolicyInvalid`
    as there, the signature aside."""
    if len(policy_b64) > MAX_POLICY_BYTES * 2:
        raise UploadPolicyInvalid("Malformed", "the upload policy is too large")
    try:
        doc = json.loads(base64.b64decode(policy_b64, validate=True))
    except (binascii.Error, ValueError):
        raise UploadPolicyInvalid("Malformed", "the upload policy is not base64 of a JSON document") from None
    if not isinstance(doc, dict):
        raise UploadPolicyInvalid("Malformed", "the upload policy is not a JSON object")
    expiration = _parse_time(doc.get("expiration"))
    if expiration <= (now or datetime.now(UTC)):
        raise UploadPolicyInvalid("Expired", f"the upload policy expired at {expiration.isoformat()}")
    buckets, acls, key_prefixes, max_length = [], [], [], None
    for op, name, value in _conditions(doc):
        if op == "content-length-range":
            low, high = value
            if not isinstance(high, int) or not isinstance(low, int) or low > 0:
                raise UploadPolicyInvalid(
                    "Malformed", "the upload policy's content-length-range is not usable"
                )
            max_length = high
        elif name == "bucket":
            if op != "eq":
                raise UploadPolicyInvalid("Bucket", "the upload policy must name its bucket exactly")
            buckets.append(value)
        elif name == "key":
            if op != "starts-with":
                raise UploadPolicyInvalid(
                    "Key", "the upload policy grants one key only; a bundle needs a key prefix (starts-with)"
                )
            key_prefixes.append(value)
        elif name == "acl":
            acls.append(value)
    if buckets != [bucket]:
        raise UploadPolicyInvalid("Bucket", f"the upload policy does not grant the bucket {bucket!r}")
    if not key_prefixes or not all(isinstance(p, str) and prefix.startswith(p) for p in key_prefixes):
        raise UploadPolicyInvalid("Key", f"the upload policy does not grant keys starting with {prefix!r}")
    if len(acls) != 1 or acls[0] not in ACLS:
        raise UploadPolicyInvalid("Acl", f"the upload policy must name one canned ACL of {', '.join(ACLS)}")
    return UploadPolicy(bucket, prefix, str(acls[0]), expiration, max_length)
