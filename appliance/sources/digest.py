"""The digest of a source as it streams past, and the source's own digests that were checked.

:class:`StreamDigest` sits on the byte stream of a source (a ``write(offset, chunk)`` callback, or
any reader loop calling :meth:`StreamDigest.update`): the sha256 is computed from the bytes as they
go by, in order, never by reading the source again. :meth:`StreamDigest.checked` notes a digest the
source itself carried and that was verified on the way (an S3 ETag that is an MD5, the MD5 of each
manifest part, an OVA ``.mf`` line, an ``x-amz-checksum-sha256``). :meth:`StreamDigest.to_dict` is
the ``source`` entry of a provenance record (:mod:`appliance.steps.provenance`).

A stream that resumed in the middle (a task interrupted after a checkpoint) saw only its tail: its
sha256 is then unknown (None, with the reason in ``sha256_unknown``) unless the caller fed the bytes
before the resume point again (:meth:`StreamDigest.update` from where they are kept).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable
from typing import Any

#: a sha256 written as 64 hexadecimal digits
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class StreamDigest:
    """sha256 and size of a byte stream seen in order (see the module docstring)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.size = 0
        self._gap: str | None = None
        self._checked: list[dict[str, Any]] = []
        self._part_md5s: list[dict[str, Any]] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of the stream, in order."""
        self._sha.update(data)
        self.size += len(data)

    def wrap(
        self, write: Callable[[int, bytes | memoryview], None]
    ) -> Callable[[int, bytes | memoryview], None]:
        """``write(offset, chunk)`` that hashes each chunk first; chunks must come in offset order."""

        def hashed(offset: int, chunk: bytes | memoryview) -> None:
            self.update(chunk)
            write(offset, chunk)

        return hashed

    def gap(self, reason: str) -> None:
        """Part of the stream went by unseen (a resumed transfer): the sha256 is unknown."""
        self._gap = reason

    @property
    def sha256(self) -> str | None:
        """The hex sha256 of the whole stream, or None when part of it was not seen."""
        return None if self._gap else self._sha.hexdigest()

    def checked(self, what: str, value: str, **extra: Any) -> None:
        """Note a digest of the source's own that was verified: ``what`` names it (``s3-etag-md5``,
        ``x-amz-checksum-sha256``, ``ova-mf``...), ``value`` is what the source said."""
        self._checked.append({"what": what, "value": value, **extra})

    def part_md5(self, index: int, md5: str | None) -> None:
        """The MD5 a manifest part's ETag carried and the part's bytes matched (None: the part had
        no MD5 ETag to check, e.g. a multipart or SSE-KMS object)."""
        self._part_md5s.append({"index": index, "md5": md5})

    def to_dict(self) -> dict[str, Any]:
        """``{sha256, size, checked}`` (``sha256_unknown`` when the sha256 is None)."""
        checked = list(self._checked)
        if self._part_md5s:
            checked.append(
                {
                    "what": "manifest-part-md5",
                    "parts": sorted(self._part_md5s, key=lambda p: int(p["index"])),
                    "verified": sum(1 for p in self._part_md5s if p["md5"]),
                }
            )
        out: dict[str, Any] = {"sha256": self.sha256, "size": self.size, "checked": checked}
        if self._gap:
            out["sha256_unknown"] = self._gap
        return out


def b64_to_hex(value: str) -> str | None:
    """An ``x-amz-checksum-sha256`` (base64 of the 32-byte digest) as hex; None when it is not one
    (a composite checksum of a multipart upload, ``…-N``, is not the object's sha256)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None
