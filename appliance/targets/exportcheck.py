"""The export's check of its source: what a :class:`SourceCheck` (the export step's digest of the stored
disk, compared with the one its import recorded) is given, from the writer's own reads of the source or,
for a writer that does not read it itself (qemu-img), from one read of its data ranges."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..errors import Cancelled
from ..image.vmdkwriter import ByteSink
from .exportraw import CHUNK
from .rawio import segments


class SourceCheck(Protocol):
    """The source disk's digest, taken from the writer's own reads of it (no second read of the source):
    ``read(offset, data)`` gets every piece the writer reads, in ascending order (the holes it skips
    are zeros); ``verify(size)`` is called once the whole disk was read, before the output is completed
    (a file renamed into place, an upload completed), and raises to leave nothing."""

    def read(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def verify(self, size: int) -> None: ...

    def output_stands_for_source(self, chunk_size: int) -> bool:
        """Whether the ``sha256-chunked`` of a RAW export's output (the source's bytes, as they are) in
        chunks of ``chunk_size`` can be compared instead of digesting the source a second time."""
        ...

    def verify_output(self, digest: Mapping[str, Any], size: int) -> bool:
        """Compare the RAW output's chunked ``digest`` (raises as :meth:`verify`); False when its chunk
        size is not the one needed (the source is then read again for :meth:`read`)."""
        ...


def checked_producer(
    produce: Callable[[ByteSink], None], check: SourceCheck | None, size: int
) -> Callable[[ByteSink], None]:
    if check is None:
        return produce

    def run(sink: ByteSink) -> None:
        produce(sink)
        check.verify(size)

    return run


def read_whole_source(fd: int, size: int, check: SourceCheck, cancel: threading.Event | None) -> None:
    """Feed ``check`` the source by one read of its data ranges (for a writer that does not read the
    source itself: qemu-img), then verify it."""
    for start, end, is_data in segments(fd, size):
        pos = start
        while is_data and pos < end:
            if cancel is not None and cancel.is_set():
                raise Cancelled("export cancelled")
            chunk = os.pread(fd, min(CHUNK, end - pos), pos)
            if not chunk:
                break
            check.read(pos, chunk)
            pos += len(chunk)
    check.verify(size)
