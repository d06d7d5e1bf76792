"""What an import knows of its source before and after reading it, shared by the steps that read
one (``source.fetch`` in :mod:`.source_fetch`, ``source.route`` and ``image.stream`` in
:mod:`.image_stream`): the source checked against the enabled import methods
(:func:`checked_source`), the header-only preflight of the object by two ranged GETs
(:func:`source_preflight`: its first and last bytes against the claimed format, before anything is
downloaded; a compressed source is preflighted on its decompressed head, decoded by the confined
decompressor from the object's first bytes, and a compressed OVA is ``Ova.Compressed`` there, another
compressed archive ``FormatMismatch.Archive``), and the
provenance entry of the bytes read (:func:`source_digest`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ..errors import ImageRejected, ImagingError
from ..image.archived import refuse_archived
from ..image.decompress import decompress_head
from ..image.formats import parse_claim
from ..image.inspect import PREFLIGHT_HEAD, PREFLIGHT_TAIL, Preflight, preflight
from ..sources import s3 as s3mod
from ..sources.digest import b64_to_hex
from ..sources.fetch import parse_source
from ..sources.http import SourceIntegrity, SourceUnavailable, TransferInterrupted
from ..sources.methods import UPLOAD, check_enabled, method_of_source
from ..sources.ordered import LinkedEvent
from ..sources.origins import Origin, origin_for
from ..sources.ranges import ReaderSettings, parse_content_range, too_large
from ..sources.retrier import Retrier
from ..sources.urlfilter import UrlPolicy
from ..workflow.step import StepContext
from .provenance import check_expected
from .retries import retry_reporter
from .stream_checkpoint import StreamCheckpoints
from .uploads import upload_params

log = logging.getLogger(__name__)
#: the name of one disk of a task (``disk2``): its file in scratch and its image in the image target
DISK_NAME = {"type": ["string", "null"], "pattern": r"^[a-z][a-z0-9]{0,15}$"}

#: at most this many compressed bytes are read to preflight a compressed source (its decompressed head)
PREFLIGHT_COMPRESSED = 8 << 20


def source_policy(ctx: StepContext) -> UrlPolicy:
    """The SSRF policy a task's source URLs are checked against."""
    return UrlPolicy.from_config(ctx.config.sources)


def checked_source(ctx: StepContext, source: dict[str, Any]) -> dict[str, Any]:
    """``source`` once its import method is known to be enabled (``ImportMethodDisabled``), an
    upload naming the task's account: the uploads it may read are that account's (an operator's task,
    without an account, names the account in the source's ``account``)."""
    method = method_of_source(source)
    check_enabled(ctx.config.sources, method, "Url" if source.get("url") else "UserBucket")
    return upload_params(ctx, source) if method == UPLOAD else source


def source_digest(
    ctx: StepContext, source: dict[str, Any], *, sha256: str | None, size: int, md5_checked: str | None
) -> dict[str, Any]:
    """The ``sources`` entry of a provenance record (:mod:`.provenance`) for a source read once
    (fetched into scratch or streamed): the sha256 computed as the bytes arrived (``sha256``,
    ``size``), and the source's own digests checked — ``md5_checked``, the ETag
    when it is the object's MD5 (checked by the download), and an S3 object's
    ``x-amz-checksum-sha256`` when it has one (one HEAD; a full-object checksum must equal the sha256
    of the bytes received: ``SourceIntegrity`` otherwise; a multipart upload's composite checksum is
    recorded, not checked)."""
    src = parse_source(source)
    checked: list[dict[str, Any]] = []
    if md5_checked:
        checked.append({"what": "etag-md5", "value": md5_checked, "verified": True})
    if src.kind == "s3":
        assert src.bucket and src.key
        try:
            client = s3mod.s3_client(ctx.config.sources.s3, source_policy(ctx))
            value = s3mod.checksum_sha256(client, src.bucket, src.key)
        except ImagingError as exc:  # the object was read; a HEAD refused now only loses the record
            log.warning("%s: its checksum could not be asked for: %s", src, exc.message)
            value = None
        if value is not None:
            as_hex = b64_to_hex(value)
            if as_hex is not None and sha256 is not None and as_hex != sha256:
                raise SourceIntegrity(
                    f"{src}: the sha256 of the received bytes ({sha256}) is not the object's "
                    f"x-amz-checksum-sha256 ({as_hex}); the download was corrupted or the object changed, "
                    "try again"
                )
            # verified only when compared: a resumed stream may not know the sha256 of what it read
            verified = as_hex is not None and sha256 is not None
            checked.append({"what": "x-amz-checksum-sha256", "value": value, "verified": verified})
    out = {"location": str(src), "sha256": sha256, "size": size, "checked": checked}
    if source.get("expected_sha256"):  # the user's, checked against ``sha256`` (provenance lists it)
        out["expected_sha256"] = str(source["expected_sha256"]).lower()
    return out


def record_streamed_source(
    ctx: StepContext,
    facts: dict[str, Any],
    source: dict[str, Any],
    checkpoints: StreamCheckpoints,
    size: int,
    md5_checked: list[str],
    disk: str | None,
) -> str | None:
    """``facts["source"]``, the :func:`source_digest` of a source streamed once or resumed (the sha256
    its ``checkpoints`` hashed; ``sha256_unknown`` says why there is none), then checked against the
    user's expected sha256 (``Source.DigestMismatch``), so that a wrong source fails before the disk
    is published. Returns the sha256 (None: unknown)."""
    sha256 = checkpoints.sha256()
    facts["source"] = source_digest(
        ctx,
        source,
        sha256=sha256,
        size=size,
        md5_checked=md5_checked[0] if md5_checked else None,
    )
    if sha256 is None:
        facts["source"]["sha256_unknown"] = checkpoints.unknown
    check_expected(source.get("expected_sha256"), sha256, facts["source"]["location"], disk)
    return sha256


