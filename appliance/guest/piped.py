"""The guest probe's disk over a pipe: for an image that is not a local file (an object in S3).

The confined probe child (:mod:`.probe`, ``--piped SIZE``) has no network and no file to open: it reads
the disk from its parent through its stdin and stdout, and the parent answers each read from wherever the
disk is (:func:`appliance.guest.validate.validate_ranges`; for S3 a cached ranged reader,
:class:`appliance.targets.s3read.ObjectRangeReader`). So the child keeps every confinement it has (no
network, no credentials, no URL: nothing secret reaches it, in its argv or anywhere else) and the parent
decides what is read — at most :data:`MAX_READ` bytes per request, never beyond the disk's size.

Frames (little-endian): child → parent ``R`` + u64 offset + u32 length (a read) or ``A`` + u64 0 + u32
length, then that many bytes of JSON (the probe's one answer, as :mod:`.probe` prints it for a file);
parent → child u32 length, then that many bytes (fewer than asked only at the end of the disk). Anything
else from the child ends the conversation (the parent treats it as a reader failure). Within the child,
fd 1 is the protocol: the probe moves it aside and points fd 1 at stderr, so stray prints cannot break
a frame.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from ..readat import ReadAtFile

READ, ANSWER = b"R", b"A"
FRAME = struct.Struct("<cQI")
LENGTH = struct.Struct("<I")
#: the most bytes one request may ask for (the parent refuses more)
MAX_READ = 16 << 20
#: what the child asks for at least, so a parser's many small reads become few round trips
_READ_AHEAD = 64 << 10
#: the largest answer accepted from the child
MAX_ANSWER = 8 << 20


class ProtocolError(Exception):
    """The other side broke the frame protocol (or hung up in the middle of a frame)."""


def read_exactly(fd: int, n: int) -> bytes:
    """``n`` bytes from ``fd``; b"" when it is at its end before the first byte, else ProtocolError."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        piece = os.read(fd, n - got)
        if not piece:
            if got == 0:
                return b""
            raise ProtocolError(f"the pipe ended inside a frame ({got} of {n} bytes)")
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ------------------------------------------------------------------------------------ the child side


class PipedDisk(ReadAtFile):
    """The disk as a read-only, seekable file whose reads are requests to the parent (child side)."""

    def __init__(self, rfd: int, wfd: int, size: int) -> None:
        super().__init__()
        self.rfd, self.wfd, self.size = rfd, wfd, size
        self._chunk_at = 0
        self._chunk = b""

    def read_at(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        pieces: list[bytes] = []
        pos = offset
        while pos < end:
            if not self._chunk_at <= pos < self._chunk_at + len(self._chunk):
                want = min(MAX_READ, max(end - pos, _READ_AHEAD), self.size - pos)
                self._chunk_at, self._chunk = pos, self._request(pos, want)
                if not self._chunk:
                    break
            start = pos - self._chunk_at
            piece = self._chunk[start : start + end - pos]
            pieces.append(piece)
            pos += len(piece)
        return b"".join(pieces)

    def _request(self, offset: int, length: int) -> bytes:
        _write_all(self.wfd, FRAME.pack(READ, offset, length))
        head = read_exactly(self.rfd, LENGTH.size)
        if not head:
            raise ProtocolError("the parent closed the disk")
        (n,) = LENGTH.unpack(head)
        if n > length:
            raise ProtocolError(f"the parent answered {n} bytes to a read of {length}")
        return read_exactly(self.rfd, n) if n else b""


def send_answer(wfd: int, answer: bytes) -> None:
    """The child's one answer (JSON bytes), after which it says nothing more."""
    _write_all(wfd, FRAME.pack(ANSWER, 0, len(answer)) + answer)


# ----------------------------------------------------------------------------------- the parent side


def serve(rfd: int, wfd: int, size: int, read_at: Callable[[int, int], bytes]) -> bytes | None:
    """Answer the child's reads from ``read_at(offset, length)`` until it sends its answer (returned)
    or hangs up (None). Raises :class:`ProtocolError` for a malformed frame, and what ``read_at``
    raises (the caller kills the child then)."""
    while True:
        head = read_exactly(rfd, FRAME.size)
        if not head:
            return None
        tag, offset, length = FRAME.unpack(head)
        if tag == ANSWER:
            if length > MAX_ANSWER:
                raise ProtocolError(f"an answer of {length} bytes")
            return read_exactly(rfd, length)
        if tag != READ or length > MAX_READ:
            raise ProtocolError(f"a request {tag!r} of {length} bytes")
        data = read_at(offset, length) if offset < size else b""
        data = data[: max(0, min(length, size - offset))]
        try:
            _write_all(wfd, LENGTH.pack(len(data)) + data)
        except BrokenPipeError:
            return None
