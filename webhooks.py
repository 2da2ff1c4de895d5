"""User API webhooks: the tables, the URL policy and the durable outbox.

A user sets one webhook (``PUT /api/webhook`` or the API Management page).
Every message stored in one of that user's mailboxes then becomes a row of
the outbox (``webhook_outbox``), written by ``stage_events`` inside the very
transaction that stores the message (``mailhandler.DeliveryBatch.commit``):
the message and its event are durable together or not at all, so a daemon
killed at any moment loses no event. ``webhook_worker`` sends the rows, signs
them, retries failures, and logs each attempt in ``webhook_deliveries`` (the
newest ``KEEP_ATTEMPTS`` per webhook).

URLs are checked here, when they are set and again by the sender before each
attempt (on the address it then connects to): http and https only, and no
loopback, private, link-local, multicast, reserved or unspecified address
unless ``webhooks.allow_private`` is on.
"""
from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import threading
from datetime import datetime, timedelta
from typing import Optional
from urllib.parse import urlsplit

from sqlalchemy import (Boolean, DateTime, ForeignKey, Index, Integer, String, Text, delete, func, insert,
                        or_, select, update)
from sqlalchemy.orm import Mapped, mapped_column, relationship

import clock
from database import insert_ignore
from models import Mailbox, Message, cfg, db

EVENT = "message.received"
SECRET_PREFIX = "whsec_"
MAX_URL = 2048
KEEP_ATTEMPTS = 50  # attempts listed by GET /api/webhook/deliveries, per webhook
# A delivered event's row is kept a little while (its payload can be looked
# at when a receiver reports trouble), then the purge removes it.
KEEP_DELIVERED = timedelta(hours=1)
# Set when events were committed: wakes the daemon's own sender at once.
WAKE = threading.Event()


class UnsafeURL(ValueError):
    """A webhook URL that is refused. The message says why in the User API's
    English; ``kind`` (missing, invalid, credentials, unresolved, private)
    and ``details`` let the web page say it in the reader's language."""

    def __init__(self, message: str, kind: str = "invalid", **details: str):
        super().__init__(message)
        self.kind, self.details = kind, details


# --------------------------------------------------------------------------
# tables

class Webhook(db.Model):
    """A user's webhook (one per user). ``secret`` keys the HMAC signatures;
    ``base_url`` is the site URL the user set it through, which the links
    of the messages in its events use (the daemon has no request to ask)."""
    __tablename__ = "webhooks"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    url: Mapped[str] = mapped_column(String(MAX_URL))
    secret: Mapped[str] = mapped_column(String(80))
    base_url: Mapped[str] = mapped_column(String(MAX_URL))
    created_at: Mapped[datetime] = mapped_column(DateTime)


class WebhookOutbox(db.Model):
    """One event to deliver. ``next_at`` is when it is due (NULL once it is
    delivered or given up); a sender owns it while ``claimed_until`` is in
    the future, under its random ``claim``."""
    __tablename__ = "webhook_outbox"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(String(32), unique=True)  # the TempMail-Delivery header
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    payload: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    next_at: Mapped[Optional[datetime]] = mapped_column(DateTime, index=True)
    claimed_until: Mapped[Optional[datetime]] = mapped_column(DateTime)
    claim: Mapped[Optional[str]] = mapped_column(String(32))
    last_status: Mapped[Optional[int]] = mapped_column(Integer)
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    last_duration_ms: Mapped[Optional[int]] = mapped_column(Integer)
    delivered_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
    webhook: Mapped[Webhook] = relationship()


class WebhookDelivery(db.Model):
    """One attempt to deliver an event, as ``GET /api/webhook/deliveries`` lists it."""
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_webhook_id_id", "webhook_id", "id"),
                      {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime)
    status_code: Mapped[Optional[int]] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[Optional[str]] = mapped_column(Text)
    ok: Mapped[bool] = mapped_column(Boolean)


# --------------------------------------------------------------------------
# which URLs may be called

def allow_private() -> bool:
    return bool(cfg("webhooks")["allow_private"])


def check_url(url: Optional[str], private_ok: bool) -> str:
    """``url`` stripped, if a webhook may call it; else UnsafeURL. Its host
    must resolve, and (unless ``private_ok``) only to public addresses."""
    if not isinstance(url, str) or not url.strip():
        raise UnsafeURL("The url parameter is required.", "missing")
    url = url.strip()
    if len(url) > MAX_URL or not url.isprintable() or " " in url:
        raise UnsafeURL(f"Invalid url: use an http or https URL of at most {MAX_URL} characters.")
    host, port = split_url(url)
    resolve(host, port, private_ok)
    return url


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an http or https URL without credentials; else UnsafeURL."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is no number or out of range
    except ValueError:
        raise UnsafeURL("Invalid url.") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UnsafeURL("Invalid url: only http and https URLs with a host name are allowed.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("Invalid url: credentials in the URL are not allowed.", "credentials")
    return parts.hostname, port or (443 if parts.scheme.lower() == "https" else 80)


def resolve(host: str, port: int, private_ok: bool) -> list[tuple]:
    """The ``getaddrinfo`` entries of ``host`` (family, type, proto, name,
    sockaddr); UnsafeURL when it does not resolve, or (unless ``private_ok``)
    when ANY address is not public: a name that also points inside the
    network is refused whole rather than trusted for its public half."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        raise UnsafeURL(f"Invalid url: the host {host} does not resolve.", "unresolved", host=host) from None
    if not private_ok:
        for *_rest, sockaddr in found:
            if not is_public(sockaddr[0]):
                raise UnsafeURL(f"Invalid url: {host} resolves to {sockaddr[0]}, which is not a public "
                                "address.", "private", host=host, address=sockaddr[0])
    return found


def is_public(address: str) -> bool:
    """True for a globally routable unicast address. The IPv4 address inside
    an IPv4-mapped, 6to4 or Teredo IPv6 address must be public too, since
    the packets may end up there."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return False
    inner = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())] if ip.version == 6 else []
    return all(_public(one) for one in [ip, *filter(None, inner)])


