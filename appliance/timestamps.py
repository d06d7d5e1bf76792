"""Timestamps: one form everywhere the appliance records or sends a time.

UTC, ISO-8601 with microseconds and a ``Z`` suffix (``2026-12-05T02:06:45.123456Z``): sortable as
text (the store orders and compares them in SQL), exact, and what the controller protocol sends.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def format_time(when: datetime | None = None) -> str:
    """``when`` (default: now) in the appliance's one timestamp form."""
    return (when or utc_now()).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utcnow() -> str:
    """Now in the appliance's one timestamp form."""
    return format_time()


def parse_time(text: str) -> datetime:
    """An aware datetime from an ISO-8601 timestamp (``Z`` or an offset; none means UTC).

    :class:`ValueError` for anything else."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
