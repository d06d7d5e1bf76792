"""``source.route``: whether an import's disk streams into the image target (``image.stream``,
:mod:`.image_stream`) or takes the scratch path (``source.fetch``, inspection, qemu-img).

The header-only preflight of the source (:func:`.imports.source_preflight`: the claim against the first
bytes, the VMDK create type, a differencing VHD, the size limits) decides it. A sequential format — RAW,
a gzip/xz/zstd/bzip2-compressed RAW disk, a stream-optimized VMDK, a fixed VHD — streams when nothing
needs the disk as a file in scratch: the image target is a file directory or an S3 bucket, and no
operator hook is configured at the import-disk insertion points (``after_fetch`` … ``before_write`` hand
the hooks a file in scratch). Everything else (random-access formats, OVA, bundles, hooks) takes the
scratch path.
"""

from __future__ import annotations

from typing import Any

from ..errors import ImageRejected, ImagingError
from ..image.decoders import container_decoder
from ..image.inspect import Preflight
from ..image.rawstream import RAW
from ..targets import get_image_target
from ..targets.file import FileImageTarget
from ..targets.s3 import S3ImageTarget
from ..workflow.step import Step, StepContext
from .bundles import bundle_manifest_url
from .imports import checked_source, source_preflight

#: the insertion points of import-disk that hand their hooks a file in scratch
SCRATCH_POINTS = ("after_fetch", "after_inspect", "after_convert", "before_write")


def sequential_decoder(verdict: Preflight | None) -> str | None:
    """The sequential decoder (:data:`appliance.image.decoders.FORMATS`) for what the preflight found,
    or None when the format needs random access (or the preflight decided nothing)."""
    if verdict is None or not verdict.safe or verdict.format is None:
        return None
    if verdict.compression is not None:
        # a compressed RAW disk decodes in one pass; a compressed VMDK/VHD/qcow2 does not
        return verdict.compression if verdict.format == "raw" else None
    if verdict.format == "raw":
        return RAW
    return container_decoder(verdict)


def route(ctx: StepContext, source: dict[str, Any], *, reject: bool = True) -> dict[str, Any]:
    """``{streams, decoder, reason, preflight, scratch_bytes}`` for ``source`` (module docstring);
    ``scratch_bytes``: what the scratch path's download needs (the object's size, None when not
    known), 0 when the disk streams. Raises :class:`ImageRejected` for a source the preflight rejects
    (before anything is downloaded) unless ``reject`` is false (a plan shows the verdict instead)."""
    source = checked_source(ctx, source)
    verdict = source_preflight(ctx, source)
    if verdict is not None and not verdict.safe:
        if reject:
            raise ImageRejected(verdict.errors)
        return {
            "streams": False,
            "decoder": None,
            "reason": "the preflight rejects the source",
            "preflight": verdict.to_dict(),
            "scratch_bytes": 0,
        }
    decoder = sequential_decoder(verdict)
    reason = "a sequential format: streamed from the source into the image target"
    if bundle_manifest_url(source) is not None:
        decoder, reason = None, "an image bundle: unbundled into scratch"
    elif decoder is None:
        reason = "not a sequential format: downloaded into scratch and converted by qemu-img"
    elif not isinstance(get_image_target(ctx.config), FileImageTarget | S3ImageTarget):
        decoder, reason = None, "the image target is not a file directory or S3: converted in scratch"
    else:
        hooked = [p for p in SCRATCH_POINTS if ctx.config.hooks.at(p)]
        if hooked:
            decoder = None
            reason = f"hooks at {', '.join(hooked)} read the disk in scratch: converted in scratch"
    size = verdict.details.get("object_size") if verdict is not None else None
    return {
        "streams": decoder is not None,
        "decoder": decoder,
        "reason": reason,
        "preflight": verdict.to_dict() if verdict is not None else None,
        "scratch_bytes": 0 if decoder is not None else size,
    }


class RouteStep(Step):
    """``source.route``: whether a disk streams into the image target or goes through scratch."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {"source": {"type": "object"}},
    }

    def run(self, ctx: StepContext, source: dict[str, Any]) -> dict[str, Any]:
        return route(ctx, source)

    def plan(self, ctx: StepContext, source: dict[str, Any]) -> dict[str, Any]:
        # the same preflight as the run: its verdict, the route, and the scratch the route needs (the
        # download, sized by the object, when the disk does not stream)
        try:
            return route(ctx, source, reject=False)
        except ImagingError as exc:
            return {
                "streams": False,
                "decoder": None,
                "scratch_bytes": None,
                "preflight": {"error": exc.code, "message": exc.message},
            }
