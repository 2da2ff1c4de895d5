"""Tables of TempMail and the queries on them.

Every datetime in the database is naive UTC. ``now()`` is the one clock the
whole application reads, so tests can inject their own (``app.config["CLOCK"]``).
Attachment and raw-message files live under the uploads folder with
server-chosen names; the small storage functions at the end of this module are
the only code that touches those files.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets as _secrets
import string
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional
from zoneinfo import ZoneInfo

from flask import current_app
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.session import Session as FlaskSession
from sqlalchemy import (event, Boolean, DateTime, ForeignKey, Index, Integer,
                        String, Text, UniqueConstraint, delete, func, select, update)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.orm.attributes import set_committed_value
from werkzeug.security import check_password_hash, generate_password_hash


class Base(DeclarativeBase):
    pass


# Rows stay readable after a commit without a refresh query: cheaper, and a
# row another worker deletes meanwhile cannot turn a finished answer into a
# 500 (ObjectDeletedError on the refresh).
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})

USERNAME_RE = re.compile(r"^[a-z0-9]{3,20}$")
PUBLIC_ID_ALPHABET = string.ascii_letters + string.digits
PUBLIC_ID_LENGTH = 46  # the User API seed's message ids are 46 [A-Za-z0-9]
WORDS = ("apple", "maple", "river", "cloud", "tiger", "ocean", "amber", "cedar",
         "delta", "ember", "falcon", "garden", "harbor", "island", "jasper",
         "kiwi", "lemon", "meadow", "nectar", "orbit", "pepper", "quartz",
         "raven", "sunny", "timber", "umber", "velvet", "willow", "yonder",
         "zephyr", "breeze", "comet", "dune", "fern", "glade", "hazel", "iris",
         "juniper", "lotus", "mango", "nova", "olive", "pixel", "robin", "sage",
         "tulip", "violet", "wren", "budi", "pratama", "coral", "birch")


class MailboxError(Exception):
    """A mailbox could not be created; ``code`` names why (invalid, reserved,
    taken) and ``message`` says it in the words of the PHP original, which
    both APIs and the web page show as they are."""

    MESSAGES = {
        "invalid": "Invalid username. Use 3-20 alphanumeric characters only.",
        "reserved": "This username is reserved and cannot be used.",
        "taken": "Username already taken. Please choose another one.",
    }

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code

    @property
    def message(self) -> str:
        return self.MESSAGES.get(self.code, self.MESSAGES["invalid"])


# --------------------------------------------------------------------------
# clock and formatting

def now() -> datetime:
    """The current time as naive UTC; tests replace it with ``app.config["CLOCK"]``."""
    clock = current_app.config.get("CLOCK") if current_app else None
    if clock is not None:
        return clock()
    return datetime.now(timezone.utc).replace(tzinfo=None)


def local_zone() -> ZoneInfo:
    """The configured display time zone."""
    return ZoneInfo(current_app.config["TEMPMAIL"].get("timezone") or "UTC")


def fmt_local(value: Optional[datetime], zone: Optional[ZoneInfo] = None) -> Optional[str]:
    """``YYYY-MM-DD HH:MM:SS`` in the configured zone (or ``zone``, for a caller
    formatting many values), as the PHP API printed MySQL DATETIMEs."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc).astimezone(zone or local_zone()).strftime("%Y-%m-%d %H:%M:%S")


def fmt_iso(value: datetime) -> str:
    """ISO 8601 with the configured zone's offset (User API timestamps)."""
    return value.replace(tzinfo=timezone.utc).astimezone(local_zone()).isoformat(timespec="seconds")


def plausible(value: str, max_len: int) -> bool:
    """True when ``value`` can be looked up at all: PostgreSQL rejects NUL in
    text, and no address or domain is longer than the RFCs allow."""
    return 0 < len(value) <= max_len and "\x00" not in value


def cfg(key: str, default=None):
    """One key of the TempMail configuration dictionary."""
    return current_app.config["TEMPMAIL"].get(key, default)


# --------------------------------------------------------------------------
# tables

