"""Tables of the accounts and the counters: users, their browser sessions
and API keys, the User API's monthly quota, and the abuse-limit counters;
with the queries on them. The mail tables are in ``models.py``, which
re-exports these (import them from there).

Keys and session ids are stored as SHA-256 only; every count is taken by a
guarded UPDATE, exact under concurrency (``limits.py`` uses them).
"""
from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Optional

from sqlalchemy import (DateTime, ForeignKey, Integer, String, UniqueConstraint, bindparam, delete, select,
                        text, update)
from sqlalchemy.orm import Mapped, contains_eager, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

from clock import now
from database import db, insert_ignore, prepared, raw_cursor
from settings import cfg


class User(db.Model):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[Optional[str]] = mapped_column(String(256))
    plan: Mapped[str] = mapped_column(String(32), default="free")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    keys: Mapped[list["ApiKey"]] = relationship(back_populates="user", cascade="all, delete-orphan")

    def plan_config(self) -> dict:
        """This user's plan from the configuration (falls back to ``free``)."""
        return User.plan_named(self.plan)

    @staticmethod
    def plan_named(plan: str) -> dict:
        """Plan ``plan`` from the configuration; an unknown plan is ``free``."""
        plans = cfg("plans")
        return plans.get(plan) or plans["free"]

    @staticmethod
    def create(email: str, plan: str = "free", password: Optional[str] = None) -> "User":
        """Add a user (not committed); the e-mail is stored lower-case. Without a
        password the account can use API keys but cannot sign in."""
        user = User(email=email.strip().lower(), plan=plan, created_at=now(),
                    password_hash=generate_password_hash(password) if password else None)
        db.session.add(user)
        return user

    @staticmethod
    def by_email(email: str) -> Optional["User"]:
        """The user with this e-mail address (any case), or None."""
        return db.session.scalar(select(User).where(User.email == (email or "").strip().lower()))

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return bool(self.password_hash) and check_password_hash(self.password_hash, password or "")

    def live_key(self) -> Optional["ApiKey"]:
        """The user's current (unrevoked) API key, or None; only its prefix is displayable."""
        return next((k for k in self.keys if k.revoked_at is None), None)

    def allowed_domain_types(self) -> list[str]:
        """Domain types (``free``/``premium``) this user's plan may use, lower-case."""
        return [t.lower() for t in self.plan_config().get("domain_types") or ["free"]]


class UserSession(db.Model):
    """A signed-in browser. The session cookie carries a random id and only its
    SHA-256 is stored here: deleting the row ends that session on the server,
    whatever copy of the cookie is still around (accounts.py)."""
    __tablename__ = "user_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ApiKey(db.Model):
    """A User API key. Only a SHA-256 of the key is stored (keys are 256-bit
    random, so a fast hash is enough and lets every request find its key by
    an indexed lookup); the prefix is what the owner sees afterwards."""
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(24), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    revoked_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
    user: Mapped[User] = relationship(back_populates="keys")

    KEY_PREFIX = "tm_"

    @staticmethod
    def hash(raw: str) -> str:
        return hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()

    @staticmethod
    def issue(user: User) -> tuple["ApiKey", str]:
        """Revoke the user's live keys and create a new one (not committed).
        Returns the row and the raw key, which is shown once and never stored."""
        for old in user.keys:
            if old.revoked_at is None:
                old.revoked_at = now()
        raw = ApiKey.KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(user=user, prefix=raw[:11], key_hash=ApiKey.hash(raw), created_at=now())
        db.session.add(key)
        return key, raw

    @staticmethod
    def lookup(raw: str) -> Optional["ApiKey"]:
        """The live key matching ``raw``, or None."""
        if not raw or len(raw) > 200:
            return None
        # One statement built once, the user loaded with the key: building the
        # select and then lazy-loading ``key.user`` were half of the User
        # API's per-request cost (bench/README, session 3).
        key = db.session.scalar(_KEY_LOOKUP, {"key_hash": ApiKey.hash(raw)})
        return key if key is not None and key.revoked_at is None else None

    def revoke(self) -> None:
        """Revoke this key at once (not committed)."""
        self.revoked_at = self.revoked_at or now()


_KEY_LOOKUP = (select(ApiKey).join(ApiKey.user).options(contains_eager(ApiKey.user))
               .where(ApiKey.key_hash == bindparam("key_hash")))