def _public(ip) -> bool:
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


# --------------------------------------------------------------------------
# setting and reading a user's webhook

def of_user(user_id: int) -> Optional[Webhook]:
    return db.session.scalar(select(Webhook).where(Webhook.user_id == user_id))


def set_webhook(user_id: int, url: str, base_url: str) -> tuple[Webhook, str]:
    """Set the user's webhook to the (checked) ``url`` with a new secret, in
    the caller's transaction; returns it and the secret. Events still
    waiting go to the new URL, signed with the new secret."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    values = {"url": url, "secret": secret, "base_url": base_url.rstrip("/")[:MAX_URL],
              "created_at": clock.now()}
    # Insert-or-update as two race-free statements: two concurrent PUTs of one
    # user both succeed, and the later one is what stays.
    insert_ignore(Webhook, ["user_id"], user_id=user_id, **values)
    db.session.execute(update(Webhook).where(Webhook.user_id == user_id).values(**values))
    hook = of_user(user_id)
    db.session.refresh(hook)
    return hook, secret


def remove_webhook(user_id: int) -> bool:
    """Delete the user's webhook with its waiting events and its attempt log
    (in the caller's transaction); False when there was none."""
    return db.session.execute(delete(Webhook).where(Webhook.user_id == user_id)).rowcount > 0


def pending(webhook_id: int) -> int:
    """Events of this webhook still to be delivered."""
    return db.session.scalar(select(func.count(WebhookOutbox.id)).where(
        WebhookOutbox.webhook_id == webhook_id, WebhookOutbox.next_at.is_not(None))) or 0


def recent_attempts(webhook_id: int, limit: int = KEEP_ATTEMPTS) -> list[WebhookDelivery]:
    """The newest attempts first."""
    return list(db.session.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
                                   .order_by(WebhookDelivery.id.desc()).limit(limit)))


def webhook_json(hook: Webhook) -> dict:
    """A webhook as the User API shows it: never its secret."""
    return {"url": hook.url, "created_at": clock.fmt_iso(hook.created_at), "pending": pending(hook.id)}


def attempt_json(row: WebhookDelivery) -> dict:
    return {"delivery_id": row.event_id, "event": EVENT, "attempt": row.attempt, "time": clock.fmt_iso(row.at),
            "status_code": row.status_code, "duration_ms": row.duration_ms, "error": row.error, "ok": row.ok}


def page_context(user_id: int) -> dict:
    """What the API Management page shows of the user's webhook."""
    hook = of_user(user_id)
    if hook is None:
        return {"webhook": None, "webhook_pending": 0, "webhook_attempts": []}
    return {"webhook": hook, "webhook_pending": pending(hook.id), "webhook_attempts": recent_attempts(hook.id)}


# --------------------------------------------------------------------------
# the outbox, written with the mail

def stage_events(stored: list[tuple[Mailbox, Message]]) -> int:
    """Add an outbox row for each stored message whose mailbox owner has a
    webhook, in the delivery's own transaction; returns how many. Mail to
    mailboxes nobody owns (api.php, the web page) costs no query at all,
    owned mail one query per batch."""
    owners = {box.user_id for box, _msg in stored if box.user_id is not None}
    if not owners:
        return 0
    hooks = {h.user_id: h for h in db.session.scalars(select(Webhook).where(Webhook.user_id.in_(owners)))}
    todo = [(box, msg, hooks[box.user_id]) for box, msg in stored if box.user_id in hooks]
    if not todo:
        return 0
    db.session.flush()  # the public ids the payloads show are assigned at INSERT
    t = clock.now()
    db.session.execute(insert(WebhookOutbox), [
        {"event_id": secrets.token_hex(16), "webhook_id": hook.id, "payload": payload(box, msg, hook),
         "attempts": 0, "created_at": t, "next_at": t} for box, msg, hook in todo])
    return len(todo)


def payload(box: Mailbox, msg: Message, hook: Webhook) -> str:
    """The JSON body of a ``message.received`` event, fixed when the message
    is stored: retries send the same bytes, even after the message is gone."""
    import api_v1  # the message object of GET /api/messages/{id}; api_v1 imports delivery code
    body = {"event": EVENT, "mailbox": box.address, "message": api_v1.message_json(msg, hook.base_url)}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def wake() -> None:
    """Tell this process's sender that new events are due."""
    WAKE.set()


# --------------------------------------------------------------------------
# retention

def purge_outbox(batch_size: int = 500) -> int:
    """Delete finished outbox rows in bounded transactions: delivered ones
    after ``KEEP_DELIVERED``, given-up ones an hour after the last retry
    could have been; returns how many. The attempt log keeps their story."""
    t = clock.now()
    given_up = t - timedelta(seconds=float(cfg("webhooks")["retry_for_seconds"])) - KEEP_DELIVERED
    done = or_(WebhookOutbox.delivered_at < t - KEEP_DELIVERED,
               (WebhookOutbox.next_at.is_(None)) & WebhookOutbox.delivered_at.is_(None)
               & (WebhookOutbox.created_at < given_up))
    removed = 0
    while True:
        ids = list(db.session.scalars(select(WebhookOutbox.id).where(done).limit(batch_size)))
        if not ids:
            db.session.rollback()
            return removed
        removed += db.session.execute(delete(WebhookOutbox).where(WebhookOutbox.id.in_(ids))).rowcount
        db.session.commit()