class Domain(db.Model):
    __tablename__ = "domains"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    type: Mapped[str] = mapped_column(String(16), default="free")  # free | premium
    custom: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    def to_v1(self) -> dict:
        """The User API's domain object."""
        return {"domain": self.name, "type": self.type.capitalize(), "custom": bool(self.custom)}

    @staticmethod
    def active_names(types: Iterable[str] = ("free",)) -> list[str]:
        """Names of active domains of the given types, in configuration order (id)."""
        rows = db.session.scalars(select(Domain.name).where(
            Domain.active.is_(True), Domain.type.in_(list(types))).order_by(Domain.id))
        return list(rows)

    @staticmethod
    def by_name(name: str) -> Optional["Domain"]:
        """The active domain called ``name`` (case-insensitive), or None."""
        name = (name or "").strip().lower()
        if not plausible(name, 253):
            return None
        return db.session.scalar(select(Domain).where(Domain.name == name, Domain.active.is_(True)))

    @staticmethod
    def ensure(name: str, type_: str = "free", custom: bool = False) -> "Domain":
        """Create the domain when missing, else update its type; returns it."""
        name = name.strip().lower()
        dom = db.session.scalar(select(Domain).where(Domain.name == name))
        if dom is None:
            dom = Domain(name=name, type=type_, custom=custom, active=True)
            db.session.add(dom)
        else:
            dom.type, dom.active = type_, True
        db.session.flush()
        return dom


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
        plans = cfg("plans") or {}
        return plans.get(self.plan) or plans.get("free") or {
            "monthly_quota": 50000, "domain_types": ["free"], "mailbox_lifetime_seconds": 600}

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

    def quota_status(self) -> dict:
        """This month's quota: ``limit``, ``used``, ``remaining`` (ints) and ``reset``
        (aware datetime, start of the next month in the configured zone)."""
        limit = int(self.plan_config().get("monthly_quota") or 0)
        used = QuotaUsage.used_in(self.id, QuotaUsage.current_period())
        return {"limit": limit, "used": used, "remaining": max(0, limit - used),
                "reset": QuotaUsage.next_reset()}


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
        raw = ApiKey.KEY_PREFIX + _secrets.token_urlsafe(32)
        key = ApiKey(user=user, prefix=raw[:11], key_hash=ApiKey.hash(raw), created_at=now())
        db.session.add(key)
        return key, raw

    @staticmethod
    def lookup(raw: str) -> Optional["ApiKey"]:
        """The live key matching ``raw``, or None."""
        if not raw or len(raw) > 200:
            return None
        key = db.session.scalar(select(ApiKey).where(ApiKey.key_hash == ApiKey.hash(raw)))
        return key if key is not None and key.revoked_at is None else None

    def revoke(self) -> None:
        """Revoke this key at once (not committed)."""
        self.revoked_at = self.revoked_at or now()


