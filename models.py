"""Tables of TempMail and the queries on them.

Every datetime in the database is naive UTC, read from ``clock.now()``.
Bytes (raw messages, attachment bodies) are not here: rows name blobs by
SHA-256 and ``storage.py`` keeps them; the ``blobs`` table counts how many
rows use each one, in the same transaction as those rows.
"""
from __future__ import annotations

import os
import secrets
from collections import Counter
from datetime import datetime, timedelta
from typing import Iterable, Optional
from urllib.parse import quote

from flask import current_app
from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import (BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, LargeBinary,
                        String, Text, bindparam, delete, func, select, update)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.orm.attributes import set_committed_value

import idgen
import mimeheaders
from clock import fmt_local, now
from database import db, prepared, raw_cursor, upsert_add_many  # noqa: F401  (db is imported from here too)
from idgen import MailboxError, check_username  # noqa: F401  (the fronts import them from here)
from settings import cfg  # noqa: F401  (imported from here too)
# The account tables, in their own module; imported from here like every table.
from usermodels import ApiKey, QuotaUsage, RateCounter, User, UserSession  # noqa: F401


# Mailboxes api.php may show: made by /generate, or by catch-all mail. Those a
# User API key or a browser session made belong to their owner alone.
LEGACY_ORIGINS = ("api.php", "catch-all")


def plausible(value: str, max_len: int) -> bool:
    """True when ``value`` can be looked up at all: PostgreSQL rejects NUL in
    text, and no address or domain is longer than the RFCs allow."""
    return 0 < len(value) <= max_len and "\x00" not in value


# --------------------------------------------------------------------------
# domains

class Domain(db.Model):
    __tablename__ = "domains"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    type: Mapped[str] = mapped_column(String(16), default="free")  # free | premium
    custom: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    @staticmethod
    def active_names(types: Iterable[str] = ("free",)) -> list[str]:
        """Names of active domains of the given types, in configuration order (id)."""
        # Core on the session's connection: the daemon asks once per batch, and
        # building the ORM statement cost more than running it.
        return list(db.session.connection().execute(ACTIVE_NAMES, {"types": list(types)}).scalars())

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


# --------------------------------------------------------------------------
# mailboxes

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
    # Which front made it: api.php, catch-all, user-api, web or cli.
    origin: Mapped[str] = mapped_column(String(16), default="api.php")
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
    def build(username: str, domain: Domain, lifetime: int, origin: str, user_id: Optional[int] = None,
              session_id: Optional[str] = None) -> "Mailbox":
        """Claim ``username@domain`` (checked) and add a new live mailbox for it
        to the session, not flushed: the one constructor of every front and
        of catch-all delivery. Raises MailboxError."""
        username = check_username(username)
        address = Mailbox._claim(f"{username}@{domain.name}")
        t = now()
        box = Mailbox(address=address, username=username, domain=domain, created_at=t,
                      expires_at=t + timedelta(seconds=lifetime), user_id=user_id,
                      session_id=session_id, origin=origin, token=secrets.token_hex(8))
        db.session.add(box)
        return box

    @staticmethod
    def create(username: Optional[str], domain: Domain, lifetime: int, origin: str = "api.php",
               user_id: Optional[int] = None, session_id: Optional[str] = None) -> "Mailbox":
        """Create and commit a live mailbox; a random readable name when
        ``username`` is None. Raises MailboxError("invalid" | "reserved" | "taken")."""
        for _ in range(1 if username is not None else 5):
            name = username if username is not None else idgen.random_username()
            try:
                box = Mailbox.build(name, domain, lifetime, origin, user_id, session_id)
                Mailbox._commit_claim()
                return box
            except MailboxError:
                if username is not None:
                    raise
        raise MailboxError("taken")

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
        a race between two claimants at commit). Its blobs are left to the
        orphan sweep: this transaction may still fail."""
        old = db.session.scalar(select(Mailbox).where(Mailbox.address == address))
        if old is not None:
            if old.is_live:
                raise MailboxError("taken")
            old.delete()
        return address

    def rename(self, username: str, domain: Domain) -> "Mailbox":
        """Move this mailbox to ``username@domain`` keeping its messages (and
        its token, so links already handed out keep working); commits.
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

    def delete(self) -> list[str]:
        """Delete this mailbox with its messages in the caller's transaction;
        returns the blobs freed (``storage.commit_removal`` commits and frees them)."""
        freed = delete_messages(select(Message.id).where(Message.mailbox_id == self.id))
        db.session.execute(delete(Mailbox).where(Mailbox.id == self.id))
        return freed

    @staticmethod
    def _signer() -> URLSafeSerializer:
        return URLSafeSerializer(current_app.config["SECRET_KEY"], salt="mailbox-token")

    def email_token(self) -> str:
        """A signed, opaque token that opens this mailbox's inbox page
        (``/m/<token>``). It binds the mailbox id and its per-mailbox random
        token, so a deleted and re-created address does not reopen with an old one."""
        return Mailbox._signer().dumps([self.id, self.token])

    @staticmethod
    def from_token(token: str) -> Optional["Mailbox"]:
        """The live mailbox a token was made for, or None."""
        try:
            box_id, box_token = Mailbox._signer().loads(token)
            box = db.session.get(Mailbox, int(box_id))
        except (BadSignature, ValueError, TypeError, OverflowError):
            return None
        if box is None or box.token != box_token or not box.is_live:
            return None
        return box


