"""The one clock TempMail reads, and how its times are written.

Every datetime in the database is naive UTC. ``now()`` is the clock of the
whole application, so tests can inject their own (``app.config["CLOCK"]``);
the formatters turn stored times into the configured display zone.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional
from zoneinfo import ZoneInfo

from flask import current_app


def now() -> datetime:
    """The current time as naive UTC; tests replace it with ``app.config["CLOCK"]``."""
    clock = current_app.config.get("CLOCK") if current_app else None
    if clock is not None:
        return clock()
    return datetime.now(timezone.utc).replace(tzinfo=None)


def timestamp() -> int:
    """``now()`` as whole Unix seconds."""
    return int(now().replace(tzinfo=timezone.utc).timestamp())


def local_zone() -> ZoneInfo:
    """The configured display time zone."""
    return ZoneInfo(current_app.config["TEMPMAIL"]["timezone"] or "UTC")


def local_now() -> datetime:
    """``now()`` in the configured zone (aware)."""
    return now().replace(tzinfo=timezone.utc).astimezone(local_zone())


def fmt_local(value: Optional[datetime], zone: Optional[ZoneInfo] = None) -> Optional[str]:
    """``YYYY-MM-DD HH:MM:SS`` in the configured zone (or ``zone``, for a caller
    formatting many values), as the PHP API printed MySQL DATETIMEs."""
    if value is None:
        return None
    zone = zone or local_zone()
    # isoformat is C code, several times faster than strftime (a listing
    # formats one per message); stored times are naive UTC, so in UTC (the
    # default zone) there is nothing to convert.
    if zone is _UTC or getattr(zone, "key", None) == "UTC":
        return value.isoformat(" ", "seconds")[:19]
    return value.replace(tzinfo=timezone.utc).astimezone(zone).isoformat(" ", "seconds")[:19]


_UTC = timezone.utc


def fmt_iso(value: datetime) -> str:
    """ISO 8601 with the configured zone's offset (User API timestamps)."""
    return value.replace(tzinfo=timezone.utc).astimezone(local_zone()).isoformat(timespec="seconds")


def next_month_start() -> datetime:
    """Start of the next calendar month in the configured zone (aware): when quotas reset."""
    local = local_now()
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return datetime(year, month, 1, tzinfo=local_zone())
