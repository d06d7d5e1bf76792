"""Stage progress for the steps that run qemu-img or fill scratch (glue): the same figures as the
streamed stages report (:class:`~appliance.progress.StageMeter`: bytes read and written, rate, ETA,
never 100 % before the target is flushed).

qemu-img says only how far it got (``-p``, a percentage of the disk): :func:`convert_meter` turns
that into bytes written (of the virtual size) and bytes read (the same share of the source file).
``scale`` places a stage within a task of several (``(offset, share)`` of the task's percent), as
``source.fetch`` reports its download as the first half of an import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..progress import Progress, StageMeter

Report = Callable[[dict[str, Any]], None]


def scaled(report: Report, scale: tuple[float, float] | None, *, converted: bool = True) -> Report:
    """``report`` with the stage's percent mapped to ``offset + share * percent / 100`` of the task
    (and ``converted`` left out when the stage writes scratch, not the target)."""
    if scale is None and converted:
        return report
    offset, share = scale or (0.0, 100.0)

    def mapped(p: dict[str, Any]) -> None:
        percent = p.get("percent")
        out = p | {"percent": None if percent is None else round(offset + share * percent / 100.0, 2)}
        if not converted:
            out["converted"] = None
        report(out)

    return mapped


def convert_meter(
    report: Report,
    source_bytes: int | None,
    *,
    phase: str = "converting",
    scale: tuple[float, float] | None = None,
    base: int = 0,
) -> tuple[StageMeter, Callable[[Progress], None]]:
    """A :class:`StageMeter` for a qemu-img conversion and the ``on_progress`` callback that feeds it
    from qemu-img's percentages: written = the share of the virtual size, read = the same share of
    ``source_bytes`` (the input file's size). Call ``meter.flushed()`` once the output is durable."""
    meter = StageMeter(phase, None, scaled(report, scale), base=base)

    def on_progress(p: Progress) -> None:
        meter.set_total(p.total)
        if p.total and source_bytes is not None:
            meter.read(int(source_bytes * min(p.done, p.total) / p.total))
        meter.wrote(p.done)

    return meter, on_progress