class QuotaUsage(db.Model):
    """Successful User API requests per user and month (``period`` = ``YYYY-MM``).
    Kept per user rather than per key so regenerating a key cannot reset a quota."""
    __tablename__ = "quota_usage"
    __table_args__ = (UniqueConstraint("user_id", "period"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    period: Mapped[str] = mapped_column(String(7))
    used: Mapped[int] = mapped_column(Integer, default=0)

    @staticmethod
    def _local_now() -> datetime:
        return now().replace(tzinfo=timezone.utc).astimezone(local_zone())

    @staticmethod
    def current_period() -> str:
        """``YYYY-MM`` of the calendar month now running in the configured zone."""
        return QuotaUsage._local_now().strftime("%Y-%m")

    @staticmethod
    def next_reset() -> datetime:
        """Start of the next calendar month in the configured zone (aware)."""
        local = QuotaUsage._local_now()
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        return datetime(year, month, 1, tzinfo=local_zone())

    @staticmethod
    def used_in(user_id: int, period: str) -> int:
        """Successful requests counted for ``user_id`` in ``period`` so far."""
        return db.session.scalar(select(QuotaUsage.used).where(
            QuotaUsage.user_id == user_id, QuotaUsage.period == period)) or 0

    @staticmethod
    def count_success(user_id: int, period: str) -> int:
        """Add one successful request and commit; returns the new count.

        The increment is a single UPDATE in the database (never read-modify-write
        in Python), so concurrent requests in several worker processes each add
        exactly one: PostgreSQL serialises them on the row lock, SQLite on its
        write lock. The row is created first, ignoring a concurrent creator."""
        insert_ignore(QuotaUsage, ["user_id", "period"], user_id=user_id, period=period, used=0)
        where = (QuotaUsage.user_id == user_id, QuotaUsage.period == period)
        db.session.execute(update(QuotaUsage).where(*where).values(used=QuotaUsage.used + 1))
        used = db.session.scalar(select(QuotaUsage.used).where(*where))  # still under our lock
        db.session.commit()
        return used


def insert_ignore(model, index_elements: list[str], **values) -> None:
    """INSERT a row unless one with the same unique key exists (a concurrent
    creator included): ``ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL."""
    dialect = db.session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        db.session.execute(insert(model).values(**values).on_conflict_do_nothing(
            index_elements=index_elements))
        return
    try:  # other databases: a savepoint absorbs the lost creation race
        with db.session.begin_nested():
            db.session.add(model(**values))
    except IntegrityError:
        pass


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
    def _window(seconds: int) -> int:
        return int(now().replace(tzinfo=timezone.utc).timestamp()) // max(1, seconds)

    @staticmethod
    def hit(bucket: str, seconds: int) -> int:
        """Count one event for ``bucket`` in the current window and commit;
        returns the window's count including this one (atomic UPDATE)."""
        window, bucket = RateCounter._window(seconds), bucket[:200]
        insert_ignore(RateCounter, ["bucket", "window"], bucket=bucket, window=window, hits=0)
        where = (RateCounter.bucket == bucket, RateCounter.window == window)
        db.session.execute(update(RateCounter).where(*where).values(hits=RateCounter.hits + 1))
        hits = db.session.scalar(select(RateCounter.hits).where(*where))
        # old windows are worthless: drop them now and then, on the writer's dime
        if hits == 1:
            db.session.execute(delete(RateCounter).where(RateCounter.window < window - 1,
                                                         RateCounter.bucket == bucket))
        db.session.commit()
        return hits

    @staticmethod
    def peek(bucket: str, seconds: int) -> int:
        """The current window's count for ``bucket`` without counting."""
        return db.session.scalar(select(RateCounter.hits).where(
            RateCounter.bucket == bucket[:200], RateCounter.window == RateCounter._window(seconds))) or 0


def retry_after(name: str, bucket: str) -> int:
    """Count one event against the abuse limit ``name`` for ``bucket`` (e.g. a
    client IP): 0 when it is allowed, else the seconds until the window ends."""
    limit, seconds = rate_limit(name)
    if limit <= 0 or RateCounter.hit(f"{name}:{bucket}", seconds) <= limit:
        return 0
    return seconds - int(now().replace(tzinfo=timezone.utc).timestamp()) % seconds


def rate_limit(name: str) -> tuple[int, int]:
    """``(limit, window_seconds)`` of the configured abuse limit ``name``; limit 0 = off."""
    entry = (cfg("rate_limits") or {}).get(name) or {}
    return int(entry.get("limit", 0)), int(entry.get("window_seconds", 60))


def mailbox_cap_reached() -> bool:
    """True while ``max_live_mailboxes`` (0 or absent = no cap) live mailboxes
    exist. Every way of creating an address refuses until some expire, so a
    flood spread over many client addresses still cannot grow the tables
    without bound."""
    cap = int(cfg("max_live_mailboxes") or 0)
    if cap <= 0:
        return False
    live = db.session.scalar(select(func.count(Mailbox.id)).where(Mailbox.expires_at > now())) or 0
    return live >= cap


class Mailbox(db.Model):
    __tablename__ = "mailboxes"
    id: Mapped[int] = mapped_column(primary_key=True)
    # One row per address: generating a name whose mailbox has expired first
    # deletes the old row, so the unique index settles races between
    # concurrent generates (exactly one insert wins).
    address: Mapped[str] = mapped_column(String(320), unique=True)
    username: Mapped[str] = mapped_column(String(64))
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    session_id: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    token: Mapped[str] = mapped_column(String(32))
    domain: Mapped[Domain] = relationship(lazy="joined")

    @property
    def is_live(self) -> bool:
        return self.expires_at > now()

    @staticmethod
    def find_live(address: str) -> Optional["Mailbox"]:
        """The live mailbox for ``address`` (any case), or None when unknown or expired."""
        address = (address or "").strip().lower()
        if not plausible(address, 320):
            return None
        box = db.session.scalar(select(Mailbox).where(Mailbox.address == address))
        return box if box is not None and box.is_live else None

    @staticmethod
    def find_owned(address: str, user_id: int) -> Optional["Mailbox"]:
        """The live mailbox ``address`` if ``user_id`` owns it, else None: a
        mailbox of someone else is indistinguishable from a missing one."""
        box = Mailbox.find_live(address)
        return box if box is not None and box.user_id == user_id else None

    @staticmethod
    def create(username: Optional[str], domain: Domain, lifetime: int,
               user_id: Optional[int] = None, session_id: Optional[str] = None) -> "Mailbox":
        """Create and commit a live mailbox; a random readable name when ``username`` is None.

        Raises MailboxError("invalid" | "reserved" | "taken")."""
        if username is None:
            return Mailbox._create_random(domain, lifetime, user_id, session_id)
        username = check_username(username)
        address = Mailbox._claim(f"{username}@{domain.name}")
        t = now()
        box = Mailbox(address=address, username=username, domain=domain, created_at=t,
                      expires_at=t + timedelta(seconds=lifetime), user_id=user_id,
                      session_id=session_id, token=_secrets.token_hex(8))
        db.session.add(box)
        Mailbox._commit_claim()
        return box

    @staticmethod
    def _commit_claim() -> None:
        """Count the newly taken address and commit; a clash on the unique
        address index means a concurrent claimant won, so it is "taken"."""
        try:
            db.session.flush()
            Stat.bump(total_addresses=1)
            db.session.commit()
        except IntegrityError:
            db.session.rollback()
            raise MailboxError("taken")

    @staticmethod
    def _claim(address: str) -> str:
        """Make ``address`` free to take: a live owner makes it "taken"; an
        expired one is deleted with its mail (the unique index still settles
        a race between two claimants at commit)."""
        old = db.session.scalar(select(Mailbox).where(Mailbox.address == address))
        if old is not None:
            if old.is_live:
                raise MailboxError("taken")
            old.delete()
        return address

    @staticmethod
    def _create_random(domain: Domain, lifetime: int, user_id, session_id) -> "Mailbox":
        reserved = set(cfg("reserved_usernames") or [])
        for _ in range(20):
            name = _secrets.choice(WORDS) + str(_secrets.randbelow(9000) + 100)
            if name in reserved:
                continue
            try:
                return Mailbox.create(name, domain, lifetime, user_id, session_id)
            except MailboxError:
                continue
        raise MailboxError("taken")

    def rename(self, username: str, domain: Domain) -> "Mailbox":
        """Move this mailbox to ``username@domain`` keeping its messages; commits.
        Raises MailboxError like ``create``."""
        username = check_username(username)
        if f"{username}@{domain.name}" == self.address:
            return self
        address = Mailbox._claim(f"{username}@{domain.name}")
        self.address, self.username, self.domain = address, username, domain
        Mailbox._commit_claim()
        return self

    def messages_query(self, newest_first: bool = False):
        order = Message.id.desc() if newest_first else Message.id.asc()
        return select(Message).where(Message.mailbox_id == self.id).order_by(order)

    def message_count(self) -> int:
        return db.session.scalar(select(func.count()).select_from(Message).where(
            Message.mailbox_id == self.id)) or 0

    def delete(self) -> None:
        """Delete this mailbox with its messages and their files (no commit)."""
        delete_messages(select(Message.id).where(Message.mailbox_id == self.id))
        db.session.execute(delete(Mailbox).where(Mailbox.id == self.id))

    def to_v1(self) -> dict:
        """The User API's mailbox object (create and switch answers)."""
        from app import email_token  # the token signer lives with the app's secret
        return {"id": self.id, "email": self.address, "domain": self.domain.name,
                "expire_at": fmt_iso(self.expires_at),
                "expires_in_seconds": max(0, int((self.expires_at - now()).total_seconds())),
                "created_at": fmt_iso(self.created_at), "email_token": email_token(self)}


def check_username(username: str) -> str:
    """Lower-case ``username`` and check it: 3-20 ASCII letters/digits, not reserved."""
    name = (username or "").strip().lower()
    # str.isalnum() would let unicode digits and letters through; the PHP
    # original used ctype_alnum on bytes, i.e. ASCII only.
    if not USERNAME_RE.match(name) or not name.isascii():
        raise MailboxError("invalid")
    if name in {r.lower() for r in (cfg("reserved_usernames") or [])}:
        raise MailboxError("reserved")
    return name


def new_public_id() -> str:
    """An opaque, unguessable message id: 46 random characters of [A-Za-z0-9]."""
    # One 320-bit draw written in base 62 (46 digits hold 273 bits; the bias
    # of the reduction is below 2**-46) instead of 46 urandom calls per message.
    number = int.from_bytes(_secrets.token_bytes(40), "big")
    digits = []
    for _ in range(PUBLIC_ID_LENGTH):
        number, digit = divmod(number, 62)
        digits.append(PUBLIC_ID_ALPHABET[digit])
    return "".join(digits)


class Message(db.Model):
    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_mailbox_id_id", "mailbox_id", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(46), unique=True, default=new_public_id)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    envelope_from: Mapped[str] = mapped_column(Text, default="")
    envelope_to: Mapped[str] = mapped_column(Text, default="")
    from_email: Mapped[str] = mapped_column(Text, default="")
    from_name: Mapped[str] = mapped_column(Text, default="")
    to: Mapped[str] = mapped_column(Text, default="")
    cc: Mapped[str] = mapped_column(Text, default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    date: Mapped[Optional[str]] = mapped_column(Text)
    message_id: Mapped[Optional[str]] = mapped_column(Text)
    body_text: Mapped[str] = mapped_column(Text, default="")
    body_html: Mapped[str] = mapped_column(Text, default="")
    is_read: Mapped[bool] = mapped_column(Boolean, default=False)
    size: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    raw_path: Mapped[Optional[str]] = mapped_column(String(128))
    raw_sha256: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    attachments: Mapped[list["Attachment"]] = relationship(
        back_populates="message", order_by="Attachment.id", cascade="all, delete-orphan",
        passive_deletes=True)
    mailbox: Mapped[Mailbox] = relationship()

    @staticmethod
    def find_owned(public_id: str, user_id: int) -> Optional["Message"]:
        """The message with this public id in a live mailbox owned by ``user_id``, else None."""
        if not public_id or len(public_id) != PUBLIC_ID_LENGTH:
            return None
        msg = db.session.scalar(select(Message).join(Mailbox).where(
            Message.public_id == public_id, Mailbox.user_id == user_id))
        return msg if msg is not None and msg.mailbox.is_live else None

    def mark_read(self) -> None:
        """Set the read flag and commit (only writes when it changes). A plain
        UPDATE, so a message deleted meanwhile by another request matches no
        row instead of failing this one with a stale-data error."""
        if not self.is_read:
            db.session.execute(update(Message).where(Message.id == self.id).values(is_read=True))
            set_committed_value(self, "is_read", True)
            db.session.commit()

    def attachment_named(self, name: str) -> Optional["Attachment"]:
        return next((a for a in self.attachments if a.filename == name), None)

    def to_legacy_summary(self) -> dict:
        """One entry of api.php's inbox list."""
        return {"id": self.id, "from_email": self.from_email, "from_name": self.from_name,
                "subject": self.subject, "is_read": int(self.is_read),  # PHP/MySQL TINYINT
                "received_at": fmt_local(self.received_at)}

    def to_legacy(self) -> dict:
        """api.php's message object (``GET /email/{id}``)."""
        return {"id": self.id, "email_address_id": self.mailbox_id, "from_email": self.from_email,
                "from_name": self.from_name, "subject": self.subject, "body_text": self.body_text,
                "body_html": self.body_html, "is_read": int(self.is_read),
                "received_at": fmt_local(self.received_at)}

    def to_v1(self, base_url: str) -> dict:
        """The User API's message object; ``base_url`` ends without a slash."""
        has_html = bool(self.body_html)
        return {"is_seen": bool(self.is_read), "subject": self.subject,
                "from": self.from_name or self.from_email, "from_email": self.from_email,
                "to": self.mailbox.address if self.mailbox else self.envelope_to,
                "receivedAt": fmt_local(self.received_at), "id": self.public_id,
                "html": has_html, "content": self.body_html if has_html else self.body_text,
                "attachments": [a.to_v1(base_url, self.public_id) for a in self.attachments]}


class Attachment(db.Model):
    __tablename__ = "attachments"
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(Text)  # display name only, never a path
    stored_path: Mapped[str] = mapped_column(String(128))  # server-chosen, relative to uploads
    size: Mapped[int] = mapped_column(Integer, default=0)
    content_type: Mapped[str] = mapped_column(String(255), default="application/octet-stream")
    content_id: Mapped[Optional[str]] = mapped_column(Text)
    inline: Mapped[bool] = mapped_column(Boolean, default=False)
    message: Mapped[Message] = relationship(back_populates="attachments")

    @property
    def extension(self) -> str:
        suffix = os.path.splitext(self.filename or "")[1]
        return suffix[1:].lower() if suffix else ""

    def legacy_url(self) -> str:
        """URL path that downloads this file through api.php's routes."""
        from urllib.parse import quote
        return f"/uploads/attachments/{self.id}/{quote(self.filename or 'attachment', safe='')}"

    def to_legacy(self) -> dict:
        return {"id": self.id, "filename": self.filename, "size": self.size,
                "content_type": self.content_type, "file_path": self.legacy_url()}

    def to_v1(self, base_url: str, public_id: str) -> dict:
        from urllib.parse import quote
        return {"name": self.filename, "extension": self.extension, "size": self.size,
                "url": f"{base_url}/api/messages/{public_id}/attachments/{quote(self.filename, safe='')}"}


class Stat(db.Model):
    """Counters that outlive the rows they count (one row, id 1)."""
    __tablename__ = "stats"
    id: Mapped[int] = mapped_column(primary_key=True)
    total_addresses: Mapped[int] = mapped_column(Integer, default=0)
    total_received: Mapped[int] = mapped_column(Integer, default=0)
    last_updated: Mapped[Optional[datetime]] = mapped_column(DateTime)

    @staticmethod
    def bump(total_addresses: int = 0, total_received: int = 0) -> None:
        """Add to the counters inside the caller's transaction (one atomic UPDATE).

        Inside ``Stat.deferred()`` (the mail daemon's group commit) the amounts
        are summed instead and written by one UPDATE just before the commit."""
        pending = db.session.info.get("stat_deferred")
        if pending is not None:
            pending[0] += total_addresses
            pending[1] += total_received
            return
        # A Core UPDATE of the table: the ORM's bulk-update machinery (even with
        # synchronize_session=False) cost more than storing a message.
        table = Stat.__table__
        db.session.execute(update(table).where(table.c.id == 1).values(
            total_addresses=table.c.total_addresses + total_addresses,
            total_received=table.c.total_received + total_received, last_updated=now()))

    @staticmethod
    def defer() -> None:
        """Start summing ``bump`` calls in this session (see ``flush_deferred``)."""
        db.session.info["stat_deferred"] = [0, 0]

    @staticmethod
    def flush_deferred() -> None:
        """Write the sums collected since ``defer`` (one UPDATE) and stop deferring."""
        pending = db.session.info.pop("stat_deferred", None)
        if pending is not None and (pending[0] or pending[1]):
            Stat.bump(total_addresses=pending[0], total_received=pending[1])

    @staticmethod
    def snapshot() -> dict:
        """api.php's ``stats`` object: ``total_emails`` counts messages stored now."""
        row = db.session.get(Stat, 1)
        total = db.session.scalar(select(func.count()).select_from(Message)) or 0
        return {"id": 1, "total_emails": total, "total_addresses": row.total_addresses,
                "total_received": row.total_received,
                "last_updated": fmt_local(row.last_updated or now())}


def ensure_seed_rows() -> None:
    """Insert the stats row and the configured domains when missing (idempotent, race-safe)."""
    try:
        if db.session.get(Stat, 1) is None:
            db.session.add(Stat(id=1, total_addresses=0, total_received=0, last_updated=now()))
            db.session.flush()
        for entry in cfg("domains") or []:
            if db.session.scalar(select(Domain.id).where(Domain.name == entry["domain"].lower())) is None:
                Domain.ensure(entry["domain"], (entry.get("type") or "free").lower(),
                              bool(entry.get("custom", False)))
        db.session.commit()
    except IntegrityError:  # another worker seeded the same rows first
        db.session.rollback()


# --------------------------------------------------------------------------
# message storage and removal

def store_message(mailbox: Mailbox, fields: dict, raw: bytes,
                  attachments: Iterable[dict] = ()) -> Message:
    """Write the raw file and attachment files, then add the message rows and
    bump the counters in the caller's transaction (the caller commits).

    ``fields`` holds Message columns; each attachment dict has ``filename``,
    ``data``, ``content_type`` and optionally ``content_id`` and ``inline``.
    Display names are made unique within the message."""
    msg = Message(mailbox_id=mailbox.id, received_at=now(), size=len(raw), **fields)
    msg.raw_path = write_file(raw, ".eml")
    msg.raw_sha256 = hashlib.sha256(raw).hexdigest()
    # Assigned, not extended: a pending object's extended collection is not
    # marked loaded, and reading it later (the log line) cost one SELECT.
    msg.attachments = attachment_rows(attachments)
    db.session.add(msg)
    Stat.bump(total_received=1)
    return msg


def attachment_rows(parts: Iterable[dict]) -> list[Attachment]:
    """Write each part's ``data`` to a file and return its Attachment rows
    (not added); display names are made unique within the message."""
    seen: set[str] = set()
    rows = []
    for part in parts:
        rows.append(Attachment(
            filename=unique_name(part.get("filename") or "attachment", seen),
            stored_path=write_file(part["data"], ".bin"), size=len(part["data"]),
            content_type=part.get("content_type") or "application/octet-stream",
            content_id=part.get("content_id"), inline=bool(part.get("inline"))))
    return rows


def unique_name(name: str, seen: set) -> str:
    """``name`` or ``name (2).ext`` ... so names are unique within one message."""
    base, ext = os.path.splitext(name)
    candidate, n = name, 1
    while candidate in seen:
        n += 1
        candidate = f"{base} ({n}){ext}"
    seen.add(candidate)
    return candidate


def delete_messages(id_query) -> int:
    """Delete the messages whose ids ``id_query`` selects, with their attachment
    rows, in the caller's transaction. Their files are unlinked only once that
    transaction commits (see ``_after_commit``), so a failed delete never
    leaves rows whose files are gone."""
    ids = list(db.session.scalars(id_query))
    if not ids:
        return 0
    paths = list(db.session.scalars(select(Attachment.stored_path).where(Attachment.message_id.in_(ids))))
    paths += [p for p in db.session.scalars(select(Message.raw_path).where(Message.id.in_(ids))) if p]
    db.session.execute(delete(Attachment).where(Attachment.message_id.in_(ids)))
    db.session.execute(delete(Message).where(Message.id.in_(ids)))
    db.session.info.setdefault("unlink_on_commit", []).extend(paths)
    return len(ids)


# --------------------------------------------------------------------------
# retention: purge, per-mailbox cap, orphan repair, statistics

Progress = Optional[Callable[[int], None]]


def purge_expired(batch_size: int = 500, progress: Progress = None) -> dict:
    """Delete expired mailboxes with their messages and files; returns
    ``{"mailboxes": n, "messages": n}``.

    Every transaction is bounded: first at most ``batch_size`` messages of
    expired mailboxes, then at most ``batch_size`` (by then empty) mailboxes,
    each committed on its own. So a mailbox holding 100,000 messages never
    becomes one huge transaction, and mail arriving meanwhile waits for at
    most one batch. The cutoff is taken once: what expires while the purge
    runs is left for the next run. ``progress(n)`` gets the rows of each batch."""
    cutoff = now()
    totals = {"mailboxes": 0, "messages": 0}
    expired = select(Mailbox.id).where(Mailbox.expires_at <= cutoff)
    while True:
        n = delete_messages(select(Message.id).where(Message.mailbox_id.in_(expired))
                            .order_by(Message.id).limit(batch_size))
        kind = "messages"
        if n == 0:
            n, kind = _delete_empty_mailboxes(cutoff, batch_size), "mailboxes"
        if n == 0:
            return totals
        db.session.commit()
        totals[kind] += n
        if progress:
            progress(n)


def _delete_empty_mailboxes(cutoff: datetime, limit: int) -> int:
    # NOT EXISTS is checked again by the DELETE itself: a message stored after
    # the messages pass keeps its mailbox for the next round, so the foreign
    # key's cascade can never drop a message row while leaving its files.
    empty = (Mailbox.expires_at <= cutoff,
             ~select(Message.id).where(Message.mailbox_id == Mailbox.id).exists())
    ids = list(db.session.scalars(select(Mailbox.id).where(*empty).limit(limit)))
    if not ids:
        return 0
    return db.session.execute(delete(Mailbox).where(Mailbox.id.in_(ids), *empty)).rowcount


def count_expired() -> dict:
    """How many mailboxes and messages ``purge_expired`` would remove now."""
    expired = select(Mailbox.id).where(Mailbox.expires_at <= now())
    boxes = db.session.scalar(select(func.count()).select_from(expired.subquery())) or 0
    msgs = db.session.scalar(select(func.count(Message.id)).where(Message.mailbox_id.in_(expired))) or 0
    return {"mailboxes": boxes, "messages": msgs}


def max_messages_per_mailbox() -> int:
    """The configured retention cap per mailbox; 0 means no cap."""
    return max(0, int(cfg("max_messages_per_mailbox") or 0))


def trim_mailbox(mailbox_id: int, keep: Optional[int] = None, batch_size: int = 500) -> int:
    """Delete the oldest messages of one mailbox beyond the newest ``keep``
    (default: ``max_messages_per_mailbox``; 0 = no cap), at most ``batch_size``
    of them, in the caller's transaction (not committed). Returns how many.

    Receivers call it after ``store_message`` and before their commit, so a
    mailbox never holds more than the cap once a delivery is durable."""
    keep = max_messages_per_mailbox() if keep is None else keep
    if keep <= 0:
        return 0
    db.session.flush()  # count a message just added in this transaction
    overflow = (select(Message.id).where(Message.mailbox_id == mailbox_id)
                .order_by(Message.id.desc()).offset(keep).limit(batch_size))
    return delete_messages(overflow)


def trim_all_mailboxes(batch_size: int = 500, progress: Progress = None) -> int:
    """Apply the retention cap to every mailbox, one bounded commit at a time
    (the cap may have been lowered, or mail stored by an older release)."""
    keep, removed = max_messages_per_mailbox(), 0
    if keep <= 0:
        return 0
    while True:
        over = list(db.session.scalars(select(Message.mailbox_id).group_by(Message.mailbox_id)
                                       .having(func.count(Message.id) > keep).limit(batch_size)))
        if not over:
            return removed
        for box_id in over:
            n = trim_mailbox(box_id, keep, batch_size)
            db.session.commit()
            removed += n
            if progress:
                progress(n)


def _stored_files(grace_seconds: float) -> Iterator[tuple[str, Path]]:
    """(relative name, path) of every stored file older than ``grace_seconds``;
    dot-files (``.htaccess``, ``.gitkeep``) are not TempMail's to manage."""
    root = uploads_dir()
    limit = time.time() - grace_seconds
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(folder) / name
            if not name.startswith(".") and path.stat().st_mtime < limit:
                yield path.relative_to(root).as_posix(), path


def remove_orphan_files(grace_seconds: float = 3600, batch_size: int = 500) -> list[str]:
    """Unlink stored files that no message or attachment row references, and
    empty day folders; returns the relative names removed.

    Files younger than ``grace_seconds`` are never touched: a receiver writes
    its files before its rows commit, so a fresh unreferenced file may be mail
    being stored right now (also true of ``.tmp`` files being written)."""
    removed: list[str] = []
    chunk: dict[str, Path] = {}
    for rel, path in _stored_files(grace_seconds):
        chunk[rel] = path
        if len(chunk) >= batch_size:
            removed += _unlink_unreferenced(chunk)
            chunk = {}
    removed += _unlink_unreferenced(chunk)
    _remove_empty_folders(grace_seconds)
    return removed


def _unlink_unreferenced(chunk: dict[str, Path]) -> list[str]:
    if not chunk:
        return []
    names = list(chunk)
    used = set(db.session.scalars(select(Message.raw_path).where(Message.raw_path.in_(names))))
    used |= set(db.session.scalars(select(Attachment.stored_path).where(Attachment.stored_path.in_(names))))
    gone = [rel for rel in names if rel not in used]
    for rel in gone:
        chunk[rel].unlink(missing_ok=True)
    return gone


def _remove_empty_folders(grace_seconds: float) -> None:
    # Only folders left alone for the grace period: a receiver may have just
    # created today's folder and be about to write into it.
    limit = time.time() - grace_seconds
    root = uploads_dir()
    for folder, _dirs, files in os.walk(root, topdown=False):
        path = Path(folder)
        if path != root and not files and not any(path.iterdir()) and path.stat().st_mtime < limit:
            path.rmdir()


def find_missing_files(batch_size: int = 500) -> dict:
    """Rows whose stored file is gone: ``{"messages": [ids], "attachments": [ids]}``.
    Only reported (such a message still shows its parsed text); never raises."""
    return {"messages": _missing(Message.id, Message.raw_path, batch_size),
            "attachments": _missing(Attachment.id, Attachment.stored_path, batch_size)}


def _missing(id_col, path_col, batch_size: int) -> list[int]:
    missing, last = [], 0
    while True:
        rows = db.session.execute(select(id_col, path_col).where(id_col > last, path_col.is_not(None))
                                  .order_by(id_col).limit(batch_size)).all()
        if not rows:
            return missing
        for row_id, rel in rows:
            try:
                exists = file_path(rel).is_file()
            except (OSError, ValueError):  # a path outside uploads counts as gone
                exists = False
            if not exists:
                missing.append(row_id)
        last = rows[-1][0]


def storage_stats() -> dict:
    """Counts for ``flask stats``: rows per table, bytes stored, lifetime counters."""
    def count(stmt) -> int:
        return int(db.session.scalar(stmt) or 0)
    t = now()
    stat = db.session.get(Stat, 1)
    return {
        "domains": count(select(func.count(Domain.id))),
        "mailboxes_live": count(select(func.count(Mailbox.id)).where(Mailbox.expires_at > t)),
        "mailboxes_expired": count(select(func.count(Mailbox.id)).where(Mailbox.expires_at <= t)),
        "messages": count(select(func.count(Message.id))),
        "message_bytes": count(select(func.sum(Message.size))),
        "attachments": count(select(func.count(Attachment.id))),
        "attachment_bytes": count(select(func.sum(Attachment.size))),
        "users": count(select(func.count(User.id))),
        "api_keys_live": count(select(func.count(ApiKey.id)).where(ApiKey.revoked_at.is_(None))),
        "total_received": stat.total_received if stat else 0,
        "total_addresses": stat.total_addresses if stat else 0,
    }


REPARSED_FIELDS = ("from_email", "from_name", "to", "cc", "subject", "date", "message_id",
                   "body_text", "body_html")


def message_ids(batch_size: int = 500) -> Iterator[int]:
    """Every message id in ascending order, read in keyset batches (bounded memory)."""
    last = 0
    while True:
        ids = list(db.session.scalars(select(Message.id).where(Message.id > last)
                                      .order_by(Message.id).limit(batch_size)))
        if not ids:
            return
        yield from ids
        last = ids[-1]


def reparse_message(msg: Message, parsed: dict) -> None:
    """Replace ``msg``'s header and body fields and its attachments with those
    of ``parsed`` (``mailhandler.parse_message`` output), in the caller's
    transaction. Envelope, read flag and ids stay; old attachment files are
    unlinked once the transaction commits."""
    for key in REPARSED_FIELDS:
        if key in parsed:
            setattr(msg, key, parsed[key])
    old = [a.stored_path for a in msg.attachments]
    msg.attachments.clear()  # delete-orphan: the old rows go at flush
    msg.attachments.extend(attachment_rows(parsed.get("attachments") or ()))
    db.session.info.setdefault("unlink_on_commit", []).extend(old)


@event.listens_for(FlaskSession, "after_commit")
def _after_commit(session) -> None:
    """Files of deleted rows go once the delete is durable; files written for
    committed rows are kept."""
    session.info.pop("written_files", None)
    remove_files(session.info.pop("unlink_on_commit", []))


@event.listens_for(FlaskSession, "after_rollback")
def _after_rollback(session) -> None:
    """A rolled-back store leaves no file behind; a rolled-back delete keeps its files."""
    session.info.pop("unlink_on_commit", None)
    remove_files(session.info.pop("written_files", []))


def uploads_dir() -> Path:
    return Path(current_app.config["UPLOADS_DIR"])


def write_file(data: bytes, suffix: str) -> str:
    """Store ``data`` durably under a server-chosen name; returns the path relative to uploads."""
    sub = now().strftime("%Y%m%d")
    folder = uploads_dir() / sub
    rel = f"{sub}/{uuid.uuid4().hex}{suffix}"
    tmp = folder / (uuid.uuid4().hex + ".tmp")
    try:
        fh = open(tmp, "wb")
    except FileNotFoundError:  # a new day (or the purge removed the empty folder)
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(tmp, "wb")
    with fh:
        fh.write(data)
        fh.flush()
        # mailhandler.deliver sets "defer_fsync" and syncs a whole batch of
        # files (and their folders) once, just before its commit.
        if current_app.config.get("FSYNC", True) and not db.session.info.get("defer_fsync"):
            os.fsync(fh.fileno())
    os.replace(tmp, uploads_dir() / rel)
    db.session.info.setdefault("written_files", []).append(rel)
    return rel


def file_path(rel: str) -> Path:
    """Absolute path of a stored file; refuses anything that would leave the uploads folder."""
    root = uploads_dir().resolve()
    path = (root / rel).resolve()
    if root not in path.parents:
        raise ValueError("stored path outside uploads")
    return path


def remove_files(paths: Iterable[str]) -> None:
    for rel in paths:
        try:
            file_path(rel).unlink(missing_ok=True)
        except (OSError, ValueError):
            current_app.logger.warning("could not remove stored file %s", rel)
