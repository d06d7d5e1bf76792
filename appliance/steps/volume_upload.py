"""The upload of an import manifest as ``volume.import`` reads it: its parts from a given index on,
verified and hashed, to a write callback (downloaded, or read from the appliance's staged upload
area); byte ranges of it; the header-only preflight of its first and last bytes and the sequential
decoder that verdict allows; the part holding an input offset; its provenance ``sources`` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ImageRejected
from ..image.inspect import PREFLIGHT_HEAD, PREFLIGHT_TAIL, Preflight, preflight
from ..sources.digest import StreamDigest
from ..sources.hashthread import HashingThread
from ..sources.http import HttpClient
from ..sources.manifest import ImportManifest, Part
from ..sources.parts import download_parts, read_part_range
from ..sources.staged import UploadArea
from ..sources.upload import manifest_origin, read_parts, read_range
from ..sources.urlfilter import UrlPolicy
from ..workflow.step import StepContext
from .retries import retry_reporter


def _policy(ctx: StepContext) -> UrlPolicy:
    """The SSRF policy the parts are downloaded under."""
    return UrlPolicy.from_config(ctx.config.sources)


def part_at(m: ImportManifest, offset: int) -> int:
    """The index of the part holding input byte ``offset`` (len(parts) at the end)."""
    for part in m.parts:
        if part.start <= offset <= part.end:
            return part.index
    return len(m.parts)


def upload_source(m: ImportManifest, digest: StreamDigest) -> dict[str, Any]:
    """The provenance ``sources`` entry of an upload: where (the manifest's parts, by key; no URL), the
    sha256 of the bytes as they streamed, the part MD5s checked."""
    keys = sorted({p.key for p in m.parts})
    where = keys[0] if len(keys) == 1 else f"{len(m.parts)} parts of {m.file_format} upload"
    return {"location": where, **digest.to_dict()}


def download_upload(
    ctx: StepContext,
    m: ImportManifest,
    write: Callable[[int, bytes], None],
    *,
    start_index: int,
    on_part: Callable[[Part, int], None],
    digest: StreamDigest,
) -> int:
    """The parts from ``start_index`` on, verified, to ``write``: downloaded for an import manifest,
    read from the appliance's disk for a staged upload (``upload://``). ``digest`` sees every byte
    in order on its way to ``write`` (hashed in a thread of its own: :mod:`~appliance.sources.hashthread`,
    done when this returns), and each part's MD5 that was checked. ``write`` gets ``bytes`` (one copy
    of the reader's reused buffer, shared with the hashing thread)."""
    with HashingThread(digest.update) as hasher:

        def hashed(offset: int, chunk: bytes | memoryview) -> None:
            data = chunk if isinstance(chunk, bytes) else bytes(chunk)
            hasher.put(data)
            write(offset, data)

        staged = manifest_origin(m, UploadArea.from_sources(ctx.config.sources))
        if staged is not None:
            origin, validator = staged
            done = read_parts(
                m, hashed, origin, validator, start_index=start_index, on_part=on_part, cancel=ctx.cancel
            )
        else:
            done = download_parts(
                m,
                hashed,
                _policy(ctx),
                start_index=start_index,
                on_part=on_part,
                cancel=ctx.cancel,
                on_checked=lambda part, md5: digest.part_md5(part.index, md5),
                on_retry=retry_reporter(ctx),  # a retry (a stall among them) is a task event as it happens
            )
        hasher.drain()
    return done


def read_upload_range(m: ImportManifest, start: int, end: int, http: HttpClient, ctx: StepContext) -> bytes:
    """Bytes ``[start, end)`` of the upload, by ranged GETs of the parts holding them, each retried
    with the download's back-off (a stalled or broken GET is a ``source.retry`` event)."""
    staged = manifest_origin(m, UploadArea.from_sources(ctx.config.sources))
    if staged is not None:
        return read_range(staged[0], staged[1], start, end, ctx.cancel)
    pieces: list[bytes] = []
    for part in m.parts:
        lo, hi = max(start, part.start), min(end, part.end + 1)
        if lo < hi:
            pieces.append(
                read_part_range(http, part, lo, hi, cancel=ctx.cancel, on_retry=retry_reporter(ctx))
            )
    return b"".join(pieces)


def upload_preflight(ctx: StepContext, m: ImportManifest, format: str) -> Preflight:
    """The header-only checks on the upload's first and last bytes, before anything is written;
    ImageRejected (the codes of a full inspection) for a mislabelled or unsafe upload."""
    http = HttpClient(_policy(ctx))
    head = read_upload_range(m, 0, min(PREFLIGHT_HEAD, m.size), http, ctx)
    tail = read_upload_range(m, max(0, m.size - PREFLIGHT_TAIL), m.size, http, ctx)
    verdict = preflight(head, tail, format.lower(), config=ctx.config, size=m.size)
    if not verdict.safe:
        raise ImageRejected(verdict.errors)
    return verdict


def save_part_checkpoint(
    ctx: StepContext, part: Part, done: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint after verified part ``part``: the next part to fetch, the upload bytes done."""
    state = {"next": part.index + 1, "done": done, **(extra or {})}
    ctx.save_checkpoint(state)  # committed (and fenced by the lease) before the next part is written
    return state
