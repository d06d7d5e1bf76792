"""``image.stream`` into the S3 image target: source → confined decoder → multipart upload, no scratch.

The decoder writes the RAW disk at offsets; a multipart upload takes the object's bytes in order.
:class:`~appliance.targets.inorder.InOrderSink` accepts writes at ascending offsets, fills the gaps with
zeros and feeds :class:`~appliance.targets.s3stream.MultipartWriter` (bounded memory: about
``(threads + 1) x part_size``; parts uploaded in parallel). RAW, the compressed RAW streams and fixed VHD
always write in order; a stream-optimized VMDK does when its grains are in ascending LBA order, as VMware,
qemu-img and open-vmdk write them. One that is not fails with ``UnsupportedFormat.GrainOrder`` (the route
cannot know before the stream, and falling back to scratch then would read the source twice and need the
scratch the plan said was not needed; the message says how to rewrite the image).

Nothing unchecked is published (:class:`~appliance.targets.s3staged.StagedImage`): the disk is uploaded to
the staging key ``<final key>.partial``; once the stream ended cleanly (the source's MD5/sha256 checks, the
user's expected sha256) and the disk was padded to its virtual size, the upload is completed and the
*stored* bytes are read back with cached ranged GETs
(:class:`~appliance.targets.s3read.ObjectRangeReader`) for

* the content inspection of the written disk as RAW output (the content stage of
  :mod:`appliance.image.inspect`: nothing hidden inside; RAW has no metadata for ``qemu-img info`` to
  read, as :func:`~appliance.image.inspect.verify_output` says), and
* guest validation as ``guest.validate`` does it: the confined probe child (no network) reads the disk
  over its pipes, served by this process from the ranged reader
  (:func:`appliance.guest.validate.validate_ranges`): no URL, no credential reaches the child.

Only then is the staging object copied inside S3 to the final key with its user metadata (the object's
sha256 and the import's provenance, :func:`~.provenance.import_metadata`, whose source sha256 is known only
now) and the encryption asked for (checked on the stored object, as the scratch path does); the image is
registered (the step's result) after that. Any failure or cancel aborts the upload and removes the staging
object: a hostile stream or a guest that fails validation leaves no object and no incomplete upload.

Digests: the source's sha256 is observed as it streams; the output's sha256 and its ``sha256-chunked``
(the file image target's definition and 64 MiB chunk, so an export checks either the same way: the
location's ``digest``, also in the object's metadata) are those of every byte handed to the multipart
writer (zeros included), computed as they go (``digest_method`` :data:`~.provenance.WHILE_UPLOADING`).

A killed stream resumes from its multipart upload (:mod:`.s3_checkpoint`): every
``sources.checkpoint_every`` bytes of source the decoder's boundary is noted and the latest one whose
output the uploaded parts cover is saved with the upload id, the count of parts and a digest of their
ETags, and the output's sha256 and sha256-chunked states (constant size); the next run lists the
upload's parts, checks them against the record and goes on after the last (``stream.resumed``), or
restarts from zero (``stream.restarted``) when the upload is gone or a part differs. A run stopped to be
resumed does not wait for its parts in flight; one landing after the next run sent it again is the
same part, or, under ETags that are not MD5s, makes S3 refuse the Complete: that run then streams again
from zero (``stream.restarted``, :class:`~appliance.targets.s3resume.PartReplaced`). A compressed
source is not checkpointed (no decoder state past its start): its next run decodes it again from byte 0
into a new upload.

The ledger window at publish: the copy to the final key and the step's ledger entry naming it are two
acts, and a kill between them would leave an object no ledger names. So the step first saves its intent
(:func:`publish_intent`: the final key, the staging object's ETag and sha256, the step's facts) as its
checkpoint, and the copy carries the staging ETag in its metadata. The step's next run *adopts* what it
finds (:func:`adopt`): the final object whose metadata names that staging ETag and sha256 (or, not copied
yet, the staging object, still the one checked, copied now) becomes the step's result — the inspection
and guest validation ran on those very bytes before the copy — with a ``stream.adopted`` event. A task
that ends without such a run (failed, cancelled, deleted) has that object deleted by the sweep
(:func:`appliance.service.sweeps.sweep_s3_staging`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

from ..errors import ImageRejected, LeaseLost, Severity, StoreUnavailable, UsageError
from ..image.content import ContentView, content_stage
from ..image.decoders import CONTAINERS
from ..image.streamed import StreamResult
from ..image.verdict import Verdict
from ..sources.fetch import parse_source
from ..targets.chunkdigest import ALGORITHM
from ..targets.encryption import Encryption
from ..targets.inorder import InOrderSink
from ..targets.s3 import STAGING_SUFFIX, S3ImageTarget, digest_metadata, sse_arguments
from ..targets.s3copy import server_copy
from ..targets.s3read import ObjectRangeReader
from ..targets.s3resume import PartReplaced, verify_parts
from ..targets.s3staged import PUBLISH_KIND, STAGING_ETAG, StagedImage, adoptable
from ..workflow.step import StepContext
from .guest import validate_ranges_step
from .imports import record_streamed_source
from .provenance import WHILE_UPLOADING, import_metadata
from .s3_checkpoint import S3ResumePoint, S3StreamCheckpoints
from .stream_checkpoint import SourceReplaced, writing_meter

log = logging.getLogger(__name__)

#: ``stream_source`` of :mod:`.image_stream` (passed in: that module dispatches here)
StreamSource = Callable[..., StreamResult]


def expected_size(preflight: dict[str, Any] | None) -> int | None:
    """The disk size the upload's part size is planned for (S3 allows 10,000 parts): the virtual size
    the preflight read from the header, the object's size for RAW; None for a compressed stream, whose
    size is known only at its end (the writer then grows its parts as the stream goes)."""
    pre = preflight or {}
    if pre.get("compression") is not None:
        return None
    if isinstance(pre.get("virtual_size"), int):
        return int(pre["virtual_size"])
    size = (pre.get("details") or {}).get("object_size")
    return size if pre.get("format") == "raw" and isinstance(size, int) else None


def inspect_written(ctx: StepContext, reader: ObjectRangeReader, decoder: str) -> Verdict:
    """The content inspection of the stored disk as RAW (read back from S3); :class:`ImageRejected`
    when it finds anything (a format hidden inside the disk, an oversized disk; an archive unless
    ``decoder`` decoded the disk out of a VMDK or VHD: a guest's disk may begin with a tar)."""
    verdict = Verdict()
    view = ContentView.of_stream(reader, ctx.cancel)
    content_stage(verdict, "raw", view, config=ctx.config, output=False, decoded=decoder in CONTAINERS)
    if not verdict.safe:
        ordered = verdict.errors + [f for f in verdict.findings if f.severity is not Severity.ERROR]
        raise ImageRejected(ordered)
    return verdict


def resume_point(
    ctx: StepContext, target: S3ImageTarget, staging_key: str, key: str, decoder: str, saved: Any
) -> S3ResumePoint | None:
    """The checkpoint (``saved``) an earlier run of this step left, if its upload is still there with
    every recorded part (``ListParts``); otherwise None, after a ``stream.restarted`` event saying why
    (and the upload of a checkpoint that does not check out aborted)."""
    point, dropped = S3ResumePoint.load(saved, key, decoder, ctx.config.limits)
    if dropped is not None:
        ctx.event("stream.restarted", offset=0, reason=dropped)
    if point is None:
        return None
    if (point.bucket, point.key) != (target.bucket, staging_key):
        why: str | None = "the checkpoint's upload is not to this image's staging key"
    else:
        listed, why = verify_parts(target.client, point.bucket, point.key, point.upload)
        if listed is not None:
            return dataclasses.replace(point, upload=listed)
    ctx.event("stream.restarted", offset=0, reason=why)
    if point.bucket == target.bucket and point.key == staging_key:
        try:  # a part that differs: that upload is not continued (gone already: nothing to abort)
            target.client.abort_multipart_upload(
                Bucket=point.bucket, Key=point.key, UploadId=point.upload.upload_id
            )
        except Exception as exc:
            log.info("the upload of the dropped checkpoint was not aborted: %s", type(exc).__name__)
    return None


def publish_intent(
    ctx: StepContext, staged: StagedImage, written: dict[str, Any], facts: dict[str, Any]
) -> None:
    """Save, as the step's checkpoint, what is about to be published (the final key, the staging
    object's ETag and sha256, the step's facts): a run killed between the copy and the ledger entry
    is adopted by the next run (:func:`adopt`) or removed by the sweep."""
    with contextlib.suppress(UsageError):  # not run under a lease (a bare engine run): nothing resumes it
        ctx.save_checkpoint(
            {
                "kind": PUBLISH_KIND,
                "bucket": staged.bucket,
                "key": staged.key,
                "staging_key": staged.staging_key,
                "staging_etag": str(written["etag"]).strip('"'),
                "sha256": str(written["sha256"]),
                "size": int(written["size"]),
                "digest": written.get("digest"),
                "facts": facts,
            }
        )


def adopt(
    ctx: StepContext,
    target: S3ImageTarget,
    saved: Any,
    key: str,
    encryption: Encryption | None,
) -> dict[str, Any] | None:
    """The step's result when an earlier run of it was killed while it published (its
    :func:`publish_intent` is the checkpoint): the final object it copied, recognised by its metadata
    (:func:`~appliance.targets.s3staged.adoptable`), is adopted — the checks ran on those very bytes
    before the copy — after a ``stream.adopted`` event; a copy that had not happened yet is made now
    from the staging object if that is still the one checked. None (the stream starts again, after a
    ``stream.restarted`` event) when neither is there."""
    if not isinstance(saved, dict) or saved.get("kind") != PUBLISH_KIND:
        return None
    try:
        bucket, staging_key = str(saved["bucket"]), str(saved["staging_key"])
        sha256, staging_etag = str(saved["sha256"]), str(saved["staging_etag"])
        size, facts, digest = saved["size"], saved["facts"], saved.get("digest")
        if (bucket, saved["key"], staging_key) != (target.bucket, key, key + STAGING_SUFFIX):
            raise ValueError("an intent for another key")
        if type(size) is not int or size < 0 or not isinstance(facts, dict):
            raise ValueError("an intent without its size and facts")
        if digest is not None and not (isinstance(digest, dict) and digest.get("algorithm") == ALGORITHM):
            raise ValueError("an intent whose chunked digest is not one")
    except (KeyError, TypeError, ValueError) as exc:
        ctx.event("stream.restarted", offset=0, reason=f"the publish checkpoint is not one ({exc})")
        return None
    client, where = target.client, f"s3://{bucket}/{key}"
    try:
        etag = adoptable(client, bucket, key, sha256, staging_etag, size)
        if etag is None:
            # not copied yet: the staging object, if it is still the one checked, is copied now
            head = client.head_object(Bucket=bucket, Key=staging_key)
            if str(head["ETag"]).strip('"') == staging_etag and int(head["ContentLength"]) == size:
                ctx.fence()
                meta = import_metadata(ctx, (facts.get("source") or {}).get("sha256"))
                meta |= {"sha256": sha256, STAGING_ETAG: staging_etag} | digest_metadata(digest)
                etag = server_copy(
                    client,
                    bucket,
                    staging_key,
                    key,
                    size,
                    meta,
                    sse_arguments(encryption),
                    if_match=staging_etag,
                )
    except (LeaseLost, StoreUnavailable):
        raise
    except Exception as exc:
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
        log.info("the publish of an earlier run of %s is not adopted: %s", where, code or type(exc).__name__)
        etag = None
    if etag is None:
        ctx.event(
            "stream.restarted",
            offset=0,
            reason=f"an earlier run was stopped while it published {where}, and neither its copy nor "
            "the checked staging object is there",
        )
        return None
    applied = target.check_encryption(key, encryption)
    try:
        client.delete_object(Bucket=bucket, Key=staging_key)
    except Exception as exc:
        log.error("could not delete s3://%s/%s: %s", bucket, staging_key, type(exc).__name__)
    ctx.ledger_removed(f"s3://{bucket}/{staging_key}")
    location = {
        "type": "s3",
        "bucket": bucket,
        "key": key,
        "etag": etag,
        "sha256": sha256,
        "size": size,
        "format": "raw",
        "encryption": applied.to_dict() if applied else None,
        "digest_method": WHILE_UPLOADING,
        **({"digest": digest} if digest is not None else {}),
    }
    ctx.event("stream.adopted", key=key, etag=etag, message=f"adopted {where}, published by an earlier run")
    ctx.ledger_created(json.dumps(location, sort_keys=True))
    return {"stored": location, **facts}


def stream_into_s3(
    ctx: StepContext,
    target: S3ImageTarget,
    stream_source: StreamSource,
    source: dict[str, Any],
    decoder: str,
    *,
    preflight: dict[str, Any] | None,
    bootable: bool,
    encryption: Encryption | None,
    name: str | None,
    request: dict[str, str | None],
) -> dict[str, Any]:
    """``image.stream``'s run for the S3 image target (module docstring); its result as for a file."""
    facts: dict[str, Any] = {}
    image_id = f"{ctx.task_id}-{name}" if name else ctx.task_id  # a data disk of an image: its own name
    key = str(parse_source(source))
    final_key = target.key_for(image_id, "raw")
    staging_key = final_key + STAGING_SUFFIX
    saved = ctx.load_checkpoint()
    if isinstance(saved, dict) and saved.get("kind") == PUBLISH_KIND:
        adopted = adopt(ctx, target, saved, final_key, encryption)
        if adopted is not None:
            return adopted
        saved = None
    point = resume_point(ctx, target, staging_key, key, decoder, saved)
    meter = writing_meter(ctx, point)
    md5_checked: list[str] = []
    capacity = ctx.config.limits.max_virtual_size
    with (
        StagedImage(
            target,
            image_id,
            format="raw",
            encryption=encryption,
            expected_size=expected_size(preflight),
            cancel=ctx.cancel,
            ledger=ctx,
            resume=point.upload if point is not None else None,
            keep_on_cancel=lambda: ctx.suspending,  # a suspend keeps the upload for the resume
        ) as staged,
        meter,
    ):

        def run(start: S3ResumePoint | None) -> tuple[StreamResult, S3StreamCheckpoints, InOrderSink]:
            assert staged.writer is not None
            sink = InOrderSink(
                staged.writer,
                capacity=capacity,
                start=start.sink_position if start is not None else 0,
                skip_to=start.upload.size if start is not None else 0,
            )
            checkpoints = S3StreamCheckpoints(
                ctx,
                key,
                decoder,
                staged.writer,
                sink,
                every=ctx.config.sources.checkpoint_every,
                resume=start,
            )
            result = stream_source(
                ctx,
                source,
                decoder,
                sink,
                capacity=capacity,
                meter=meter,
                on_md5_checked=md5_checked.append,
                checkpoints=checkpoints,
            )
            return result, checkpoints, sink

        def stream(start: S3ResumePoint | None) -> tuple[StreamResult, str | None, dict[str, Any]]:
            try:
                result, checkpoints, sink = run(start)
            except SourceReplaced as exc:  # (raised before anything was read or written)
                ctx.event("stream.restarted", offset=0, reason=exc.message)
                staged.restart()
                result, checkpoints, sink = run(None)
            # a wrong source fails before anything is published
            sha256 = record_streamed_source(
                ctx, facts, source, checkpoints, result.input_bytes, md5_checked, name
            )
            sink.finish(result.virtual_size)  # the disk's trailing zeros
            return result, sha256, staged.complete()

        try:
            result, sha256, written = stream(point)
        except PartReplaced as exc:
            # a part the run before had in flight when it stopped landed after this run sent it again,
            # with another ETag (SSE-KMS): S3 will not complete this upload, a new one starts from zero
            ctx.event("stream.restarted", offset=0, reason=exc.message)
            staged.restart()
            md5_checked.clear()
            result, sha256, written = stream(None)
        reader = staged.reader()
        inspected = inspect_written(ctx, reader, decoder)
        facts["stream"] = {
            "decoder": decoder,
            "input_bytes": result.input_bytes,
            "data_bytes": result.data_bytes,
            "uploaded_bytes": written["size"],
            "parts": written["parts"],
        }
        facts["source_image"] = {
            "format": (preflight or {}).get("format"),
            "compression": (preflight or {}).get("compression"),
            "virtual_size": result.virtual_size,
            "decoder": decoder,
            "output_format": inspected.format,
        }
        # the guest, read on the stored disk before it is published (guest.validate's checks)
        facts["guest"] = validate_ranges_step(
            ctx, reader.read_at, int(written["size"]), bootable=bootable, **request
        )
        facts["stream"]["readback_gets"] = reader.gets
        publish_intent(ctx, staged, written, facts)
        location = staged.publish(import_metadata(ctx, sha256), fence=ctx.fence)
        meter.set_total(result.virtual_size)
        meter.wrote(result.virtual_size)
    meter.flushed()  # published
    location["digest_method"] = WHILE_UPLOADING
    ctx.ledger_created(json.dumps(location, sort_keys=True))
    return {"stored": location, **facts}