class QuotaUsage(db.Model):
    """Successful User API requests per user and month (``period`` = ``YYYY-MM``).
    Kept per user rather than per key so regenerating a key cannot reset a
    quota. ``limits.py`` reserves and refunds; these are its statements."""
    __tablename__ = "quota_usage"
    __table_args__ = (UniqueConstraint("user_id", "period"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    period: Mapped[str] = mapped_column(String(7))
    used: Mapped[int] = mapped_column(Integer, default=0)

    @staticmethod
    def used_in(user_id: int, period: str) -> int:
        """Requests counted for ``user_id`` in ``period`` so far."""
        return db.session.scalar(select(QuotaUsage.used).where(
            QuotaUsage.user_id == user_id, QuotaUsage.period == period)) or 0

    @staticmethod
    def reserve(user_id: int, period: str, limit: int) -> Optional[int]:
        """Take one unit of the quota if any is left, atomically (one guarded
        UPDATE: concurrent workers can never together pass the limit), and
        commit; returns the new count, or None when the quota is spent."""
        used = QuotaUsage.reserve_many(user_id, period, limit, 1)[0]
        db.session.commit()
        return used

    @staticmethod
    def reserve_many(user_id: int, period: str, limit: int, count: int, cursor=None) -> list[Optional[int]]:
        """Take ``count`` units at once in the transaction of ``cursor`` (a
        DBAPI cursor; by default the session's), not committed: the count
        each unit brings ``used`` to, in order, then None for each one the
        quota has no room for. While there is room for all of them this is one
        guarded UPDATE (``used + count <= limit``), exact under concurrency
        like ``reserve``'s; near the limit (or for a month's first request)
        they are taken one by one."""
        cursor = raw_cursor() if cursor is None else cursor
        if count > 1:
            rows = prepared(_QUOTA_TAKE_MANY).rows(cursor, quota_user=user_id, quota_period=period,
                                                   quota_count=count, quota_room=limit - count)
            if rows:
                used = rows[0][0]
                return list(range(used - count + 1, used + 1))
        # The month's row exists after its first request: try the guarded
        # UPDATE alone first, and create the row only when nothing matched
        # (a new month, or the quota is spent).
        out: list[Optional[int]] = []
        while len(out) < count:
            used = QuotaUsage._take(cursor, user_id, period, limit)
            if used is None and not out:
                prepared(_QUOTA_MONTH_ROW).run(cursor, quota_user=user_id, quota_period=period)
                used = QuotaUsage._take(cursor, user_id, period, limit)
            if used is None:  # spent: the rest are refused too
                return out + [None] * (count - len(out))
            out.append(used)
        return out

    @staticmethod
    def _take(cursor, user_id: int, period: str, limit: int) -> Optional[int]:
        # On a raw cursor (one statement of every User API request):
        # SQLAlchemy's execution path cost more than the UPDATE.
        rows = prepared(_QUOTA_TAKE).rows(cursor, quota_user=user_id, quota_period=period, quota_limit=limit)
        return rows[0][0] if rows else None

    @staticmethod
    def refund(user_id: int, period: str) -> int:
        """Give back a reserved unit (the answer was not a 2xx) and commit; returns the count."""
        used = db.session.execute(update(QuotaUsage).where(
            QuotaUsage.user_id == user_id, QuotaUsage.period == period, QuotaUsage.used > 0)
            .values(used=QuotaUsage.used - 1).returning(QuotaUsage.used)).scalar()
        db.session.commit()
        return used or 0


_quota = QuotaUsage.__table__
# Built once: the guarded increment runs on every User API request.
_QUOTA_TAKE = (update(_quota).where(_quota.c.user_id == bindparam("quota_user"),
                                    _quota.c.period == bindparam("quota_period"),
                                    _quota.c.used < bindparam("quota_limit"))
               .values(used=_quota.c.used + 1).returning(_quota.c.used))
_QUOTA_TAKE_MANY = (update(_quota).where(_quota.c.user_id == bindparam("quota_user"),
                                         _quota.c.period == bindparam("quota_period"),
                                         _quota.c.used <= bindparam("quota_room"))
                    .values(used=_quota.c.used + bindparam("quota_count")).returning(_quota.c.used))

# The month's row at 0 unless a concurrent request made it first (as
# ``insert_ignore``), for a raw cursor: the same SQL on SQLite and PostgreSQL.
_QUOTA_MONTH_ROW = text("INSERT INTO quota_usage (user_id, period, used) VALUES (:quota_user, :quota_period, 0) "
                        "ON CONFLICT (user_id, period) DO NOTHING")


class RateCounter(db.Model):
    """Fixed-window counters for abuse limits (mailbox creation per client IP,
    sign-in attempts), kept in the database so every worker process shares them."""
    __tablename__ = "rate_counters"
    __table_args__ = (UniqueConstraint("bucket", "window"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    bucket: Mapped[str] = mapped_column(String(200))
    window: Mapped[int] = mapped_column(Integer, index=True)
    hits: Mapped[int] = mapped_column(Integer, default=0)

    @staticmethod
    def take(bucket: str, window: int, limit: int) -> bool:
        """Count one event in ``bucket``'s ``window`` if fewer than ``limit``
        were counted, atomically, and commit; False when the limit is reached."""
        bucket = bucket[:200]
        insert_ignore(RateCounter, ["bucket", "window"], bucket=bucket, window=window, hits=0)
        hits = db.session.execute(update(RateCounter).where(
            RateCounter.bucket == bucket, RateCounter.window == window, RateCounter.hits < limit)
            .values(hits=RateCounter.hits + 1).returning(RateCounter.hits)).scalar()
        if hits == 1:  # old windows are worthless: drop them now and then
            db.session.execute(delete(RateCounter).where(RateCounter.window < window - 1,
                                                         RateCounter.bucket == bucket))
        db.session.commit()
        return hits is not None

    @staticmethod
    def give_back(bucket: str, window: int) -> None:
        """Undo one ``take`` (the event turned out not to count) and commit."""
        db.session.execute(update(RateCounter).where(
            RateCounter.bucket == bucket[:200], RateCounter.window == window, RateCounter.hits > 0)
            .values(hits=RateCounter.hits - 1))
        db.session.commit()

    @staticmethod
    def peek(bucket: str, window: int) -> int:
        """The window's count for ``bucket`` without counting."""
        return db.session.scalar(select(RateCounter.hits).where(
            RateCounter.bucket == bucket[:200], RateCounter.window == window)) or 0
