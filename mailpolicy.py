"""Policy: who may open a mailbox, and which mail a mailbox takes.

As Inbucket's ``policy`` package does with ``ShouldAccept``/``ShouldStore``,
one decision serves both moments of a delivery:

* at RCPT time (``check_recipient``, on the daemon's I/O thread, read-only),
* at delivery (``mailboxes_for``, inside the writer's transaction), where a
  catch-all address is also created, by the same ``Mailbox.build`` and the
  same username rules as ``/generate`` (reserved names included).

So whatever RCPT accepts, delivery stores. ``name+tag@domain`` is delivered
to ``name@domain`` and remembers its tag.

``open_mailbox`` is the one way the three fronts (api.php, the User API and
the web page) create an address: abuse limit, live-mailbox cap, then the
username rules, each refusal a ``MailboxError`` with its text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable, NamedTuple, Optional

from flask import current_app
from sqlalchemy import and_, bindparam, select

import clock
import database
import limits
from models import Domain, Mailbox, MailboxError, cfg, check_username, db

MAX_TAG = 64


class DeliveryError(Exception):
    """A message was refused; ``smtp_reply`` and ``exit_code`` say how to tell the sender."""

    smtp_code = "451 4.3.0"
    exit_code = 75  # EX_TEMPFAIL
    reason = "error"  # the metrics label: a short fixed word per class

    def __init__(self, detail: str = ""):
        super().__init__(detail)
        self.detail = detail

    @property
    def smtp_reply(self) -> str:
        """The reply line. A sender's address quoted in it may hold anything:
        the SMTP channel escapes what its session cannot send (smtpserver)."""
        return f"{self.smtp_code} {self.detail or self.__doc__.strip().splitlines()[0]}"

    @property
    def permanent(self) -> bool:
        return self.smtp_code.startswith("5")


class UnknownRecipient(DeliveryError):
    """User unknown"""
    smtp_code, exit_code, reason = "550 5.1.1", 67, "user_unknown"  # EX_NOUSER


class RelayDenied(DeliveryError):
    """Relay access denied"""
    smtp_code, exit_code, reason = "550 5.7.1", 67, "relay_denied"


class TooLarge(DeliveryError):
    """Message size exceeds fixed maximum message size"""
    smtp_code, exit_code, reason = "552 5.3.4", 65, "too_big"  # EX_DATAERR


class StoreFailed(DeliveryError):
    """Temporary failure storing the message, try again later"""
    smtp_code, exit_code = "451 4.3.0", 75


class NoRoom(DeliveryError):
    """Insufficient system storage, try again later"""
    smtp_code, exit_code, reason = "452 4.3.1", 75, "no_room"


class MailboxCap(DeliveryError):
    """Too many live mailboxes, try again later"""
    # Temporary: mailboxes expire, so the sender's retry can succeed.
    smtp_code, exit_code, reason = "452 4.3.1", 75, "mailbox_cap"


# --------------------------------------------------------------------------
# recipients

@dataclass(frozen=True)
class Recipient:
    """An envelope recipient as the policy reads it."""
    given: str
    local: str  # lower-case, without the +tag
    domain: str
    tag: Optional[str]

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"


def parse_recipient(given: str) -> Recipient:
    """Split an envelope address: lower-cased, brackets gone, ``+tag`` apart."""
    addr = (given or "").strip().strip("<>").strip()
    local, _, domain = addr.rpartition("@")
    local, plus, tag = local.partition("+")
    # Lower-case only what is ASCII: Unicode case folding would turn a KELVIN
    # SIGN into "k" and let a look-alike name reach someone else's mailbox.
    local = local.lower() if local.isascii() else local
    tag = tag.lower() if tag.isascii() else tag
    return Recipient(given, local, domain.lower(), tag[:MAX_TAG] if plus and tag else None)


def decide(rcpt: Recipient, domain_known: bool, expires_at: Optional[datetime],
           cap_reached: Callable[[], bool] = limits.mailbox_cap_reached) -> str:
    """The one decision: ``"live"`` (its mailbox takes the mail) or
    ``"create"`` (catch-all will make it); raises RelayDenied for a domain
    that is not ours, MailboxCap when a new address would pass the
    live-mailbox cap (``cap_reached``), UnknownRecipient for anyone else."""
    if not rcpt.local or not domain_known:
        raise RelayDenied(f"<{rcpt.given}>: Relay access denied")
    if expires_at is not None and expires_at > clock.now():
        return "live"
    if cfg("catch_all"):
        try:
            check_username(rcpt.local)
        except MailboxError:
            pass  # reserved names and what /generate refuses stay unknown
        else:
            # The live-mailbox cap holds for catch-all addresses as for
            # /generate (open_mailbox): else mail to random names at a
            # catch-all domain would grow the tables past it.
            if cap_reached():
                raise MailboxCap(f"<{rcpt.given}>: Too many live mailboxes, try again later")
            return "create"
    raise UnknownRecipient(f"<{rcpt.given}>: Recipient address rejected: User unknown")


LIVE_RCPT_SECONDS = 1.0  # how long a "live" answer at RCPT is reused
LIVE_RCPT_ENTRIES = 10_000


def check_recipient(given: str) -> Recipient:
    """RCPT time: decide on one short connection (read only), so a mailbox the
    web app created a moment ago is seen. Raises like ``decide``.

    A "live" answer is reused for up to a second (never past the mailbox's
    expiry): a client sending many messages to one mailbox costs one look-up
    a second, not one per RCPT. Refusals are never reused, and delivery
    decides again in its own transaction (``mailboxes_for``): mail to a
    mailbox deleted within that second is refused after DATA instead."""
    rcpt = parse_recipient(given)
    live = current_app.extensions.setdefault("tempmail_live_rcpt", {})
    until, expires_at = live.get(rcpt.address, (0.0, None))
    if until > time.monotonic() and expires_at > clock.now():
        return rcpt
    with db.engine.connect() as conn:
        row = conn.execute(RCPT_CHECK, {"address": rcpt.address, "domain": rcpt.domain}).first()
        # Read-only here (the I/O thread must never wait for a write lock):
        # delivery checks the cap again as a creator, exactly.
        verdict = decide(rcpt, row is not None, row[1] if row is not None else None,
                         cap_reached=lambda: limits.mailbox_cap_reached(conn))
    if verdict == "live":
        if len(live) >= LIVE_RCPT_ENTRIES:
            live.clear()
        live[rcpt.address] = (time.monotonic() + LIVE_RCPT_SECONDS, row[1])
    return rcpt


_boxes, _domains = Mailbox.__table__, Domain.__table__
# Built once: it runs for every RCPT, on the daemon's I/O thread.
RCPT_CHECK = select(_domains.c.id, select(_boxes.c.expires_at).where(_boxes.c.address == bindparam("address"))
                    .scalar_subquery()).where(_domains.c.name == bindparam("domain"), _domains.c.active.is_(True))
DELIVERY_TYPES = ("free", "premium")  # the domains whose mail is stored


def domains_and_boxes(count: int):
    """Every active domain (one row each, with no mailbox) and, joined to its
    domain, each mailbox of ``count`` addresses (``address_<i>``): a batch's
    recipients in one statement (for ``database.prepared``)."""
    return select(_domains.c.name, _boxes.c.id, _boxes.c.address, _boxes.c.expires_at,
                  _boxes.c.user_id).select_from(_domains.outerjoin(_boxes, and_(
                      _boxes.c.domain_id == _domains.c.id,
                      _boxes.c.address.in_([bindparam(f"address_{i}", type_=_boxes.c.address.type)
                                            for i in range(count)])))).where(
        _domains.c.active.is_(True), _domains.c.type.in_(list(DELIVERY_TYPES)))


class BoxRow(NamedTuple):
    """A mailbox as delivery reads it (the columns of BOXES_BY_ADDRESS)."""
    id: int
    address: str
    expires_at: Optional[datetime]
    user_id: Optional[int]


BOXES_BY_ADDRESS = select(_boxes.c.id, _boxes.c.address, _boxes.c.expires_at, _boxes.c.user_id).where(
    _boxes.c.address.in_(bindparam("addresses", expanding=True)))


@dataclass
class Lookups:
    """What a delivery batch learnt about domains and mailboxes (one
    transaction, a few milliseconds: safe to remember)."""
    domains: Optional[set] = None
    boxes: Optional[dict] = None
    absent: set = field(default_factory=set)  # addresses looked up that have no mailbox
    created: int = 0  # catch-all mailboxes made (the stats count them at commit)


def look_up(recipients: Iterable[str], known: Lookups) -> None:
    """Learn, in one statement, the active domains and the mailboxes of
    ``recipients`` (the daemon: every recipient of a batch, before its first
    delivery), so ``mailboxes_for`` needs no query of its own for them."""
    addresses = list(dict.fromkeys(parse_recipient(given).address for given in recipients))
    # On the raw connection, compiled once per number of addresses: the
    # SQLAlchemy execution path cost more than the statement.
    rows = database.prepared(domains_and_boxes, len(addresses)).rows(
        database.raw_cursor(), **{f"address_{i}": address for i, address in enumerate(addresses)})
    expires = database.result_processor(_boxes.c.expires_at.type)
    known.domains = {row[0] for row in rows}
    known.boxes = {row[2]: BoxRow(row[1], row[2], expires(row[3]) if expires else row[3], row[4])
                   for row in rows if row[1] is not None}
    # Looked up and absent (a catch-all address not made yet): not asked again.
    known.absent = {address for address in addresses if address not in known.boxes}


def mailboxes_for(recipients: Iterable[str], known: Lookups) -> list[tuple[Mailbox, Optional[str]]]:
    """Delivery time: the distinct ``(mailbox, tag)`` pairs of ``recipients``,
    catch-all mailboxes created (added and flushed, committed with the mail).
    A mailbox is a ``BoxRow`` (``look_up``, ``_load_boxes``), or the new
    ``Mailbox`` of a catch-all.
    Raises UnknownRecipient, RelayDenied or MailboxCap when no recipient is
    accepted."""
    if known.domains is None:
        known.domains, known.boxes = set(Domain.active_names(DELIVERY_TYPES)), {}
    rcpts = [parse_recipient(given) for given in recipients]
    _load_boxes([r.address for r in rcpts if r.domain in known.domains], known)
    found: dict = {}
    refusal: Optional[DeliveryError] = None
    for rcpt in rcpts:
        box = known.boxes.get(rcpt.address)
        try:
            verdict = decide(rcpt, rcpt.domain in known.domains, box.expires_at if box else None)
        except DeliveryError as exc:
            refusal = _worse(refusal, exc)
            continue
        if verdict == "create":
            box = known.boxes[rcpt.address] = catch_all_mailbox(rcpt)
            known.created += 1
        found.setdefault((box.id, rcpt.tag), (box, rcpt.tag))
    if not found:
        raise refusal or UnknownRecipient("Recipient address rejected: User unknown")
    return list(found.values())


def _worse(kept: Optional[DeliveryError], new: DeliveryError) -> DeliveryError:
    """The refusal a message with no accepted recipient gets: a temporary one
    first (its sender retries, and the capped recipient may then succeed),
    else "user unknown" before "relay denied"."""
    if kept is None:
        return new
    if kept.permanent != new.permanent:
        return kept if not kept.permanent else new
    return kept if isinstance(kept, UnknownRecipient) else new


def _load_boxes(addresses: list[str], known: Lookups) -> None:
    """The mailboxes of ``addresses`` not looked up yet, as ``BoxRow``s: a
    Core statement built once, in the batch's transaction.
    Loading ORM objects (with the domain each joins) cost a third of the
    daemon's fixed cost per batch (bench/README.md, session 4)."""
    missing = [a for a in dict.fromkeys(addresses) if a not in known.boxes and a not in known.absent]
    if missing:
        rows = db.session.connection().execute(BOXES_BY_ADDRESS, {"addresses": missing})
        known.boxes.update((row.address, BoxRow(*row)) for row in rows)  # one shape, as look_up's


def catch_all_mailbox(rcpt: Recipient) -> Mailbox:
    """A new catch-all mailbox, built exactly as ``/generate`` builds one."""
    box = Mailbox.build(rcpt.local, Domain.by_name(rcpt.domain), int(cfg("mailbox_lifetime_seconds")),
                        "catch-all")
    db.session.flush()
    return box


# --------------------------------------------------------------------------
# opening a mailbox from a front

def open_mailbox(origin: str, domain: Domain, username: Optional[str], lifetime: int, client: str,
                 limit: Optional[str] = "mailbox_create", **owner) -> Mailbox:
    """Create a live mailbox for one of the fronts (``origin``), random when
    ``username`` is None; ``owner`` is ``user_id=`` or ``session_id=``.
    Refusals, in this order, each a MailboxError: the per-client abuse
    limit ``limit`` (``rate_limited``), the live-mailbox cap (``full``),
    then the username rules (``invalid``, ``reserved``, ``taken``)."""
    wait = limits.take(limit, client or "-") if limit else 0
    if wait:
        raise MailboxError("rate_limited", wait)
    if limits.mailbox_cap_reached():
        raise MailboxError("full", 60)
    return Mailbox.create(username, domain, lifetime, origin, **owner)
