"""The checks of a source's answers during a ranged read: the first answer, every later range, the
declared size against the download limit, and the error of a source that changed under the read.

Size bounds (``settings.max_size``, the download limit). The object's size comes from the first
answer's ``Content-Range`` (its ``Content-Length`` when it is the whole object): a larger source is
refused with ``SizeLimitExceeded.Download`` before its body is read. A ranged answer must be exactly
the range asked (``Content-Range`` and ``Content-Length``), of the same total, and no longer than
announced; anything else is ``SourceIntegrity`` (not retried). An object replaced mid-read (another
ETag or size) fails with ``Source.Changed`` (:class:`~appliance.errors.SourceChanged`): bytes already
read cannot be taken back. :class:`~.reader.RangeReader` and :mod:`.single` apply them; nothing here
does I/O.
"""

from __future__ import annotations

from ..errors import SourceChanged
from .http import SourceIntegrity, SourceUnavailable
from .origins import Response
from .ranges import ReaderSettings, Validator, parse_content_range, too_large


def source_changed(where: str, offset: int, why: str) -> SourceChanged:
    """``Source.Changed``: ``where`` is no longer what was read before ``offset`` (``why``)."""
    return SourceChanged(
        f"{where} changed while it was being read (at offset {offset}: {why}); make sure "
        "the image is not overwritten while it is imported, then import it again"
    )


def check_size(where: str, cap: int | None, size: int | None) -> None:
    """Refuse a source that says it is larger than ``cap`` (the download limit; None: no cap), before
    its body is read."""
    if cap is not None and size is not None and size > cap:
        raise too_large(where, cap, size)


def check_first(
    where: str, head: Response, partial: tuple[int, int, int | None] | None, settings: ReaderSettings
) -> None:
    """The first answer (``partial``: its parsed ``Content-Range``): a whole object of an acceptable
    ``Content-Length``, or exactly the range asked (bytes 0..range_size-1, or the whole object when
    it is smaller), of a consistent ``Content-Range`` and an acceptable size."""
    if partial is None:
        check_size(where, settings.max_size, head.content_length)
        return
    first, last, total = partial
    if first != 0:
        raise SourceIntegrity(f"{where} answered the first GET with bytes from {first}")
    if last < first or (total is not None and last >= total):
        raise SourceIntegrity(
            f"{where} answered with an impossible Content-Range (bytes {first}-{last}/{total})"
        )
    check_size(where, settings.max_size, total)
    if settings.max_size is not None and last >= settings.max_size:
        raise too_large(where, settings.max_size)
    wanted = min(settings.range_size, total) - 1 if total is not None else last
    if last != wanted:
        raise SourceIntegrity(f"{where} answered bytes {first}-{last} for a request of bytes 0-{wanted}")
    length = head.content_length
    if length is not None and length != last - first + 1:
        raise SourceIntegrity(f"{where} announced {length} bytes for the range {first}-{last}")


def check_range(
    where: str, response: Response, start: int, end: int, validator: Validator, size: int | None
) -> None:
    """A ranged answer must be exactly bytes ``start``..``end`` of the same object (``validator``'s
    ETag, ``size`` bytes); an answer of the whole object is a transient failure (retried)."""
    etag, known = response.etag, validator.etag
    if etag and known and etag != known:
        raise source_changed(where, start, f"its ETag is now {etag}, it was {known}")
    partial = parse_content_range(response.status, response.headers.get("Content-Range"))
    if partial is None:
        raise SourceUnavailable(
            f"{where} answered a ranged GET at {start} with the whole object", transient=True
        )
    first, last, total = partial
    if total is not None and total != size:
        raise source_changed(where, start, f"it is {total} bytes now, it was {size}")
    if (first, last) != (start, end):
        raise SourceIntegrity(f"{where} answered bytes {first}-{last} for a request of bytes {start}-{end}")
    length = response.content_length
    if length is not None and length != end - start + 1:
        raise SourceIntegrity(f"{where} announced {length} bytes for the range {start}-{end}")
