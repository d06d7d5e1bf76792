"""Server-side encryption of stored images: what an import asks for, and whether a target applied it.

An ImportImage/ImportSnapshot request says ``Encrypted`` and optionally ``KmsKeyId``;
:func:`requested` turns that into an :class:`Encryption` (or None), following EC2's rules:

- ``Encrypted=true`` alone: the store's default server-side encryption, ``AES256`` (SSE-S3);
- ``Encrypted=true`` with ``KmsKeyId``: ``aws:kms`` (SSE-KMS) with that key;
- ``KmsKeyId`` without ``Encrypted=true``: refused (``InvalidParameterDependency``, EC2's
  "The parameter KmsKeyId requires the parameter Encrypted to be set.");
- ``KmsKeyId`` in a form KMS does not know: refused (``InvalidParameterValue``). The forms are a key
  id (``1234abcd-12ab-34cd-56ef-1234567890ab``, or a multi-Region ``mrk-`` + 32 hex digits), an
  alias (``alias/ExampleAlias``), and the ARN of either
  (``arn:aws:kms:us-east-1:012345678910:key/…``, ``arn:aws:kms:us-east-1:012345678910:alias/…``).

Whether the key exists is only known to the store: a missing key fails the upload, and so the task
(AWS, too, parses the key asynchronously and fails the task later).

A target that cannot encrypt says so (:attr:`~appliance.targets.base.ImageTarget.sse_algorithms`
is empty) and the request is refused when it arrives (``EncryptionNotSupported``); a target that
can reads back what the store applied and refuses to report success when it is not what was asked
(:func:`satisfies`; ``EncryptionNotApplied``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ImagingError, UsageError

#: S3's names of the server-side encryption algorithms (the ``x-amz-server-side-encryption`` header)
SSE_S3 = "AES256"
SSE_KMS = "aws:kms"
ALGORITHMS = (SSE_S3, SSE_KMS)

_KEY_ID = r"(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})"
#: KMS alias names: ``alias/`` and up to 250 letters, digits, ``/``, ``_`` and ``-``
_ALIAS = r"alias/[A-Za-z0-9/_-]{1,250}"
#: ``arn:<partition>:kms:<region>:<account>:`` (partitions aws, aws-cn, aws-us-gov, aws-iso-b…)
_ARN_PREFIX = r"arn:aws(?:-[a-z]+)*:kms:[a-z]{2}(?:-[a-z]+)+-[0-9]+:[0-9]{12}:"
#: matched whole (``fullmatch``: ``$`` would also match before a trailing newline)
KMS_KEY_ID = re.compile(rf"(?:{_KEY_ID}|{_ALIAS}|{_ARN_PREFIX}(?:key/{_KEY_ID}|{_ALIAS}))")
_FORMS = (
    "a key id (1234abcd-12ab-34cd-56ef-1234567890ab, or mrk- and 32 hex digits), an alias "
    "(alias/ExampleAlias), or the ARN of either (arn:aws:kms:us-east-1:012345678910:key/<key id> or "
    "arn:aws:kms:us-east-1:012345678910:alias/ExampleAlias)"
)


class KmsKeyIdWithoutEncrypted(ImagingError):
    """``KmsKeyId`` was given without ``Encrypted=true``."""

    code = "InvalidParameterDependency"


class EncryptionNotSupported(ImagingError):
    """The configured image target cannot apply the encryption asked for."""

    code = "EncryptionNotSupported"


@dataclass(frozen=True)
class Encryption:
    """Server-side encryption of a stored object: ``algorithm`` (``AES256`` or ``aws:kms`` when the
    appliance asks; whatever S3 reports when read back, e.g. ``aws:kms:dsse``) and, for ``aws:kms``,
    the KMS key (as the request named it, or as the store reports it)."""

    algorithm: str
    kms_key_id: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"algorithm": self.algorithm, "kms_key_id": self.kms_key_id}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Encryption | None:
        """The inverse of :meth:`to_dict`; None stays None."""
        if not data:
            return None
        return cls(str(data["algorithm"]), data.get("kms_key_id") or None)


def check_kms_key_id(value: str) -> str:
    """``value`` if it is a KMS key id, alias or ARN of one; else ``InvalidParameterValue``."""
    if not KMS_KEY_ID.fullmatch(value):
        shown = value if len(value) <= 64 else value[:64] + "…"
        raise UsageError(f"KmsKeyId {shown!r} is not a KMS key identifier: give {_FORMS}")
    return value


def requested(encrypted: bool, kms_key_id: str | None) -> Encryption | None:
    """The encryption an import asks for (None: none), by EC2's rules (module docstring)."""
    if kms_key_id is not None and not encrypted:
        raise KmsKeyIdWithoutEncrypted("The parameter KmsKeyId requires the parameter Encrypted to be set.")
    if not encrypted:
        return None
    if kms_key_id is None:
        return Encryption(SSE_S3)
    return Encryption(SSE_KMS, check_kms_key_id(kms_key_id))


def _key_id_of(identifier: str) -> str | None:
    """The key id in a key id or key ARN; None for an alias (or an alias ARN)."""
    tail = identifier.rsplit(":", 1)[-1]
    if tail.startswith("alias/"):
        return None
    return tail.removeprefix("key/")


def satisfies(applied: Encryption | None, wanted: Encryption) -> bool:
    """Whether what the store reports having applied is the encryption asked for.

    The algorithm must match. For ``aws:kms`` the store must name a key, and when the request named
    the key by id or key ARN it must be that key (S3 reports the key's ARN whatever form the request
    used). A key named by alias cannot be compared without asking KMS what the alias points to, so
    any key the store names is taken.
    """
    if applied is None or applied.algorithm != wanted.algorithm:
        return False
    if wanted.algorithm != SSE_KMS:
        return True
    if not applied.kms_key_id:
        return False
    if applied.kms_key_id == wanted.kms_key_id or wanted.kms_key_id is None:
        return True
    wanted_id = _key_id_of(wanted.kms_key_id)
    return wanted_id is None or _key_id_of(applied.kms_key_id) == wanted_id
