"""Inspecting a RAW image as it streams past, for uploads written straight onto a volume (no file in
scratch that :func:`~appliance.image.inspect.inspect_image` could read first)."""

from __future__ import annotations

from oslo_utils.imageutils import format_inspector

from ..errors import Finding
from . import bootsector
from .archived import ARCHIVE_HEAD, archive_finding


class RawStreamCheck:
    """oslo's format inspectors over a RAW upload as it streams past, chunk by chunk: the same verdict
    as :func:`~appliance.image.inspect.inspect_image` gives a RAW claim, without a file to read."""

    class _Feed:
        chunk = b""

        def read(self, _size: int) -> bytes:
            return self.chunk

    def __init__(self) -> None:
        self._feed = self._Feed()
        # InspectWrapper is typed to take IO[bytes] but only calls read(): the feed is enough
        self._wrapper = format_inspector.InspectWrapper(self._feed)  # type: ignore[arg-type]
        #: the upload's first bytes: an archive there is raw to every inspector (:mod:`.archived`)
        self._head = bytearray()

    def eat(self, chunk: bytes | memoryview) -> None:
        # the inspectors are oslo's: they get bytes (a view of a reused buffer is copied)
        self._feed.chunk = chunk if isinstance(chunk, bytes) else bytes(chunk)
        self._wrapper.read(len(chunk))
        if len(self._head) < ARCHIVE_HEAD:
            self._head += self._feed.chunk[: ARCHIVE_HEAD - len(self._head)]

    def verdict(self) -> list[Finding]:
        """Findings against a RAW claim: raw, or a disk with an MBR/GPT, is what a RAW upload may be."""
        self._wrapper.close()
        try:
            detected = self._wrapper.formats or []
        except format_inspector.ImageFormatError as exc:
            return [Finding.error("UnsafeImage.Polyglot", f"the upload matches several formats: {exc}")]
        names = sorted({i.NAME for i in detected})
        if not set(names) <= {"raw", "gpt"}:
            return [
                Finding.error(
                    "FormatMismatch",
                    f"claimed RAW, detected {', '.join(names)}; import it with the format it really has",
                )
            ]
        for inspector in detected:
            try:
                bootsector.safety_check(inspector)  # a bare FAT/NTFS volume is not a broken MBR
            except format_inspector.SafetyCheckFailed as exc:
                return [Finding.error("UnsafeImage.PartitionTable", f"the partition table is unsafe: {exc}")]
        archived = archive_finding(bytes(self._head))
        return [archived] if archived is not None else []
