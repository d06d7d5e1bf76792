"""A user-supplied expected sha256 of an import's source (beyond AWS).

An import may say what its source's sha256 must be; the appliance computes the sha256 of the source
as it streams in and fails the task with ``Source.DigestMismatch`` (expected and actual digests and
the redacted location in the message) before it completes when they differ, leaving no output (the
volume or stored image is removed as on any failure). Two ways to give it, both accepted by
ImportImage, ImportSnapshot, ImportVolume and ImportInstance:

- the extra request member ``ExpectedSha256=<64 hex digits>`` (not in the AWS model: raw query
  clients, euca2ools-style tools), and
- the token ``[imaging:sha256=<64 hex digits>]`` in the request's ``Description``, for clients such
  as boto3 and the AWS CLI that refuse unknown members; it combines with the boot settings' keys
  (``[imaging:kernel=aki-1234abcd,sha256=…]``, :mod:`.bootparams`).

Hex digits in either case; the digest is the sha256 of the source object as stored (a compressed
image's compressed bytes, an OVA's tar, an upload's whole file), the same bytes ``sha256sum`` reads.

Each disk of an ImportImage (and the disk of an ImportSnapshot) may carry its own, the same two ways
one level down: the extra member ``DiskContainer.N.ExpectedSha256`` (ImportSnapshot:
``DiskContainer.ExpectedSha256``) and the token ``[imaging:sha256=…]`` in ``DiskContainer.N.Description``
(:func:`resolve_disk`; a disk's token takes no other key). The request's own (member or token) is
the first (or only) disk's: given with the first container's, the two must agree
(:func:`first_disk`). A mismatch fails the task naming the disk (``disk2``: the second
DiskContainer), nothing of any disk kept.

A malformed value is refused when the request arrives (``InvalidParameterValue``); a member and a
token that disagree, or the request's and the first container's, are refused
(``InvalidParameterCombination``).
"""

from __future__ import annotations

import re

from ..errors import UsageError
from .bootparams import TOKEN_KEYS, TOKEN_OPEN, description_tokens

#: the extra request member
MEMBER = "ExpectedSha256"
#: the ``[imaging:…]`` token key
TOKEN_KEY = "sha256"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def check_sha256(value: str, name: str) -> str:
    """``value`` as a lower-case hex sha256; ``InvalidParameterValue`` naming ``name`` otherwise."""
    text = value.strip()
    if not _HEX64.match(text):
        shown = text[:80] + ("…" if len(text) > 80 else "")
        raise UsageError(
            f"Value ({shown}) for parameter {name} is invalid. Expected a sha256 digest: 64 hexadecimal "
            f"digits (as sha256sum prints it), got {len(text)} characters",
            code="InvalidParameterValue",
        )
    return text.lower()


def resolve(
    member: str | None,
    description: str | None,
    *,
    member_name: str = MEMBER,
    description_name: str = "Description",
) -> str | None:
    """The expected sha256 of a request (lower-case hex), from the member and the ``Description``
    token (see the module docstring), or None when neither gives one."""
    from_member = check_sha256(member, member_name) if member else None
    token = description_tokens(description, name=description_name).get("expected_sha256")
    from_token = (
        check_sha256(token, f"{description_name} {TOKEN_OPEN}{TOKEN_KEY}=]") if token is not None else None
    )
    if from_member and from_token and from_member != from_token:
        raise UsageError(
            f"{member_name} ({from_member}) and {TOKEN_KEY}={from_token} in {description_name} disagree; "
            "give the expected digest once",
            code="InvalidParameterCombination",
        )
    return from_member or from_token


def resolve_disk(member: str | None, description: str | None, prefix: str) -> str | None:
    """The expected sha256 of one disk container (``prefix``: ``DiskContainer.2``, or
    ``DiskContainer`` for ImportSnapshot), from its ``ExpectedSha256`` member and the token in its
    ``Description``, as :func:`resolve`. Its token takes only ``sha256``: boot settings belong to the
    request's ``Description`` (``InvalidParameterValue`` naming the container otherwise)."""
    name = f"{prefix}.Description"
    keys = {field: key for key, field in TOKEN_KEYS.items()}
    others = sorted(keys[f] for f in description_tokens(description, name=name) if f != "expected_sha256")
    if others:
        raise UsageError(
            f"{name}: a disk's {TOKEN_OPEN}…] token takes only {TOKEN_KEY}= (that disk's expected digest), "
            f"not {', '.join(others)}; give boot settings in the request's Description",
            code="InvalidParameterValue",
        )
    return resolve(member, description, member_name=f"{prefix}.{MEMBER}", description_name=name)


def first_disk(request: str | None, disk: str | None, prefix: str = "DiskContainer.1") -> str | None:
    """The expected sha256 of the first disk: the request's (``ExpectedSha256`` or its ``Description``
    token, which means the first disk) or the first container's own (``prefix``), both lower-case hex
    already; ``InvalidParameterCombination`` when both are given and differ."""
    if request and disk and request != disk:
        raise UsageError(
            f"the request's expected sha256 ({request}, from {MEMBER} or its Description) is the first "
            f"disk's, and {prefix} gives another ({disk}); give the first disk's digest once",
            code="InvalidParameterCombination",
        )
    return request or disk
