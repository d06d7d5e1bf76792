"""Format detection over the bytes of an image as they come, from a file or from byte ranges.

oslo.utils' ``format_inspector`` decides an image's format from its content: every inspector sees the
bytes from offset 0 and captures the regions it needs (a header, a descriptor, the last 1536 bytes of a
VMDK stream). :class:`Detector` runs all of them exactly as oslo's ``InspectWrapper`` does (an inspector
that raises is excluded, as is a non-matching one; "raw" when none matches), and adds what byte ranges
need: it says whether only end-of-file regions are still missing (:meth:`Detector.waiting_for_end`), so
that the last bytes of an object fetched with a suffix range can complete the decision without the
bytes in between (:meth:`Detector.feed_tail`), and which regions are still missing.

The file inspection (:func:`appliance.image.inspect.inspect_image`) and the header-only preflight of a
download (:func:`appliance.image.inspect.preflight`) detect through this class (the streaming check of
a RAW upload, :mod:`appliance.image.stream`, still runs oslo's ``InspectWrapper`` itself).
"""

from __future__ import annotations

from oslo_utils.imageutils import format_inspector as fi

#: the last bytes a detection may need: a VMDK stream's footer marker, footer and end-of-stream marker
END_BYTES = 1536


class Detector:
    """oslo's format inspectors over an image's bytes, fed in order from offset 0."""

    def __init__(self) -> None:
        self._inspectors = [cls() for cls in fi.ALL_FORMATS.values()]
        self._errored: set[int] = set()
        self._finished = False
        #: bytes fed so far (the end-of-file bytes of :meth:`feed_tail` included)
        self.position = 0

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the image (as InspectWrapper does: an inspector that raises is excluded)."""
        self.position += len(chunk)
        for i, inspector in enumerate(self._inspectors):
            if i in self._errored:
                continue
            try:
                inspector.eat_chunk(chunk)
            except Exception:  # oslo's rule: a failing inspector does not match; never stop the stream
                self._errored.add(i)

    @property
    def formats(self) -> list[fi.FileInspector] | None:
        """The matching inspectors once every inspector has what it needs (or EOF was marked); ``[raw]``
        when none matches; None while undecided. InspectWrapper.formats, to the letter."""
        non_raw = [i for i in self._inspectors if i.NAME != "raw"]
        if not self._finished and not all(i.complete for i in non_raw):
            return None
        matches = [i for i in non_raw if i.format_match]
        return matches or [i for i in self._inspectors if i.NAME == "raw"]

    def missing(self) -> list[str]:
        """``format:region`` for every region an inspector still waits for (errored inspectors too, as
        they hold a decision back in oslo's rule)."""
        return [
            f"{inspector.NAME}:{name}"
            for inspector in self._inspectors
            for name in inspector.context_info
            if not inspector.region(name).complete
        ]

    def waiting_for_end(self) -> bool:
        """Undecided, and every region still missing is an end-of-file region (a VMDK stream's footer):
        the last :data:`END_BYTES` bytes of the file decide, whatever lies between."""
        pending = [
            inspector.region(name)
            for inspector in self._inspectors
            for name in inspector.context_info
            if not inspector.region(name).complete
        ]
        return (
            self.formats is None
            and bool(pending)
            and all(isinstance(r, fi.EndCaptureRegion) for r in pending)
        )

    def feed_tail(self, tail: bytes) -> None:
        """The last bytes of the file when only end-of-file regions are missing (:meth:`waiting_for_end`):
        those keep the last bytes they see wherever they are, and no other region is still capturing."""
        if not self.waiting_for_end():
            raise ValueError("the detector still needs bytes other than the end of the file")
        self.feed(tail[-END_BYTES:])

    def finish(self) -> list[fi.FileInspector]:
        """Mark the end of the file (regions still incomplete count as not matching); the decision."""
        if not self._finished:
            for inspector in self._inspectors:
                inspector.finish()
            self._finished = True
        formats = self.formats
        assert formats is not None  # always decided once finished
        return formats