# --------------------------------------------------------------------------
# messages and their blobs

class Message(db.Model):
    __tablename__ = "messages"
    # AUTOINCREMENT: SQLite would otherwise hand a deleted top id to the next
    # message, and api.php's ids (a permutation of these) must never repeat.
    __table_args__ = (Index("ix_messages_mailbox_id_id", "mailbox_id", "id"),
                      Index("ix_messages_raw_sha256_mailbox_id", "raw_sha256", "mailbox_id"),
                      {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(primary_key=True)
    # insert_sentinel: a unique value set client-side, so the ORM can INSERT a
    # delivery batch's messages in one multi-row statement and match each
    # RETURNING id to its object (without it SQLite gets one INSERT per row).
    public_id: Mapped[str] = mapped_column(String(46), unique=True, default=idgen.new_public_id,
                                           insert_sentinel=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    envelope_from: Mapped[str] = mapped_column(Text, default="")
    envelope_to: Mapped[str] = mapped_column(Text, default="")
    tag: Mapped[Optional[str]] = mapped_column(String(64))  # the "tag" of name+tag@domain
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
    # Bumped by `flask reparse`, the one rewrite of a stored message's fields:
    # web workers compare it before answering from what they kept (listingcache.py).
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    size: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    raw_sha256: Mapped[Optional[str]] = mapped_column(String(64))  # the raw .eml blob
    attachments: Mapped[list["Attachment"]] = relationship(
        back_populates="message", order_by="Attachment.id", cascade="all, delete-orphan",
        passive_deletes=True)
    mailbox: Mapped[Mailbox] = relationship()

    @property
    def legacy_id(self) -> int:
        """The id api.php shows (see idgen: unpredictable, never reused)."""
        return idgen.expose(self.id, "messages")

    @staticmethod
    def by_legacy_id(raw: str) -> Optional["Message"]:
        """The message api.php calls ``raw`` in a live api.php mailbox, or None."""
        row_id = idgen.row_id_of(raw, "messages")
        msg = db.session.get(Message, row_id) if row_id is not None else None
        if msg is None or msg.mailbox.origin not in LEGACY_ORIGINS or not msg.mailbox.is_live:
            return None
        return msg

    @staticmethod
    def find_owned(public_id: str, user_id: int) -> Optional["Message"]:
        """The message with this public id in a live mailbox owned by ``user_id``, else None."""
        if not public_id or len(public_id) != idgen.PUBLIC_ID_LENGTH:
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

    def delete(self) -> list[str]:
        """Delete this message and its attachment rows in the caller's
        transaction; returns the blobs freed (see ``Mailbox.delete``)."""
        return delete_messages(select(Message.id).where(Message.id == self.id))


# The sha256 of an attachment kept as a span of its message's row: it names no
# blob, so deleting the message releases none for it.
SPAN_SHA = ""


class Attachment(db.Model):
    __tablename__ = "attachments"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(Text)  # display name only, never a path
    sha256: Mapped[str] = mapped_column(String(64), index=True)  # the blob of its bytes; SPAN_SHA for a span
    size: Mapped[int] = mapped_column(Integer, default=0)
    content_type: Mapped[str] = mapped_column(String(255), default="application/octet-stream")
    content_id: Mapped[Optional[str]] = mapped_column(Text)
    inline: Mapped[bool] = mapped_column(Boolean, default=False)
    # Or its bytes are a span of its message's raw bytes kept in their own row
    # (MessageSource), decoded from ``source_codec`` (a Content-Transfer-Encoding
    # of mimeheaders.SPAN_CODECS) when read: no second copy of the same bytes
    # (bench/README "Session 10").
    source_start: Mapped[Optional[int]] = mapped_column(Integer)
    source_end: Mapped[Optional[int]] = mapped_column(Integer)
    source_codec: Mapped[Optional[str]] = mapped_column(String(20))
    message: Mapped[Message] = relationship(back_populates="attachments")

    @hybrid_property
    def in_source(self) -> bool:
        """Whether its bytes are a span of its message's own row, not a blob
        (also a SQL expression: ``Attachment.in_source``)."""
        return self.source_start is not None

    @in_source.inplace.expression
    @classmethod
    def _in_source_expression(cls):
        return cls.source_start.is_not(None)

    def keep_as_span(self, start: int, end: int, codec: str) -> None:
        """Name its bytes by their span of the message's raw bytes (decoded
        from ``codec``) instead of a blob."""
        self.sha256, self.source_start, self.source_end, self.source_codec = SPAN_SHA, start, end, codec

    def bytes_in(self, raw: bytes) -> Optional[bytes]:
        """Its bytes, decoded from its span of its message's ``raw`` bytes."""
        return mimeheaders.decode_span(raw, (self.source_start, self.source_end, self.source_codec))

    @property
    def extension(self) -> str:
        return Attachment.extension_of(self.filename)

    @staticmethod
    def extension_of(filename: Optional[str]) -> str:
        """The lower-case extension of a display name, without its dot ("" if none)."""
        suffix = os.path.splitext(filename or "")[1]
        return suffix[1:].lower() if suffix else ""

    @property
    def legacy_id(self) -> int:
        return idgen.expose(self.id, "attachments")

    def legacy_url(self) -> str:
        """URL path that downloads this file through api.php's routes."""
        return Attachment.legacy_url_of(self.id, self.filename)

    @staticmethod
    def legacy_url_of(row_id: int, filename: Optional[str]) -> str:
        return f"/uploads/attachments/{idgen.expose(row_id, 'attachments')}/{quote(filename or 'attachment', safe='')}"

    @staticmethod
    def by_legacy_id(raw: str) -> Optional["Attachment"]:
        """The attachment api.php calls ``raw``, in a live api.php mailbox, or None."""
        row_id = idgen.row_id_of(raw, "attachments")
        att = db.session.get(Attachment, row_id) if row_id is not None else None
        box = att.message.mailbox if att is not None else None
        return att if box is not None and box.origin in LEGACY_ORIGINS and box.is_live else None


def unique_name(name: str, seen: set) -> str:
    """``name`` or ``name (2).ext`` ... so names are unique within one message."""
    base, ext = os.path.splitext(name)
    candidate, n = name, 1
    while candidate in seen:
        n += 1
        candidate = f"{base} ({n}){ext}"
    seen.add(candidate)
    return candidate


class Blob(db.Model):
    """One distinct blob and how many rows (messages, attachments) use it."""
    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    refs: Mapped[int] = mapped_column(Integer, default=0)

    @staticmethod
    def add_refs(counts: dict[str, tuple[int, int]]) -> set[str]:
        """Count new users of several blobs, ``{sha: (size, count)}``, in
        multi-row atomic upserts; returns the blobs that are new, i.e. whose
        bytes must be stored now."""
        added = upsert_add_many(Blob, "sha256", "refs", [
            {"sha256": sha, "size": size, "refs": count} for sha, (size, count) in counts.items()])
        return {sha for sha, refs in added.items() if refs == counts[sha][1]}

    @staticmethod
    def release(counts: Counter) -> list[str]:
        """Drop references in the caller's transaction; returns the blobs no
        row uses any more (their rows and chunks are deleted here, the files
        by ``storage.discard`` once this commits)."""
        if not counts:
            return []
        table = Blob.__table__
        for sha, n in sorted(counts.items()):  # the lock order of PendingBlobs.reference
            db.session.execute(update(table).where(table.c.sha256 == sha).values(refs=table.c.refs - n))
        freed = list(db.session.scalars(delete(Blob).where(
            Blob.sha256.in_(list(counts)), Blob.refs <= 0).returning(Blob.sha256)))
        if freed:
            db.session.execute(delete(BlobChunk).where(BlobChunk.sha256.in_(freed)))
        return freed


class BlobChunk(db.Model):
    """The database storage backend: a blob's bytes in 1 MiB pieces."""
    __tablename__ = "blob_chunks"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class MessageSource(db.Model):
    """A message's raw bytes, when they are small enough to live in the
    database (``storage.source_in_row``): one row keyed by the message, so
    storing it is one append to one B-tree, where a blob costs a ``blobs``
    row and a ``blob_chunks`` row, each with an index keyed by a random
    digest (four B-tree insertions, two of them on random pages, and two
    statements per batch; bench/README "Session 9"). Its digest stays in
    ``Message.raw_sha256`` for the duplicate filter. Gone with its message
    (ON DELETE CASCADE)."""
    __tablename__ = "message_sources"
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True,
                                            autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


# Where a query over messages must tell the two apart: true for a message
# whose bytes are in its own row (it names its digest, but uses no blob).
OWN_SOURCE = select(MessageSource.message_id).where(MessageSource.message_id == Message.id).exists()

_domains = Domain.__table__
ACTIVE_NAMES = select(_domains.c.name).where(_domains.c.active.is_(True), _domains.c.type.in_(
    bindparam("types", expanding=True))).order_by(_domains.c.id)


def delete_messages(id_query) -> list[str]:
    """Delete the messages whose ids ``id_query`` selects, with their
    attachment rows, in the caller's transaction; returns the blobs freed."""
    return delete_message_rows(list(db.session.scalars(id_query)))[1]


def delete_message_rows(ids: list[int]) -> tuple[int, list[str]]:
    """Delete the messages ``ids`` with their attachment rows, in the caller's
    transaction; returns how many this transaction really deleted, and the
    blobs freed."""
    if not ids:
        return 0, []
    # The blobs to release are the ones of the rows this DELETE really
    # removed (RETURNING), not of the rows selected before: two deleters of
    # the same message (purges on two hosts, a purge and a user's DELETE)
    # must not both release its blobs, or a blob still in use is freed.
    shas = Counter(sha for sha in db.session.scalars(delete(Attachment).where(Attachment.message_id.in_(ids))
                                                     .returning(Attachment.sha256)) if sha != SPAN_SHA)
    # A message whose bytes are in its own row (MessageSource) holds no reference to a blob.
    in_rows = set(db.session.scalars(delete(MessageSource).where(MessageSource.message_id.in_(ids))
                                     .returning(MessageSource.message_id)))
    gone = db.session.execute(delete(Message).where(Message.id.in_(ids))
                              .returning(Message.id, Message.raw_sha256)).all()
    shas.update(sha for msg_id, sha in gone if sha and msg_id not in in_rows)
    return len(gone), Blob.release(shas)


# --------------------------------------------------------------------------
# counters

class Stat(db.Model):
    """Counters that outlive the rows they count (one row, id 1)."""
    __tablename__ = "stats"
    id: Mapped[int] = mapped_column(primary_key=True)
    total_addresses: Mapped[int] = mapped_column(Integer, default=0)
    total_received: Mapped[int] = mapped_column(Integer, default=0)
    last_updated: Mapped[Optional[datetime]] = mapped_column(DateTime)

    @staticmethod
    def bump(total_addresses: int = 0, total_received: int = 0) -> None:
        """Add to the counters inside the caller's transaction (one atomic UPDATE)."""
        # A Core UPDATE of the table: the ORM's bulk-update machinery (even with
        # synchronize_session=False) cost more than storing a message.
        prepared(STAT_BUMP).run(raw_cursor(), addresses=total_addresses, received=total_received, now=now())

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
        for entry in cfg("domains"):
            if db.session.scalar(select(Domain.id).where(Domain.name == entry["domain"].lower())) is None:
                Domain.ensure(entry["domain"], (entry.get("type") or "free").lower(),
                              bool(entry.get("custom", False)))
        db.session.commit()
    except IntegrityError:  # another worker seeded the same rows first
        db.session.rollback()


_stats = Stat.__table__
STAT_BUMP = update(_stats).where(_stats.c.id == 1).values(
    total_addresses=_stats.c.total_addresses + bindparam("addresses"),
    total_received=_stats.c.total_received + bindparam("received"), last_updated=bindparam("now"))
