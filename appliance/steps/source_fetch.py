"""The ``source.fetch`` step: a disk from S3 or https into scratch, after a header-only preflight
of the object (:func:`.imports.source_preflight`).

It reads with the ranged reader (:func:`appliance.sources.download.download_to_file`: parallel
ranged GETs where the origin serves them, the download limit from the announced size) and
checkpoints the verified offset in the task store every ``sources.checkpoint_every`` bytes; an
interrupted fetch (kill -9, suspend) continues from its checkpoint when its file in scratch is still
there, without a second preflight.

Progress follows one model: ``phase`` is the EC2-style sub-state, ``percent`` covers the whole
transfer, and ``converted`` counts bytes written, which never goes backwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..allowance import Allowance
from ..errors import Finding, ImageRejected, ImagingError, Severity, UsageError
from ..image.inspect import Preflight
from ..progress import StageMeter
from ..sources.download import download_to_file
from ..sources.fetch import parse_source
from ..sources.methods import URL, method_of_source
from ..sources.ranges import ReaderSettings
from ..workflow.step import Step, StepContext
from .bundles import bundle_manifest_url, unbundle_source
from .imports import DISK_NAME, checked_source, source_digest, source_policy, source_preflight
from .provenance import check_expected
from .retries import retry_reporter

#: ``source.fetch`` without a ``preflight`` argument runs its own
_NOT_GIVEN: Any = object()


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
                    source_policy(ctx),
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
            source_policy(ctx).check(source["url"])
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
