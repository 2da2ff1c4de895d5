"""Limits: abuse limits per client (mailbox creation, sign-in failures), the
User API's monthly quota, and the cap on live mailboxes.

Every limit is exact under concurrency: a unit is *reserved* by one guarded
UPDATE in the database (``... SET n = n + 1 WHERE n < limit``) before the
work it pays for, and given back when the work turns out not to count. A
check followed by a separate count would let parallel requests all pass the
check before any of them counts.
"""
from __future__ import annotations

import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from sqlalchemy import bindparam, func, select, update

import clock
from models import Mailbox, QuotaUsage, RateCounter, Stat, User, cfg, db, raw_cursor


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


def mailbox_cap_reached(connection: Any = None) -> bool:
    """True while ``max_live_mailboxes`` (0 = no cap) live mailboxes exist.
    Every way of creating an address refuses until some expire, so a flood
    spread over many client addresses still cannot grow the tables without bound.

    A creator asks in its session's transaction, and first waits its turn
    for the one stats row's write lock (held until it commits or rolls
    back): counting and creating are then one step, and creators at the
    same moment cannot all pass the last free place. With ``connection``
    (the daemon's RCPT check, read-only) it is a look only, for an early
    refusal; delivery asks again as a creator."""
    cap = int(cfg("max_live_mailboxes") or 0)
    if cap <= 0:
        return False
    if connection is not None:
        return (connection.execute(_LIVE_COUNT, {"now": clock.now()}).scalar() or 0) >= cap
    db.session.execute(_CREATION_TURN)
    return (db.session.scalar(_LIVE_COUNT, {"now": clock.now()}) or 0) >= cap


_LIVE_COUNT = select(func.count(Mailbox.id)).where(Mailbox.expires_at > bindparam("now"))
# A write that changes nothing, for its lock: PostgreSQL's row lock on the
# stats row, SQLite's write lock (queued by writelock.py like any write).
_CREATION_TURN = update(Stat.__table__).where(Stat.__table__.c.id == 1).values(
    total_addresses=Stat.__table__.c.total_addresses)


# --------------------------------------------------------------------------
# the User API's monthly quota

def quota_period() -> str:
    """``YYYY-MM`` of the calendar month now running in the configured zone."""
    return clock.local_now().strftime("%Y-%m")


def quota_limit(user: User) -> int:
    return plan_quota(user.plan)


def plan_quota(plan: str) -> int:
    """The monthly quota of plan ``plan`` (an unknown plan is ``free``, as in ``User.plan_config``)."""
    return int(User.plan_named(plan).get("monthly_quota") or 0)


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


@dataclass
class _Ticket:
    """One request's wish for a unit, waiting in ``QuotaBatcher``."""
    key: tuple[int, str, int]  # user id, period, limit
    conn: Any = field(default=None, repr=False)  # the request's own DBAPI connection; None: its session's
    done: bool = False
    used: Optional[int] = None
    failed: Optional[BaseException] = field(default=None, repr=False)


class QuotaFailed(RuntimeError):
    """The batch that held this request's reservation could not be written."""


class QuotaBatcher:
    """Group commit of quota reservations within one process.

    Every User API request writes its reservation; as one write transaction
    each, the requests of many threads and workers queue for SQLite's one
    writer lock (or a PostgreSQL row lock) one commit at a time, each paying
    a lock hand-off and a commit. Here a request joins a queue; the first
    one finds nobody writing and writes for everyone queued, in one
    transaction (one guarded UPDATE per user: ``used + n <= limit``, or unit
    by unit near the limit), then hands each its count. The requests that
    arrive meanwhile form the next batch. The count stays exact: every unit
    is still taken by a guarded UPDATE in the database, before the request
    runs."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[_Ticket] = []
        self._writing = False

    def reserve(self, user_id: int, period: str, limit: int, conn: Any = None) -> Optional[int]:
        """Take one unit: the new count, or None when the quota is spent.
        ``conn``: a DBAPI connection the caller holds and gives back (a
        request answered below Flask has no session); if this request
        writes the batch, it does so there and commits it."""
        # Whoever finds nobody writing writes the batch on its own connection,
        # so each request holds its connection before it queues: a writer
        # that first had to check one out could wait for the pool behind the
        # very requests that wait for it (pool timeout, 500s on PostgreSQL).
        if conn is None:
            db.session.connection()
        ticket = _Ticket((user_id, period, limit), conn)
        with self._cond:
            self._queue.append(ticket)
            while self._writing and not ticket.done:
                self._cond.wait()
            if not ticket.done:
                self._writing, batch, self._queue = True, self._queue, []
        if not ticket.done:
            try:
                self._write(batch, ticket)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()
        if ticket.failed is not None:
            raise ticket.failed
        return ticket.used

    @staticmethod
    def _write(batch: list[_Ticket], mine: _Ticket) -> None:
        """One transaction for the whole batch (on SQLite it queues for the
        host's writer lock, writelock.py, like every writer). On failure the
        writer gets the error itself and the others a ``QuotaFailed`` caused
        by it (each request then answers 500)."""
        wanted = Counter(t.key for t in batch)
        conn = mine.conn
        try:
            cursor = raw_cursor() if conn is None else conn.cursor()
            got = {key: QuotaUsage.reserve_many(*key, n, cursor=cursor) for key, n in wanted.items()}
            (db.session.commit if conn is None else conn.commit)()
        except BaseException as exc:
            (db.session.rollback if conn is None else conn.rollback)()
            for ticket in batch:
                if ticket is mine:
                    ticket.failed = exc
                else:
                    ticket.failed = QuotaFailed("the quota could not be counted")
                    ticket.failed.__cause__ = exc
                ticket.done = True
            return
        for ticket in batch:
            ticket.used, ticket.done = got[ticket.key].pop(0), True


_batchers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> its QuotaBatcher
_batchers_lock = threading.Lock()


def batcher() -> QuotaBatcher:
    """The batcher of the current app's database (one per engine: requests of
    two apps in one process, as in tests, never share a transaction)."""
    engine = db.engine
    with _batchers_lock:
        found = _batchers.get(engine)
        if found is None:
            found = _batchers[engine] = QuotaBatcher()
        return found


def reserve_unit(user_id: int, plan: str) -> tuple[int, Optional[int]]:
    """``reserve_quota`` for a request without a session (answered below
    Flask, hotpath.py): ``(limit, used)``, used None when the quota is spent.
    The unit is taken in the same batches, on a pooled connection held for
    the wait and given back: the session's start, connection, commit and
    removal cost more than the guarded UPDATE (bench/README, session 5)."""
    limit = plan_quota(plan)
    conn = db.engine.raw_connection()
    try:
        return limit, batcher().reserve(user_id, quota_period(), limit, conn)
    finally:
        conn.close()


def reserve_quota(user: User) -> tuple[Optional[QuotaReservation], int]:
    """Take one request of ``user``'s monthly quota: ``(reservation, used)``,
    or ``(None, used)`` when it is spent."""
    period, limit = quota_period(), quota_limit(user)
    used = batcher().reserve(user.id, period, limit)
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
