"""One short line about a task's findings, for status strings with little room (the EC2
``statusMessage``): the most severe findings first, by code, the first one with its remediation
sentence, capped at :data:`STATUS_MESSAGE_LIMIT` characters.

    converting; errors: Guest.FstabDeviceMissing (Add the device to fstab by UUID…); warnings: Guest.NoInitrd

Info findings are left out (the full list, with every message, is on ``/v1/tasks/{id}``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: AWS keeps statusMessage strings short; clients print them in one table cell
STATUS_MESSAGE_LIMIT = 255
#: the first finding's message is shown only when at least this much of it fits
_MIN_DETAIL = 24
_RANK = {"error": 0, "warning": 1}
_LABEL = {"error": "errors", "warning": "warnings"}


def _plain(finding: Any) -> tuple[str, str, str]:
    d = finding.to_dict() if hasattr(finding, "to_dict") else dict(finding)
    return str(d.get("severity", "")), str(d.get("code", "")), " ".join(str(d.get("message", "")).split())


def _ordered(findings: Iterable[Any], exclude: Iterable[str | None]) -> list[tuple[str, str, str]]:
    skip = {c for c in exclude if c}
    seen: dict[str, tuple[str, str, str]] = {}
    for severity, code, message in (_plain(f) for f in findings):
        if severity not in _RANK or not code or code in skip:
            continue
        # a code found twice (two fstab lines…) is listed once, at its most severe
        if code not in seen or _RANK[severity] < _RANK[seen[code][0]]:
            seen[code] = (severity, code, message)
    return sorted(seen.values(), key=lambda f: _RANK[f[0]])  # stable: order of discovery within a rank


def _render(items: list[tuple[str, str, str]], detail: str | None, dropped: int) -> str:
    groups: dict[str, list[str]] = {}
    for i, (severity, code, _) in enumerate(items):
        groups.setdefault(severity, []).append(f"{code} ({detail})" if i == 0 and detail else code)
    text = "; ".join(f"{_LABEL[s]}: {', '.join(codes)}" for s, codes in groups.items())
    if dropped:
        text += f"; +{dropped} more" if text else f"{dropped} findings"
    return text


def findings_summary(
    findings: Iterable[Mapping[str, Any] | Any],
    *,
    base: str | None = None,
    exclude_codes: Iterable[str | None] = (),
    limit: int = STATUS_MESSAGE_LIMIT,
) -> str | None:
    """``base`` followed by ``; errors: …; warnings: …`` for the error and warning findings.

    ``findings`` are :class:`~appliance.errors.Finding` objects or their dicts. Codes in
    ``exclude_codes`` (e.g. the code the task already failed with, shown in ``base``) are not
    repeated. The result is at most ``limit`` characters: the first finding's message is
    shortened (with ``…``) or left out, then trailing codes become ``+N more``. ``base`` itself
    is never shortened: when it leaves no room it is returned alone. Returns ``base`` (possibly
    None) when there is nothing to add.
    """
    items = _ordered(findings, exclude_codes)
    if not items:
        return base
    head = f"{base}; " if base else ""
    # Prefer the most severe finding's remediation (shortened) over listing every code, and
    # every code over nothing.
    message = items[0][2]
    for kept in range(len(items), 0, -1):
        dropped = len(items) - kept
        room = limit - len(head + _render(items[:kept], None, dropped)) - len(" ()")
        if message and room >= min(_MIN_DETAIL, len(message)):
            detail = message if len(message) <= room else message[: room - 1].rstrip() + "…"
            return head + _render(items[:kept], detail, dropped)
    for kept in range(len(items), -1, -1):
        text = head + _render(items[:kept], None, len(items) - kept)
        if len(text) <= limit:
            return text
    return base
