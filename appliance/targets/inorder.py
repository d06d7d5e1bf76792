"""A decoder sink (:class:`appliance.image.decoding.Sink`) over a forward-only byte stream.

A sequential decoder writes the RAW disk at offsets; an S3 multipart upload
(:class:`.s3stream.MultipartWriter`) takes the object's bytes in order. :class:`InOrderSink` joins
them: it accepts writes at ascending offsets, fills each gap before a write with zeros (the object has
no holes: zeros are uploaded, and hashed, like data), and :meth:`InOrderSink.finish` pads the disk with
zeros to its virtual size. ``zero`` ranges need no work: whatever was not written reads as zeros, since
every gap is filled. Memory: one cached zero chunk.

A write below the bytes already handed on cannot be honoured without a copy of the disk: it is
``UnsupportedFormat.GrainOrder`` (a stream-optimized VMDK whose grains are not in ascending LBA order;
every known writer — VMware, qemu-img, open-vmdk — writes them in order; the route cannot know in
advance, so the stream fails with this code and nothing is published). A write beyond ``capacity`` is
``CorruptImage``.

A resumed stream (:mod:`appliance.steps.s3_checkpoint`) starts the sink at the disk offset its
decoder's boundary had reached (``start``) and drops what is handed on below ``skip_to``: those bytes
are in the parts the multipart upload already holds, produced again by the decoder from its boundary.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import Finding, ImageRejected
from ..image.decoding import zeros

#: zeros handed on at a time when a gap is filled
ZERO_CHUNK = 1 << 20


class ForwardWriter(Protocol):
    """A byte stream that only appends (:class:`.s3stream.MultipartWriter` is one)."""

    def write(self, data: bytes) -> int: ...


def out_of_order(offset: int, position: int) -> ImageRejected:
    """``UnsupportedFormat.GrainOrder``: the decoder wrote at ``offset`` after reaching ``position``."""
    return ImageRejected(
        [
            Finding.error(
                "UnsupportedFormat.GrainOrder",
                f"the image writes disk offset {offset} after offset {position}: its data is not in "
                "ascending order (a stream-optimized VMDK whose grains are out of LBA order), so it cannot "
                "stream into an object store; rewrite it with `qemu-img convert -O vmdk -o "
                "subformat=streamOptimized` (grains in order) or upload it as RAW",
            )
        ]
    )


class InOrderSink:
    """Writes at ascending offsets → one forward byte stream (module docstring)."""

    def __init__(self, out: ForwardWriter, *, capacity: int, start: int = 0, skip_to: int = 0) -> None:
        if not 0 <= start <= skip_to or start > capacity:
            raise ValueError(f"a sink resumed at {start} cannot skip to {skip_to}")
        self.out = out
        self.capacity = capacity
        #: bytes handed on so far (data and filled gaps): the next offset the stream is at
        self.position = start
        #: bytes below this offset are not handed on (already uploaded: a resumed stream)
        self.skip_to = skip_to
        #: bytes of the written ranges (not gaps)
        self.data_bytes = 0

    def _fill(self, end: int) -> None:
        while self.position < end:
            n = min(ZERO_CHUNK, end - self.position)
            self._emit(zeros(n))

    def _emit(self, data: bytes) -> None:
        """Hand ``data`` on (all but what lies below :attr:`skip_to`); the position moves past it."""
        drop = min(len(data), max(0, self.skip_to - self.position))
        if drop < len(data):
            self.out.write(data[drop:] if drop else data)
        self.position += len(data)

    def write(self, offset: int, chunk: bytes) -> None:
        if offset < self.position:
            raise out_of_order(offset, self.position)
        if offset + len(chunk) > self.capacity:
            raise _outside(offset, len(chunk), self.capacity)
        self._fill(offset)
        self._emit(chunk)
        self.data_bytes += len(chunk)

    def zero(self, offset: int, length: int) -> None:
        """Nothing to do: a range not written reads as zeros (gaps are filled on the next write)."""
        if offset + length > self.capacity:
            raise _outside(offset, length, self.capacity)

    def finish(self, size: int) -> None:
        """Pad with zeros up to ``size``, the disk's virtual size (data beyond it is ``CorruptImage``)."""
        if self.position > size:
            raise _outside(0, self.position, size)
        self._fill(size)


def _outside(offset: int, length: int, capacity: int) -> ImageRejected:
    return ImageRejected(
        [
            Finding.error(
                "CorruptImage",
                f"the image writes {length} bytes at disk offset {offset}, beyond its size of {capacity} "
                "bytes; create it again and re-upload it",
            )
        ]
    )
