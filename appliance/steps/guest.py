"""Step ``guest.validate``: static guest validation of an image, findings stored on the task.

Arguments: ``source`` (image file or block device); ``format``, the format the image is known to have
(what ``image.inspect`` found, or ``raw`` for a volume the appliance wrote), read as given; or else
``claimed``, what an unverified input claims to be: a file is then inspected first, exactly as
``image.inspect`` does, and read in the format its content has (the claim must match it:
``FormatMismatch``; an unsafe image fails the step with its inspection code whatever ``fail_on_error``
says; compressed input is refused: validate after inspection, which decompresses). Without either, the
content decides (a block device is read as raw). ``platform``,
``architecture``, ``virtualization_type`` and ``kernel_id`` of the request (checked against the
guest: a partition image needs paravirtual boot, a kernel needs a root filesystem), ``bootable``
(false for data disks: boot findings become info) and ``fail_on_error`` (default true: error
findings fail the step with :class:`~appliance.errors.ImageRejected`, i.e. the task fails with the
first error's code).
The result is the guest report (``GuestReport.to_dict()``); a dry run validates a local file for real.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ImageRejected, UsageError
from ..guest import check_request, validate_image
from ..guest.early import PendingProbe
from ..guest.report import GuestReport
from ..guest.validate import validate_ranges
from ..image.decompress import detect_compression
from ..image.formats import parse_claim
from ..image.inspect import InspectionResult, inspect_image, require_safe
from ..workflow.step import Step, StepContext

_NULLABLE_STR = {"type": ["string", "null"]}


def _inspected(ctx: StepContext, source: Path, claimed: str | None) -> InspectionResult:
    """The inspection of the unverified file ``source`` (``claimed`` checked against its content), as
    ``image.inspect`` does it; a compressed file is refused (the guest is read in place, not decompressed)."""
    compression = detect_compression(source)
    if compression is not None:
        raise UsageError(
            f"guest validation reads uncompressed images; {source.name} is {compression}-compressed: "
            "validate after inspection (which decompresses) or decompress it first"
        )
    # qemu-img's private directories go to the task's scratch, as image.inspect's do; a dry run has none
    workdir = None if ctx.dry_run else ctx.workdir
    return inspect_image(source, claimed, config=ctx.config, workdir=workdir, cancel=ctx.cancel)


def _claimed_for_device(source: Path, claimed: str | None) -> str:
    """A block device is not inspected: it holds a disk as it is, raw unless claimed otherwise."""
    fmt, compression = parse_claim(claimed or "raw")
    if compression is not None or fmt is None:
        raise UsageError(f"{source} is a block device: give its format without a compression suffix")
    return fmt


class ValidateStep(Step):
    """Validate the guest on an image; keep the findings on the task; optionally reject on errors."""

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {
            "source": {"type": "string", "minLength": 1},
            "format": {"type": ["string", "null"], "minLength": 1},
            "claimed": {"type": ["string", "null"], "minLength": 1},
            "platform": _NULLABLE_STR,
            "architecture": _NULLABLE_STR,
            "virtualization_type": _NULLABLE_STR,
            "kernel_id": _NULLABLE_STR,
            "boot_mode": _NULLABLE_STR,
            "bootable": {"type": "boolean"},
            "fail_on_error": {"type": "boolean"},
        },
    }

    def _format(self, ctx: StepContext, source: str, format: str | None, claimed: str | None) -> str:
        """The format to read ``source`` in: ``format`` as given, else what inspection finds (raises
        :class:`ImageRejected` with the inspection's findings, kept on the task, when it rejects)."""
        if format is not None:
            if claimed is not None:
                raise UsageError(
                    "give the format the image is known to have (format) or what it claims to be (claimed), "
                    "not both"
                )
            return format
        path = Path(source)
        if not path.is_file():
            return _claimed_for_device(path, claimed)
        found = _inspected(ctx, path, claimed)
        if ctx.store is not None:
            ctx.store.add_findings(ctx.task_id, found.findings)
        require_safe(found)
        if found.format is None:  # inspection names the format of every image it accepts
            raise UsageError(f"the format of {path} could not be determined")
        return found.format

    def _validate(
        self,
        ctx: StepContext,
        source: str,
        format: str,
        bootable: bool,
        request: dict[str, str | None],
        probe: PendingProbe | None = None,
    ) -> GuestReport:
        """The report of ``source`` plus the findings where the ``request`` (platform, architecture,
        virtualization_type, kernel_id) disagrees with the guest. ``probe``: a probe child already
        started for ``source`` (:mod:`appliance.guest.early`), used instead of a new one."""
        if probe is not None:
            return _with_request(probe.validate(source, bootable=bootable, cancel=ctx.cancel), request)
        report = validate_image(
            source,
            format,
            bootable=bootable,
            config=ctx.config,
            cancel=ctx.cancel,
            # the probe's private directory in the task's scratch: what a killed task left goes with it
            workdir=None if ctx.dry_run else ctx.workdir,
        )
        return _with_request(report, request)

    def run(
        self,
        ctx: StepContext,
        source: str,
        format: str | None = None,
        claimed: str | None = None,
        bootable: bool = True,
        fail_on_error: bool = True,
        probe: PendingProbe | None = None,
        **request: str | None,
    ) -> dict[str, Any]:
        """``probe``: not from a workflow (the schema has no such argument): a step that wrote the disk
        and started its probe early (``image.stream``)."""
        fmt = self._format(ctx, source, format, claimed)
        return _conclude(ctx, self._validate(ctx, source, fmt, bootable, request, probe), fail_on_error)

    def plan(
        self,
        ctx: StepContext,
        source: str,
        format: str | None = None,
        claimed: str | None = None,
        bootable: bool = True,
        fail_on_error: bool = True,
        **request: str | None,
    ) -> dict[str, Any]:
        plan: dict[str, Any] = {
            "source": source,
            "format": format,
            "claimed": claimed,
            "bootable": bootable,
            "scratch_bytes": 0,
        }
        if Path(source).is_file():
            # inspecting and reading are side-effect free (limited children on private links), so the plan
            # shows the verdict
            try:
                fmt = self._format(ctx, source, format, claimed)
            except ImageRejected as exc:
                plan["would_fail"] = True
                plan["findings"] = [f.to_dict() for f in exc.findings]
                return plan
            plan["format"] = fmt
            report = self._validate(ctx, source, fmt, bootable, request)
            plan["report"] = report.to_dict()
            plan["would_fail"] = bool(fail_on_error and report.errors)
            plan["findings"] = [f.to_dict() for f in report.findings]
        else:
            plan["will_validate"] = True
        return plan


def _with_request(report: GuestReport, request: dict[str, str | None]) -> GuestReport:
    """``report`` plus the findings where the ``request`` (platform, architecture,
    virtualization_type, kernel_id, boot_mode) disagrees with the guest."""
    request = dict(request)
    platform, architecture = request.pop("platform", None), request.pop("architecture", None)
    mismatches = check_request(report, platform, architecture, **request)
    return report.with_findings(report.findings + mismatches)


def _conclude(ctx: StepContext, report: GuestReport, fail_on_error: bool) -> dict[str, Any]:
    found = [f.to_dict() for f in report.findings]
    if ctx.store is not None:
        ctx.store.add_findings(ctx.task_id, found)
    # the whole report: when it fails the step, the event is where the task keeps it
    ctx.event("guest.validated", report=report.to_dict())
    if fail_on_error and report.errors:
        raise ImageRejected(list(report.findings))
    return report.to_dict()


def validate_ranges_step(
    ctx: StepContext,
    read_at: Callable[[int, int], bytes],
    size: int,
    *,
    bootable: bool = True,
    **request: str | None,
) -> dict[str, Any]:
    """What ``guest.validate`` does (``format: raw``, ``fail_on_error``) for a RAW disk that is not a
    local file, read with ``read_at(offset, length)`` (:func:`appliance.guest.validate.validate_ranges`:
    the confined probe is served over pipes); the guest report, or :class:`ImageRejected`."""
    report = validate_ranges(
        read_at,
        size,
        "raw",
        bootable=bootable,
        config=ctx.config,
        cancel=ctx.cancel,
        workdir=None if ctx.dry_run else ctx.workdir,
    )
    return _conclude(ctx, _with_request(report, request), True)
