"""Step ``guest.validate``: static guest validation of an image, findings stored on the task.

Arguments: ``source`` (image file or block device), ``format`` (default raw; null: detected from the
content, as a dry run needs before inspection has run), ``platform``,
``architecture``, ``virtualization_type`` and ``kernel_id`` of the request (checked against the
guest: a partition image needs paravirtual boot, a kernel needs a root filesystem), ``bootable``
(false for data disks: boot findings become info) and ``fail_on_error`` (default true: error
findings fail the step with :class:`~appliance.errors.ImageRejected`, i.e. the task fails with the
first error's code).
The result is the guest report (``GuestReport.to_dict()``); a dry run validates a local file for real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ImageRejected, UsageError
from ..guest import check_request, validate_image
from ..guest.report import GuestReport
from ..image.decompress import detect_compression
from ..image.inspect import detect_format
from ..workflow.step import Step, StepContext

_NULLABLE_STR = {"type": ["string", "null"]}


def _detected_format(source: str) -> str:
    """``format: null``: the format of the content (a compressed file is refused: decompress first)."""
    path = Path(source)
    if path.is_file():
        compression = detect_compression(path)
        if compression is not None:
            raise UsageError(
                f"guest validation reads uncompressed images; {path.name} is {compression}-compressed: "
                "validate after inspection (which decompresses) or decompress it first"
            )
        return detect_format(path) or "raw"
    return "raw"  # a block device holds a RAW disk


class ValidateStep(Step):
    """Validate the guest on an image; keep the findings on the task; optionally reject on errors."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {
            "source": {"type": "string", "minLength": 1},
            "format": {"type": ["string", "null"], "minLength": 1},
            "platform": _NULLABLE_STR,
            "architecture": _NULLABLE_STR,
            "virtualization_type": _NULLABLE_STR,
            "kernel_id": _NULLABLE_STR,
            "bootable": {"type": "boolean"},
            "fail_on_error": {"type": "boolean"},
        },
    }

    def _validate(
        self,
        ctx: StepContext,
        source: str,
        format: str | None,
        bootable: bool,
        request: dict[str, str | None],
    ) -> GuestReport:
        """The report of ``source`` plus the findings where the ``request`` (platform, architecture,
        virtualization_type, kernel_id) disagrees with the guest."""
        format = format or _detected_format(source)
        report = validate_image(
            source,
            format,
            bootable=bootable,
            config=ctx.config,
            cancel=ctx.cancel,
            # the probe's private directory in the task's scratch: what a killed task left goes with it
            workdir=None if ctx.dry_run else ctx.workdir,
        )
        request = dict(request)
        platform, architecture = request.pop("platform", None), request.pop("architecture", None)
        mismatches = check_request(report, platform, architecture, **request)
        return report.with_findings(report.findings + mismatches)

    def run(
        self,
        ctx: StepContext,
        source: str,
        format: str | None = "raw",
        bootable: bool = True,
        fail_on_error: bool = True,
        **request: str | None,
    ) -> dict[str, Any]:
        report = self._validate(ctx, source, format, bootable, request)
        found = [f.to_dict() for f in report.findings]
        if ctx.store is not None:
            ctx.store.add_findings(ctx.task_id, found)
        # the whole report: when it fails the step, the event is where the task keeps it
        ctx.event("guest.validated", report=report.to_dict())
        if fail_on_error and report.errors:
            raise ImageRejected(list(report.findings))
        return report.to_dict()

    def plan(
        self,
        ctx: StepContext,
        source: str,
        format: str | None = "raw",
        bootable: bool = True,
        fail_on_error: bool = True,
        **request: str | None,
    ) -> dict[str, Any]:
        plan: dict[str, Any] = {"source": source, "format": format, "bootable": bootable, "scratch_bytes": 0}
        if Path(source).is_file():
            # reading is side-effect free (a limited child on a private link), so the plan shows the verdict
            report = self._validate(ctx, source, format, bootable, request)
            plan["report"] = report.to_dict()
            plan["would_fail"] = bool(fail_on_error and report.errors)
            plan["findings"] = [f.to_dict() for f in report.findings]
        else:
            plan["will_validate"] = True
        return plan
