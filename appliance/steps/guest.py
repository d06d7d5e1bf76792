"""Step ``guest.validate``: static guest validation of an image, findings stored on the task.

Arguments: ``source`` (image file or block device), ``format`` (default raw), ``platform`` and
``architecture`` of the request (checked against the guest), ``bootable`` (false for data disks: boot
findings become info) and ``fail_on_error`` (default true: error findings fail the step with
:class:`~appliance.errors.ImageRejected`, i.e. the task fails with the first error's code).
The result is the guest report (``GuestReport.to_dict()``); a dry run validates a local file for real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ImageRejected
from ..guest import check_request, validate_image
from ..guest.report import GuestReport
from ..workflow.step import Step, StepContext

_NULLABLE_STR = {"type": ["string", "null"]}


class ValidateStep(Step):
    """Validate the guest on an image; keep the findings on the task; optionally reject on errors."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {
            "source": {"type": "string", "minLength": 1},
            "format": {"type": "string", "minLength": 1},
            "platform": _NULLABLE_STR,
            "architecture": _NULLABLE_STR,
            "bootable": {"type": "boolean"},
            "fail_on_error": {"type": "boolean"},
        },
    }

    def _validate(
        self,
        ctx: StepContext,
        source: str,
        format: str,
        platform: str | None,
        architecture: str | None,
        bootable: bool,
    ) -> GuestReport:
        report = validate_image(source, format, bootable=bootable, config=ctx.config, cancel=ctx.cancel)
        return report.with_findings(report.findings + check_request(report, platform, architecture))

    def run(
        self,
        ctx: StepContext,
        source: str,
        format: str = "raw",
        platform: str | None = None,
        architecture: str | None = None,
        bootable: bool = True,
        fail_on_error: bool = True,
    ) -> dict[str, Any]:
        report = self._validate(ctx, source, format, platform, architecture, bootable)
        found = [f.to_dict() for f in report.findings]
        if ctx.store is not None:
            # other steps (image.inspect, hooks) may have stored findings already: add, never replace
            current = ctx.store.get_task(ctx.task_id).findings
            ctx.store.set_findings(ctx.task_id, current + [f for f in found if f not in current])
        ctx.event(
            "guest.validated",
            layout=report.layout,
            boot_mode=report.boot_mode,
            os=report.os,
            findings=found,
        )
        if fail_on_error and report.errors:
            raise ImageRejected(list(report.findings))
        return report.to_dict()

    def plan(
        self,
        ctx: StepContext,
        source: str,
        format: str = "raw",
        platform: str | None = None,
        architecture: str | None = None,
        bootable: bool = True,
        fail_on_error: bool = True,
    ) -> dict[str, Any]:
        plan: dict[str, Any] = {"source": source, "format": format, "bootable": bootable, "scratch_bytes": 0}
        if Path(source).is_file():
            # reading is side-effect free (a limited child on a private link), so the plan shows the verdict
            report = self._validate(ctx, source, format, platform, architecture, bootable)
            plan["report"] = report.to_dict()
            plan["would_fail"] = bool(fail_on_error and report.errors)
            plan["findings"] = [f.to_dict() for f in report.findings]
        else:
            plan["will_validate"] = True
        return plan