def _get_range(origin: Origin, start: int, end: int, retrier: Retrier) -> tuple[bytes, int | None]:
    """Bytes ``start..end`` (inclusive) of ``origin`` and the object's size (None when not said); a
    transient failure or a stall (no byte for ``sources.stall_seconds``) is retried with the ranged
    reader's back-off (``retrier``), its retries told to its ``on_retry``."""
    failures = 0
    while True:
        try:
            return _get_range_once(origin, start, end, retrier.stop)
        except SourceUnavailable as exc:
            if exc.status == 416 or not exc.transient:
                raise
            failures = retrier.failed(exc, failures, start)


def _get_range_once(
    origin: Origin, start: int, end: int, cancel: threading.Event
) -> tuple[bytes, int | None]:
    response = origin.get(start, end, cancel=cancel)
    with response:
        partial = parse_content_range(response.status, response.headers.get("Content-Range"))
        want = end - start + 1
        body = bytearray()
        for chunk in response.iter_chunks():
            body += chunk
            if len(body) >= want:
                break
        if partial is None:  # a whole answer (Range not served): its length is the size
            if start:
                return b"", response.content_length
            return bytes(body[:want]), response.content_length
        if len(body) < min(want, partial[1] - partial[0] + 1):
            raise TransferInterrupted(
                f"{origin.where}: the range at {start} ended after {len(body)} bytes", received=len(body)
            )
        return bytes(body[:want]), partial[2]


def source_preflight(ctx: StepContext, source: dict[str, Any]) -> Preflight | None:
    """:func:`~appliance.image.inspect.preflight` of a source object by two ranged GETs (its first
    :data:`PREFLIGHT_HEAD` and last :data:`PREFLIGHT_TAIL` bytes) against the claimed ``format``; None
    without a claim the inspectors know. ``details["object_size"]``: the object's size when known."""
    claim = str(source.get("format") or "").lower() or None
    try:
        parse_claim(claim)
    except ImagingError:
        return None  # a container (OVA...) or a name the inspection step reports
    if claim is None:
        return None
    settings = ReaderSettings.from_sources(ctx.config.sources)
    origin = origin_for(source, source_policy(ctx), ctx.config.sources.s3, settings=settings)
    retrier = Retrier(origin.where, settings, LinkedEvent(ctx.cancel), on_retry=retry_reporter(ctx))
    try:
        head, size = _get_range(origin, 0, PREFLIGHT_HEAD - 1, retrier)
    except SourceUnavailable as exc:
        if exc.status == 416:  # an empty object has no first byte: the download and inspection say so
            return None
        raise
    tail: bytes | None = None
    if size is not None and size > len(head):
        tail, _ = _get_range(origin, max(0, size - PREFLIGHT_TAIL), size - 1, retrier)
        tail = tail or None
    elif size is None:
        size = None if len(head) >= PREFLIGHT_HEAD else len(head)
    verdict = preflight(head, tail, claim, config=ctx.config, size=size)
    if verdict.compression is not None and verdict.safe:
        # a compressed head decides only the compression: the decompressed head decides the rest
        verdict = _compressed_preflight(ctx, origin, retrier, source, claim, verdict, head, size)
    cap = ctx.config.limits.max_decompressed_size
    if size is not None and size > cap:
        verdict.findings.extend(too_large(str(parse_source(source)), cap, size).findings)
    verdict.details["object_size"] = size
    return verdict


def _compressed_preflight(
    ctx: StepContext,
    origin: Origin,
    retrier: Retrier,
    source: dict[str, Any],
    claim: str,
    outer: Preflight,
    head: bytes,
    size: int | None,
) -> Preflight:
    """:func:`preflight` of the first :data:`PREFLIGHT_HEAD` decompressed bytes of a compressed source
    (the claim's inner format against them), decoded by the confined decompressor from the object's
    first bytes: the head already read, and only when it does not decode to enough, the object's
    bytes up to :data:`PREFLIGHT_COMPRESSED` (one more ranged GET)."""
    assert outer.compression is not None
    name = str(parse_source(source))

    def decode(data: list[bytes], complete: bool) -> tuple[bytes, bool]:
        assert outer.compression is not None
        return decompress_head(
            data,
            outer.compression,
            PREFLIGHT_HEAD,
            complete=complete,
            limits=ctx.config.limits,
            cancel=ctx.cancel,
            name=name,
        )

    read = len(head)
    decoded, ended = decode([head], size is not None and read >= size)
    limit = PREFLIGHT_COMPRESSED if size is None else min(size, PREFLIGHT_COMPRESSED)
    if not ended and len(decoded) < PREFLIGHT_HEAD and len(head) >= PREFLIGHT_HEAD and read < limit:
        more, _ = _get_range(origin, read, limit - 1, retrier)
        read += len(more)
        decoded, ended = decode([head, more], size is not None and read >= size)
    if ended and not decoded:
        return outer  # an empty image: the inspection of the download says so
    claimed_fmt, _ = parse_claim(claim)
    try:  # an OVA or a disk's tar wrapped in gzip & co. would otherwise stream as a RAW disk holding it
        refuse_archived(outer.compression, decoded, claimed_fmt)
    except ImageRejected as exc:
        outer.findings.extend(exc.findings)
        return outer
    inner = preflight(decoded, None, claimed_fmt, config=ctx.config, size=len(decoded) if ended else None)
    inner.compression = outer.compression
    inner.findings[:0] = [f for f in outer.findings if all(f.code != g.code for g in inner.findings)]
    inner.details["compressed_bytes_read"] = read
    inner.details["decompressed_head_bytes"] = len(decoded)
    return inner
