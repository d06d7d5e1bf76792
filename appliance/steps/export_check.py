"""The export's check of its source disk (:class:`SourceDigestCheck`): the digest computed on the
export's own read of the disk and compared with the one its store recorded when the import wrote it.

The source is read once: its digest is computed from the export writer's own reads of it (or from the
download of an S3-stored image) and checked against the digest its store recorded — the
``sha256-chunked`` where the import recorded one, else the plain ``sha256`` of an image stored before —
before the object is completed (``Source.DigestMismatch``: a stored disk that changed since; the upload
is aborted, nothing is left). A RAW export's output digest stands for the source's (the same bytes:
hashed once; to S3 the check runs on the parts' digest once every part is uploaded and before the upload
is completed: a mismatch aborts it, no object ever exists).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..targets.chunkdigest import ALGORITHM, DEFAULT_CHUNK
from ..targets.hashing import OffsetSha256
from ..targets.offsetdigest import OffsetChunkedSha256
from ..targets.rawio import disk_size
from .provenance import SourceDigestMismatch


def _recorded_chunked(source: dict[str, Any]) -> dict[str, Any] | None:
    digest = (source.get("location") or {}).get("digest")
    if isinstance(digest, dict) and digest.get("algorithm") == ALGORITHM and digest.get("value"):
        return digest
    return None


class SourceDigestCheck:
    """The digest of one source disk, computed on the export's own read of it (the writer's reads, or
    the download of an S3-stored image: no second read) and compared with the digest its store
    recorded when the import wrote it (``Source.DigestMismatch``: a stored disk that changed since; the
    writer then leaves nothing). The record's ``sha256-chunked`` when it has one (the same chunk size),
    else its plain ``sha256`` (an image stored before the chunked digest was recorded on import);
    a source with no record (a volume, an instance of the controlling cloud) gets its
    ``sha256-chunked`` for the provenance."""

    def __init__(self, source: dict[str, Any]) -> None:
        self.source = source
        self.recorded_digest = _recorded_chunked(source)
        self.recorded_sha256 = (source.get("location") or {}).get("sha256")
        self.chunked: OffsetChunkedSha256 | None = None
        self.plain: OffsetSha256 | None = None
        if self.recorded_digest is not None or not self.recorded_sha256:
            chunk = int((self.recorded_digest or {}).get("chunk_size") or DEFAULT_CHUNK)
            self.chunked = OffsetChunkedSha256(chunk, name="export-source")
        else:
            self.plain = OffsetSha256("export-source")
        self.sha256: str | None = None
        self.digest: dict[str, Any] | None = None
        self.verified = False
        self.bytes_read = 0

    def read(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.bytes_read += len(data)
        if self.chunked is not None:
            self.chunked.write(offset, data)
        elif self.plain is not None:
            self.plain.write(offset, data)

    def verify(self, size: int) -> None:
        if self.chunked is not None:
            found = self.chunked.result(size)
            self.digest = found.to_dict() if found is not None else None
        elif self.plain is not None:
            self.sha256 = self.plain.result(size)
        self.verified = True
        self._compare()

    def _compare(self) -> None:
        what = self.source.get("id")
        if self.recorded_digest is not None:
            value = (self.digest or {}).get("value")
            if value != self.recorded_digest["value"]:
                raise SourceDigestMismatch(
                    f"the stored disk of {what} has {ALGORITHM} {value}, not the "
                    f"{self.recorded_digest['value']} recorded when it was stored: it changed since; "
                    "nothing was exported"
                )
        elif self.recorded_sha256 and self.sha256 != self.recorded_sha256:
            raise SourceDigestMismatch(
                f"the stored disk of {what} has sha256 {self.sha256}, not the {self.recorded_sha256} "
                "recorded when it was stored: it changed since; nothing was exported"
            )

    def output_stands_for_source(self, chunk_size: int) -> bool:
        """A RAW export's output is the source's bytes: its ``sha256-chunked`` is the source's when the
        recorded one has the same chunk size (the source is then hashed once, as the output)."""
        recorded = self.recorded_digest
        return recorded is not None and int(recorded.get("chunk_size") or 0) == chunk_size

    def verify_output(self, digest: Mapping[str, Any], size: int) -> bool:
        """Check the RAW output's chunked ``digest`` as the source's (False: not of the recorded chunk
        size, nothing checked)."""
        recorded = self.recorded_digest or {}
        if int(digest.get("chunk_size") or 0) != int(recorded.get("chunk_size") or -1):
            return False
        keep = ("algorithm", "value", "chunk_size", "chunks", "s3_checksum_sha256")
        self.digest = {k: digest[k] for k in keep if k in digest}
        self.bytes_read = size
        self.verified = True
        if self.chunked is not None:
            self.chunked.close()
            self.chunked = None
        self._compare()
        return True

    def entry(self, path: Path) -> dict[str, Any]:
        """The provenance of the source disk: what was computed (once verified), else what its store
        recorded (the record's metadata goes up with the upload's start, before the disk is read)."""
        checked: list[dict[str, Any]] = []
        if self.recorded_digest is not None:
            checked.append({"what": "recorded-sha256-chunked", "value": self.recorded_digest["value"]})
        elif self.recorded_sha256:
            checked.append({"what": "recorded-sha256", "value": self.recorded_sha256})
        source = self.source
        read: dict[str, Any] = {
            "id": source.get("id"),
            "task_id": source.get("task_id"),
            "type": source.get("type"),
            "sha256": self.sha256 if self.verified else self.recorded_sha256,
            "digest": self.digest if self.verified else self.recorded_digest,
            "recorded_sha256": self.recorded_sha256,
            "size": disk_size(path),
            # the stored disk's digest, recorded by the import that wrote it, checked on the export's read
            "checked": checked,
        }
        if self.recorded_digest is not None:
            read["recorded_digest"] = self.recorded_digest
        if source.get("type") == "cloud-instance":
            read |= {"volume_id": source.get("volume_id"), "device_name": source.get("device_name")}
        return read

    def close(self) -> None:
        if self.chunked is not None:
            self.chunked.close()
        if self.plain is not None:
            self.plain.close()
