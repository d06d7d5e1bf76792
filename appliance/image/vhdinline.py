"""A fixed VHD of known size decoded in this process: RAW pass-through, then its 512-byte footer checked.

A fixed VHD is the disk's bytes as they are followed by a footer (:mod:`.vhdfixed`). When the input's
size is known (a manifest's size, an object's Content-Length) there is nothing to parse before the
footer: the data is passed through with zero detection exactly as plain RAW is
(:class:`~.rawinline.InlineRawDecode`, whose module says why the confined child is not worth its two
pipe crossings of every byte for that). Measured on a 2 GiB ImportVolume of a fixed VHD, those crossings
were what kept it above RAW's time.

The footer — the only structure — is 512 bytes at a fixed place, checked by the same
:func:`~.vhdfixed.footer_problem` the child runs (fixed-offset fields and a checksum: the kind of
header check the preflight's format inspectors make in this process on the upload's last bytes before
any byte is written). Same bounds, errors (``CorruptImage`` naming the offset, ``SizeLimitExceeded``)
and boundaries (``vhd-fixed`` at an input offset inside the data, with ``data_bytes``) as the child's
:class:`~.vhdfixed.VhdFixedDecoder` given the input size, so a checkpoint of either resumes the other.
As with the child, the data is written before the footer is seen: a bad footer fails the decode and
the caller drops the output.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .decoders import BOUNDARY_EVERY
from .decoding import SECTOR, Boundary, Sink, corrupt
from .rawinline import InlineRawDecode
from .streamed import StreamResult
from .vhdfixed import FORMAT, footer_problem

_WHAT = "fixed VHD"


class InlineVhdFixedDecode(InlineRawDecode):
    """One fixed-VHD decode of an input of ``input_size`` bytes into ``sink`` in this process (module
    docstring); :meth:`feed` the input in order, then :meth:`finish`."""

    format = FORMAT
    what = _WHAT

    def __init__(
        self,
        sink: Sink,
        *,
        capacity: int,
        max_virtual_size: int,
        input_size: int,
        resume: Boundary | None = None,
        boundary_every: int = BOUNDARY_EVERY,
        on_virtual_size: Callable[[int | None], None] | None = None,
        on_boundary: Callable[[Boundary, int], None] | None = None,
        on_output: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        if input_size < SECTOR:
            raise corrupt(_WHAT, 0, f"an input of {input_size} bytes has no room for a footer")
        data_end = input_size - SECTOR
        # the data is the RAW decode of an input that ends where the footer starts
        super().__init__(
            sink,
            capacity=capacity,
            max_virtual_size=max_virtual_size,
            input_size=data_end,
            resume=resume,
            on_virtual_size=on_virtual_size,
            on_boundary=on_boundary,
            on_output=on_output,
            boundary_every=boundary_every,
            cancel=cancel,
        )
        self.data_end = data_end
        #: input offset of the next byte fed (the RAW part may hold back a short tail: not this)
        self._fed = self.offset
        self._footer = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        """Verified input bytes, in input order: the data to the sink, the last 512 kept as the footer."""
        n = len(data)
        cut = max(0, min(n, self.data_end - self._fed))
        if cut:
            super().feed(data if cut == n else data[:cut])
        if cut < n:
            if len(self._footer) + n - cut > SECTOR:
                raise corrupt(_WHAT, self.data_end + SECTOR, "the input is longer than its size")
            self._footer += data[cut:]
        self._fed += n

    def finish(self) -> StreamResult:
        """End of input: all the data and a valid footer, or ``CorruptImage``."""
        if self._fed < self.data_end:
            raise corrupt(_WHAT, self._fed, f"the input ends before its size {self.data_end + SECTOR}")
        result = super().finish()
        if len(self._footer) != SECTOR:
            raise corrupt(_WHAT, self._fed, "the input ends before a complete footer")
        problem = footer_problem(bytes(self._footer), self.data_end)
        if problem is not None:
            raise corrupt(_WHAT, self.data_end, problem)
        return StreamResult(result.virtual_size, self._fed, result.data_bytes)
