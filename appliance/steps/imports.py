"""Image import steps: ``source.fetch`` (a disk from S3 or https into scratch, after a
header-only preflight of the object) and ``image.store`` (the converted disk to the image target).

``source.fetch`` reads with the ranged reader (:func:`appliance.sources.download.download_to_file`:
parallel ranged GETs where the origin serves them, the download limit from the announced size) and
checkpoints the verified offset in the task store every ``sources.checkpoint_every`` bytes; an
interrupted fetch (kill -9, suspend) continues from its checkpoint when its file in scratch is still
there, without a second preflight. A compressed source is preflighted on its decompressed head
(decoded by the confined decompressor from the object's first bytes).

Progress follows one model: ``phase`` is the EC2-style sub-state, ``percent`` covers the whole
transfer, and ``converted`` counts bytes written, which never goes backwards.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from ..errors import Finding, ImageRejected, ImagingError, Severity, UsageError
from ..image.decompress import decompress_head
from ..image.formats import parse_claim
from ..image.inspect import PREFLIGHT_HEAD, PREFLIGHT_TAIL, Preflight, preflight
from ..progress import Progress, StageMeter
from ..scratch import Allowance
from ..sources import s3 as s3mod
from ..sources.digest import b64_to_hex
from ..sources.download import download_to_file
from ..sources.fetch import parse_source
from ..sources.http import SourceIntegrity, SourceUnavailable, TransferInterrupted
from ..sources.methods import UPLOAD, URL, check_enabled, method_of_source
from ..sources.origins import Origin, origin_for
from ..sources.ranges import ReaderSettings, parse_content_range, too_large
from ..sources.reader import RangeReader
from ..sources.urlfilter import UrlPolicy
from ..targets import get_image_target
from ..targets.encryption import requested
from ..workflow.step import Step, StepContext
from .bundles import bundle_manifest_url, unbundle_source
from .provenance import check_expected, import_metadata
from .retries import retry_reporter
from .uploads import upload_params

log = logging.getLogger(__name__)
#: the name of one disk of a task (``disk2``): its file in scratch and its image in the image target
DISK_NAME = {"type": ["string", "null"], "pattern": r"^[a-z][a-z0-9]{0,15}$"}
#: ``source.fetch`` without a ``preflight`` argument runs its own
_NOT_GIVEN: Any = object()

#: at most this many compressed bytes are read to preflight a compressed source (its decompressed head)
PREFLIGHT_COMPRESSED = 8 << 20


def _policy(ctx: StepContext) -> UrlPolicy:
    return UrlPolicy.from_config(ctx.config.sources)


def checked_source(ctx: StepContext, source: dict[str, Any]) -> dict[str, Any]:
    """``source`` once its import method is known to be enabled (``ImportMethodDisabled``), an
    upload naming the task's account: the uploads it may read are that account's (an operator's task,
    without an account, names the account in the source's ``account``)."""
    method = method_of_source(source)
    check_enabled(ctx.config.sources, method, "Url" if source.get("url") else "UserBucket")
    return upload_params(ctx, source) if method == UPLOAD else source


class SourceFetchStep(Step):
    """Download a disk (``{url}``: s3:// or https://; or ``{bucket, key}``) into scratch, with its sha256."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {
            "source": {"type": "object"},
            "name": DISK_NAME,
            # the verdict of a preflight an earlier step ran (source.route): not fetched again
            "preflight": {"type": ["object", "null"]},
        },
    }

    def run(
        self,
        ctx: StepContext,
        source: dict[str, Any],
        name: str | None = None,
        preflight: Any = _NOT_GIVEN,
    ) -> dict[str, Any]:
        source = checked_source(ctx, source)
        # one file per disk of a task: an image's data disks are named (disk2, …)
        dst = ctx.workdir / (f"source-{name}.img" if name else "source.img")
        # A download interrupted after a checkpoint (kill -9, suspend, a lost lease) continues from it,
        # when the checkpoint is this source's and the file in scratch still holds its bytes.
        saved = ctx.load_checkpoint()
        resume = saved if saved and saved.get("source") == _source_key(source) and dst.exists() else None
        verdict: Preflight | None
        if resume is not None and isinstance(resume.get("preflight"), dict):
            verdict = _saved_verdict(resume["preflight"])
        elif preflight is not _NOT_GIVEN:  # decided by source.route on the same bytes
            verdict = _saved_verdict(preflight) if isinstance(preflight, dict) else None
        else:
            # fail fast: the header-only checks on the object's first and last bytes, before the download
            verdict = source_preflight(ctx, source)
        if verdict is not None and not verdict.safe:
            raise ImageRejected(verdict.errors)
        bundle = bundle_manifest_url(source)
        if bundle is not None:  # an EC2 image bundle: unbundled instead of downloaded (steps/bundles.py)
            dst.unlink(missing_ok=True)
            return unbundle_source(ctx, bundle, dst)
        if resume is None:
            dst.unlink(missing_ok=True)  # a partial download without a checkpoint: start anew
        # Reserved as it is known: the object's size from the first answer, or as the bytes of a
        # source without a length arrive. Kept, at the downloaded size, while the file exists.
        allowance = Allowance(ctx.scratch, f"downloading {parse_source(source)}")
        ctx.ledger_created(dst)
        checkpointing = [True]

        def report(p: dict[str, Any]) -> None:
            # the download is the first half of the task; its bytes go to scratch, not to the target
            percent = p["percent"]
            ctx.progress(p | {"percent": None if percent is None else percent / 2, "converted": None})

        # bytes read and written, rate and ETA, reported also while nothing arrives (a stall shows rate 0)
        meter = StageMeter("downloading", None, report)

        def on_progress(done: int, total: int | None) -> None:
            meter.set_total(total)
            meter.read(done)
            meter.wrote(done)

        def checkpoint(state: dict[str, Any]) -> None:
            if not checkpointing[0]:
                return
            state = {
                "source": _source_key(source),
                "preflight": verdict.to_dict() if verdict is not None else None,
                **state,
            }
            try:
                ctx.save_checkpoint(state)
            except UsageError:  # not run under a lease (a bare engine run): nothing resumes it anyway
                checkpointing[0] = False

        settings = ReaderSettings.from_sources(ctx.config.sources)
        try:
            with meter:
                result = download_to_file(
                    source,
                    dst,
                    _policy(ctx),
                    ctx.config.sources.s3,
                    max_bytes=ctx.config.limits.max_decompressed_size,
                    settings=settings,
                    reserve=allowance.cover,
                    cancel=ctx.cancel,
                    on_progress=on_progress,
                    checkpoint=checkpoint,
                    resume=resume,
                    keep_on_cancel=True,
                    on_retry=retry_reporter(ctx),  # a retry (a stall among them) is a task event
                )
        except BaseException:
            allowance.release()
            raise
        allowance.shrink_to(result.size)
        try:
            digest = source_digest(
                ctx, source, sha256=result.sha256, size=result.size, md5_checked=result.md5_checked
            )
            # the user's expected sha256, before anything is converted or stored
            check_expected(source.get("expected_sha256"), result.sha256, digest["location"], name)
        except BaseException:
            dst.unlink(missing_ok=True)
            ctx.ledger_removed(dst)
            allowance.release()
            raise
        return {
            "path": str(result.path),
            "size": result.size,
            "sha256": result.sha256,
            "etag": result.etag,
            "preflight": verdict.to_dict() if verdict is not None else None,
            "digest": digest,
        }

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result and Path(result["path"]).exists():
            Path(result["path"]).unlink()
            ctx.ledger_removed(result["path"])

    def plan(
        self,
        ctx: StepContext,
        source: dict[str, Any],
        name: str | None = None,
        preflight: Any = _NOT_GIVEN,
    ) -> dict[str, Any]:
        source = checked_source(ctx, source)
        if source.get("url") and method_of_source(source) == URL:
            _policy(ctx).check(source["url"])
        # the same preflight as the run: the verdict on the object's first and last bytes, and its size
        # (what the download needs in scratch)
        try:
            verdict = source_preflight(ctx, source)
        except ImagingError as exc:
            return {
                "downloads": source,
                "scratch_bytes": None,
                "preflight": {"error": exc.code, "message": exc.message},
            }
        size = verdict.details.get("object_size") if verdict is not None else None
        return {
            "downloads": source,
            "scratch_bytes": size,
            "preflight": verdict.to_dict() if verdict is not None else None,
        }


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
            client = s3mod.s3_client(ctx.config.sources.s3, _policy(ctx))
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


def _source_key(source: dict[str, Any]) -> str:
    """What a checkpoint is of: the source's location (a presigned URL's signature may change; the
    object, checked by its validator on resume, may not)."""
    return str(parse_source(source))


def _saved_verdict(data: dict[str, Any]) -> Preflight:
    """The preflight verdict a checkpoint kept (it was decided before the download began)."""
    verdict = Preflight(
        format=data.get("format"),
        qemu_format=data.get("qemu_format"),
        virtual_size=data.get("virtual_size"),
        compression=data.get("compression"),
        pending=list(data.get("pending") or []),
    )
    for f in data.get("findings") or []:
        verdict.findings.append(Finding(str(f["code"]), Severity(f["severity"]), str(f["message"])))
    verdict.details.update(data.get("details") or {})
    return verdict


def _get_range(origin: Origin, start: int, end: int, retrier: RangeReader) -> tuple[bytes, int | None]:
    """Bytes ``start..end`` (inclusive) of ``origin`` and the object's size (None when not said); a
    transient failure or a stall (no byte for ``sources.stall_seconds``) is retried with the ranged
    reader's back-off, its retries told to the reader's ``on_retry`` (``retrier``: a reader of
    ``origin`` that is never opened, used for its retry policy)."""
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
    origin = origin_for(source, _policy(ctx), ctx.config.sources.s3, settings=settings)
    retrier = RangeReader(origin, settings, cancel=ctx.cancel, on_retry=retry_reporter(ctx))
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
        verdict = _compressed_preflight(ctx, retrier, source, claim, verdict, head, size)
    cap = ctx.config.limits.max_decompressed_size
    if size is not None and size > cap:
        verdict.findings.extend(too_large(str(parse_source(source)), cap, size).findings)
    verdict.details["object_size"] = size
    return verdict


def _compressed_preflight(
    ctx: StepContext,
    retrier: RangeReader,
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
        more, _ = _get_range(retrier.origin, read, limit - 1, retrier)
        read += len(more)
        decoded, ended = decode([head, more], size is not None and read >= size)
    if ended and not decoded:
        return outer  # an empty image: the inspection of the download says so
    claimed_fmt, _ = parse_claim(claim)
    inner = preflight(decoded, None, claimed_fmt, config=ctx.config, size=len(decoded) if ended else None)
    inner.compression = outer.compression
    inner.findings[:0] = [f for f in outer.findings if all(f.code != g.code for g in inner.findings)]
    inner.details["compressed_bytes_read"] = read
    inner.details["decompressed_head_bytes"] = len(decoded)
    return inner


class ImageStoreStep(Step):
    """Store a converted disk with the image target (a file directory or an S3 bucket), server-side
    encrypted when ``encrypted`` (with the KMS key ``kms_key_id``, else the store's default; see
    :mod:`appliance.targets.encryption`). The result's ``encryption`` is what the stored image has."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["path", "format"],
        "properties": {
            "path": {"type": "string"},
            "format": {"type": "string"},
            "encrypted": {"type": "boolean"},
            "kms_key_id": {"type": ["string", "null"]},
            "source_sha256": {"type": ["string", "null"]},
            "name": DISK_NAME,
        },
    }

    def run(
        self,
        ctx: StepContext,
        path: str,
        format: str,
        encrypted: bool = False,
        kms_key_id: str | None = None,
        source_sha256: str | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        encryption = requested(encrypted, kms_key_id)
        # an S3 object carries its provenance as user metadata (what is known when the upload starts)
        extra: dict[str, Any] = {}
        if ctx.config.targets["image"].get("type") == "s3":
            extra["metadata"] = import_metadata(ctx, source_sha256)

        def on_progress(p: Progress) -> None:
            ctx.progress(
                {
                    "phase": "uploading",
                    "done": p.done,
                    "total": p.total,
                    "percent": p.percent,
                    "converted": p.done,
                    "rate": p.rate,
                    "eta": p.eta,
                }
            )

        location = get_image_target(ctx.config).store(
            f"{ctx.task_id}-{name}" if name else ctx.task_id,  # a data disk of an image: its own name
            Path(path),
            format=format,
            on_progress=on_progress,
            cancel=ctx.cancel,
            ledger=ctx,
            encryption=encryption,
            fence=ctx.fence,  # a run that lost the task to another worker publishes nothing
            **extra,
        )
        ctx.ledger_created(json.dumps(location, sort_keys=True))
        return location

    def undo(self, ctx: StepContext, args: dict[str, Any], result: dict[str, Any]) -> None:
        if result:
            get_image_target(ctx.config).delete(result)
            ctx.ledger_removed(json.dumps(result, sort_keys=True))

    def plan(
        self,
        ctx: StepContext,
        path: str,
        format: str,
        encrypted: bool = False,
        kms_key_id: str | None = None,
        source_sha256: str | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        encryption = requested(encrypted, kms_key_id)
        return {
            "stores": path,
            "target": ctx.config.targets["image"]["type"],
            "encryption": encryption.to_dict() if encryption else None,
            "scratch_bytes": 0,
        }
