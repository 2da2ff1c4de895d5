"""Limits: abuse limits per client (mailbox creation, sign-in failures), the
User API's monthly quota, and the cap on live mailboxes.

Every limit is exact under concurrency: a unit is *reserved* by one guarded
UPDATE in the database (``... SET n = n + 1 WHERE n < limit``) before the
work it pays for, and given back when the work turns out not to count. A
check followed by a separate count would let parallel requests all pass the
check before any of them counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sqlalchemy import func, select

import clock
from models import Mailbox, QuotaUsage, RateCounter, User, cfg, db


def rate_limit(name: str) -> tuple[int, int]:
    """``(limit, window_seconds)`` of the configured limit ``name``; limit 0 = off."""
    entry = cfg("rate_limits").get(name) or {}
    return int(entry.get("limit") or 0), max(1, int(entry.get("window_seconds") or 60))


def _window(seconds: int) -> int:
    return clock.timestamp() // seconds


def take(name: str, bucket: str) -> int:
    """Reserve one event against limit ``name`` for ``bucket`` (e.g. a client
    IP): 0 when it is allowed, else the seconds until the window ends."""
    limit, seconds = rate_limit(name)
    if limit <= 0 or RateCounter.take(f"{name}:{bucket}", _window(seconds), limit):
        return 0
    return seconds - clock.timestamp() % seconds


def give_back(name: str, bucket: str) -> None:
    """Return an event reserved with ``take`` that did not count after all."""
    limit, seconds = rate_limit(name)
    if limit > 0:
        RateCounter.give_back(f"{name}:{bucket}", _window(seconds))


def exhausted(name: str, bucket: str) -> bool:
    """True while ``bucket`` has no event left in limit ``name``'s window."""
    limit, seconds = rate_limit(name)
    return limit > 0 and RateCounter.peek(f"{name}:{bucket}", _window(seconds)) >= limit


def take_all(buckets: list[tuple[str, str]]) -> int:
    """Reserve one event in each ``(limit name, bucket)``, or in none: 0 when
    all were taken, else the longest wait (the ones taken are given back)."""
    taken = []
    for name, bucket in buckets:
        wait = take(name, bucket)
        if wait:
            for done in taken:
                give_back(*done)
            return wait
        taken.append((name, bucket))
    return 0


def mailbox_cap_reached() -> bool:
    """True while ``max_live_mailboxes`` (0 = no cap) live mailboxes exist.
    Every way of creating an address refuses until some expire, so a flood
    spread over many client addresses still cannot grow the tables without bound."""
    cap = int(cfg("max_live_mailboxes") or 0)
    if cap <= 0:
        return False
    live = db.session.scalar(select(func.count(Mailbox.id)).where(Mailbox.expires_at > clock.now())) or 0
    return live >= cap


# --------------------------------------------------------------------------
# the User API's monthly quota

def quota_period() -> str:
    """``YYYY-MM`` of the calendar month now running in the configured zone."""
    return clock.local_now().strftime("%Y-%m")


def quota_limit(user: User) -> int:
    return int(user.plan_config().get("monthly_quota") or 0)


@dataclass
class QuotaReservation:
    """One unit of a user's monthly quota, taken before the request runs."""
    user_id: int
    period: str
    limit: int
    used: int

    def refund(self) -> None:
        """The answer was not a 2xx: it does not count."""
        self.used = QuotaUsage.refund(self.user_id, self.period)


def reserve_quota(user: User) -> tuple[Optional[QuotaReservation], int]:
    """Take one request of ``user``'s monthly quota: ``(reservation, used)``,
    or ``(None, used)`` when it is spent."""
    period, limit = quota_period(), quota_limit(user)
    used = QuotaUsage.reserve(user.id, period, limit)
    if used is None:
        return None, QuotaUsage.used_in(user.id, period)
    return QuotaReservation(user.id, period, limit, used), used


def quota_status(user: User) -> dict:
    """This month's quota: ``limit``, ``used``, ``remaining`` (ints) and ``reset``
    (aware datetime, start of the next month in the configured zone)."""
    limit = quota_limit(user)
    used = QuotaUsage.used_in(user.id, quota_period())
    return {"limit": limit, "used": used, "remaining": max(0, limit - used),
            "reset": clock.next_month_start()}
