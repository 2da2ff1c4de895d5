"""API 2: the Bearer-key User API (seed 000), mounted at ``/api``.

Every request names a personal API key (``Authorization: Bearer tm_...``). The
key's user owns the mailboxes it creates; a mailbox, message or attachment of
anyone else answers 404 exactly like a missing one. Each response to a request
with a valid key carries the month's quota in ``X-RateLimit-*`` headers: one
unit is reserved atomically before the view runs and refunded unless the
answer is a 2xx (``count_quota``), so only 2xx answers count, exactly, even
under concurrent requests. Errors are always ``{"status": false, "message": ...}``.
"""
from __future__ import annotations

import logging
import math
import re
from datetime import datetime, timezone
from urllib.parse import quote, unquote_plus

from flask import Blueprint, Flask, g, jsonify, request
from sqlalchemy import bindparam, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import selectinload
from werkzeug.exceptions import HTTPException

import apierrors
import clock
import extract
import hotpath
import idgen
import limits
import listingcache
import livefeed
import mailevents
import models
import storage
from mailpolicy import open_mailbox
from models import ApiKey, Attachment, Domain, Mailbox, MailboxError, Message, User, db

bp = Blueprint("api_v1", __name__)
log = logging.getLogger("tempmail.api")

DOMAIN_TYPES = ("free", "premium")
MAX_WAIT = 60  # seconds a ?wait= may hold a listing
BUSY = "Too many waiting requests. Try again in a moment."
HTTP_MESSAGES = {400: "Bad request.", 401: "Unauthenticated.", 403: "Forbidden.",
                 404: "Not found.", 405: "Method not allowed.", 413: "Request too large.",
                 415: "Unsupported media type.", 422: "Invalid input.",
                 429: "Too many requests.", 500: "Internal server error.", 503: "Service unavailable."}


class ApiError(Exception):
    """An error answer of the User API: ``{"status": false, "message": ...}``."""

    def __init__(self, status: int, message: str, retry_after: int = 0):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def fail(status: int, message: str):
    response = jsonify(status=False, message=message)
    response.status_code = status
    return response


# --------------------------------------------------------------------------
# authentication and quota (run for every request under /api/)

def is_v1_request() -> bool:
    """Requests this API answers: its own routes, and unmatched paths under /api/
    (so an unknown route with a valid key still carries the quota headers)."""
    if not request.path.startswith("/api/"):
        return False
    return request.blueprint == bp.name or request.url_rule is None


def authenticate():
    """Find the key's user and reserve one unit of its quota before the view
    runs (refused with 429 when none is left); ``count_quota`` refunds it
    when the answer is not a 2xx. CORS preflights carry no key and pass."""
    if request.method == "OPTIONS" or not is_v1_request():
        return None
    auth = request.authorization
    if auth is None or auth.type != "bearer" or not auth.token:
        return unauthorized("Unauthenticated. Send your API key as 'Authorization: Bearer <key>'.")
    key = ApiKey.lookup(auth.token)
    if key is None:
        return unauthorized("Invalid or revoked API key.")
    reservation, used = limits.reserve_quota(key.user)
    g.v1_user, g.v1_key_id = key.user, key.id
    g.v1_reserved = reservation is not None
    g.v1_quota = reservation or limits.QuotaReservation(key.user_id, "", limits.quota_limit(key.user), used)
    if reservation is None:
        reset = clock.next_month_start()
        response = fail(429, f"Monthly request quota exhausted. It resets at {reset.isoformat()}.")
        response.headers["Retry-After"] = str(seconds_until(reset))
        return response
    return None


def unauthorized(message: str):
    response = fail(401, message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="TempMail User API"'
    return response


def seconds_until(moment: datetime) -> int:
    now = clock.now().replace(tzinfo=timezone.utc)
    return max(1, math.ceil((moment - now).total_seconds()))


def count_quota(response):
    """Refund the reserved unit unless the answer is a 2xx (once: the state is
    popped, because Flask runs this again for the error answer if anything
    here raised), and add the quota headers."""
    quota = g.pop("v1_quota", None)
    if quota is None:
        return response
    if g.pop("v1_reserved", False) and not 200 <= response.status_code < 300:
        try:
            quota.refund()
        except SQLAlchemyError:
            db.session.rollback()
            log.exception("could not refund a User API request of user %s", quota.user_id)
    response.headers.update(quota_headers(quota.limit, quota.used))
    return response


QUOTA_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Used", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def quota_headers(limit: int, used: int) -> list[tuple[str, str]]:
    """The quota headers every User API answer with a valid key carries."""
    return list(zip(QUOTA_HEADERS, (str(limit), str(used), str(max(0, limit - used)),
                                    clock.next_month_start().isoformat())))


# --------------------------------------------------------------------------
# errors: JSON in one shape, never an HTML page or a traceback

def http_error(exc: HTTPException):
    """Any HTTP error of this API (also for URLs no route matched) in its shape."""
    response = fail(exc.code or 500, HTTP_MESSAGES.get(exc.code, exc.name + "."))
    if exc.code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def server_error():
    return fail(500, HTTP_MESSAGES[500])


apierrors.own_errors(bp, http_error, server_error)


@bp.errorhandler(ApiError)
def api_error(exc: ApiError):
    response = fail(exc.status, exc.message)
    if exc.retry_after:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response



# --------------------------------------------------------------------------
# helpers of the views

def user() -> User:
    return g.v1_user


def plan_types() -> list[str]:
    return user().allowed_domain_types()


def owned_mailbox(address: str) -> Mailbox:
    box = Mailbox.find_owned(address, user().id)
    if box is None:
        raise ApiError(404, "Email not found.")
    return box


def owned_mailbox_row(address: str):
    """``owned_mailbox`` as a plain row (id, address) from a statement built
    once: the listing needs no ORM object, and building one (with its
    joined domain) was a fifth of the listing's cost."""
    address = (address or "").strip().lower()
    row = None
    if models.plausible(address, 320):
        params = {"address": address, "user_id": user().id, "now": clock.now()}
        row = db.session.connection().execute(OWNED_BOX, params).first()
    if row is None:
        raise ApiError(404, "Email not found.")
    return row


_box = Mailbox.__table__
# A mailbox the User API may show: alive (``now`` bound per request); the
# views and the kept listing (HOT_LISTING) apply this same condition.
LIVE_BOX = _box.c.expires_at > bindparam("now", type_=_box.c.expires_at.type)
OWNED_BOX = (select(_box.c.id, _box.c.address, _box.c.user_id, _box.c.expires_at)
             .where(_box.c.address == bindparam("address"), _box.c.user_id == bindparam("user_id"), LIVE_BOX))


def owned_message(public_id: str) -> Message:
    msg = Message.find_owned(public_id, user().id)
    if msg is None:
        raise ApiError(404, "Message not found.")
    return msg


def plan_domain(name: str | None) -> Domain:
    """The domain ``name`` if it exists and the plan allows its type; without a
    name, the first configured domain the plan allows."""
    if not name:
        names = Domain.active_names(plan_types())
        if not names:
            raise ApiError(403, "No domain is available for your plan.")
        name = names[0]
    domain = Domain.by_name(name)
    if domain is None:
        raise ApiError(422, "Invalid domain. Use one of the domains listed by /api/domains.")
    if domain.type not in plan_types():
        raise ApiError(403, f"Your plan does not allow {domain.type} domains.")
    return domain


def input_value(name: str) -> str | None:
    """A parameter from the query string, a JSON body or a form body."""
    body = request.get_json(silent=True) if request.is_json else None
    value = request.args.get(name)
    if value is None and isinstance(body, dict):
        value = body.get(name)
    if value is None:
        value = request.form.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(422, f"Invalid {name}.")
    return value.strip() if value else None


def base_url() -> str:
    return request.url_root.rstrip("/")


def ok(**body):
    return jsonify(status=True, **body)


# --------------------------------------------------------------------------
# routes

@bp.get("/domains")
def domains():
    requested = (request.args.get("type") or "all").strip().lower()
    allowed = plan_types()
    if requested not in DOMAIN_TYPES + ("all",):
        raise ApiError(422, "Invalid type. Use free, premium or all.")
    if requested != "all" and requested not in allowed:
        raise ApiError(403, f"Your plan does not allow {requested} domains.")
    types = allowed if requested == "all" else [requested]
    rows = db.session.scalars(select(Domain).where(
        Domain.active.is_(True), Domain.type.in_(types)).order_by(Domain.id))
    return ok(data={"requested_type": requested, "allowed_types": allowed,
                    "domains": [domain_json(d) for d in rows]})


@bp.post("/emails")
def create_email():
    domain = plan_domain(input_value("domain"))
    lifetime = int(user().plan_config().get("mailbox_lifetime_seconds") or 600)
    # A per-client-IP limit of its own (rate_limits.api_mailbox_create, off
    # unless configured): keys already meter every call through the plan's
    # quota, and one integration legitimately creates many mailboxes at once.
    try:
        box = open_mailbox("user-api", domain, None, lifetime, request.remote_addr,
                           limit="api_mailbox_create", user_id=user().id)
    except MailboxError as exc:
        raise mailbox_refusal(exc)
    return ok(data=mailbox_json(box))


def mailbox_refusal(exc: MailboxError) -> ApiError:
    """A MailboxError as this API answers it. A taken name is 422 rather than
    409: the User API's documented codes are 401/403/404/405/422/429, and
    clients branch on those."""
    if exc.code == "rate_limited":
        return ApiError(429, "Too many addresses created from your network. Try again later.",
                        exc.retry_after)
    if exc.code == "full":
        return ApiError(503, exc.message, exc.retry_after)
    return ApiError(422, exc.message)


@bp.post("/emails/<current>/<username>/<domain>")
def switch_email(current: str, username: str, domain: str):
    box = owned_mailbox(current)
    target = plan_domain(domain)
    try:
        box.rename(username, target)
    except MailboxError as exc:
        raise mailbox_refusal(exc)
    return ok(data=mailbox_json(box))


@bp.delete("/emails/<email>")
def delete_email(email: str):
    storage.commit_removal(owned_mailbox(email).delete())
    return ok(message="Email has been successfully deleted.")


def required_email() -> str:
    address = request.args.get("email", "").strip()
    if not address:
        raise ApiError(422, "The email parameter is required.")
    return address


@bp.get("/messages")
def list_messages():
    """The mailbox's messages, newest first, that pass ``from``/``subject``/``tag``;
    with ``wait``, first held until one newer than ``since`` passes them."""
    address = required_email()
    box = owned_mailbox_row(address)
    filt, since, wait = message_filter(), since_arg(box), wait_arg()
    if wait:
        wait_for_mail(box.id, since, filt, wait)
        box = owned_mailbox_row(address)  # it may have expired or been deleted meanwhile
    base, kept = base_url(), listingcache.cache()
    key = ("v1", box.id, box.address, base, filt.sender, filt.subject, filt.tag)
    if kept is not None:
        rows = db.session.connection().execute(filt.restrict(LIST_MARKS), {"mailbox_id": box.id})
        body = kept.get(key, listingcache.marks(rows))
        if body is not None:
            hotpath.accept(request.environ, request.url_rule.rule)
            return listingcache.json_response(body)
    response, fingerprint = listing_answer(box.id, box.address, filt, base)
    if kept is not None:
        kept.put(key, fingerprint, response.get_data())
    hotpath.accept(request.environ, request.url_rule.rule)
    return response


def listing_answer(mailbox_id: int, address: str, filt: livefeed.MessageFilter, base: str):
    """The listing's JSON answer and the fingerprint of the rows it was built from."""
    # Plain rows from two statements built once (the messages, newest first,
    # then all their attachments): building 50 ORM objects with their
    # attachment collections was most of this listing's cost.
    conn = db.session.connection()
    listed = conn.execute(filt.restrict(LIST_MESSAGES), {"mailbox_id": mailbox_id}).all()
    rows = [row for row in listed if filt.matches(row.from_email, row.from_name, row.subject)]
    files: dict[int, list] = {}
    if rows:
        for att in conn.execute(LIST_ATTACHMENTS, {"ids": [row.id for row in rows]}):
            files.setdefault(att.message_id, []).append(att)
    zone = clock.local_zone()
    response = ok(mailbox=address, messages=[message_json(row, base, address, files.get(row.id, []), zone)
                                             for row in rows])
    # Every row the SQL returned: the Python filters pass or drop a message
    # by fields that never change, so the same rows give the same answer.
    return response, listingcache.fingerprint(listed)


_msg, _att = Message.__table__, Attachment.__table__
LIST_MESSAGES = (select(_msg.c.id, _msg.c.public_id, _msg.c.is_read, _msg.c.revision, _msg.c.subject,
                        _msg.c.from_name, _msg.c.from_email, _msg.c.received_at, _msg.c.body_html,
                        _msg.c.body_text)
                 .where(_msg.c.mailbox_id == bindparam("mailbox_id")).order_by(_msg.c.id.desc()))
# The fingerprint of a listing (listingcache): the same rows, four narrow columns.
LIST_MARKS = (select(_msg.c.id, _msg.c.public_id, _msg.c.is_read, _msg.c.revision)
              .where(_msg.c.mailbox_id == bindparam("mailbox_id")).order_by(_msg.c.id.desc()))
LIST_ATTACHMENTS = (select(_att.c.message_id, _att.c.filename, _att.c.size)
                    .where(_att.c.message_id.in_(bindparam("ids", expanding=True))).order_by(_att.c.id))


@bp.get("/messages/stream")
def message_stream():
    """Server-Sent Events: one ``message`` event per new message (the object
    of ``GET /messages/{id}`` without ``content``). One quota unit per stream
    opened: the reservation of ``authenticate`` counts once, for the 200."""
    if not livefeed.api_origin_allowed():
        raise ApiError(403, "This origin may not read the stream (see cors_origins).")
    box = owned_mailbox(required_email())
    feed = ApiFeed(box, message_filter(), stream_start(box), base_url())
    try:
        slot = mailevents.Slot.take(int(mailevents.live_config("max_held_per_process")))
    except mailevents.Busy:
        raise ApiError(503, BUSY, 1)
    return livefeed.stream_response(feed, slot)


@bp.get("/messages/<public_id>")
def read_message(public_id: str):
    msg = owned_message(public_id)
    msg.mark_read()
    return ok(data=message_json(msg, base_url()))


@bp.get("/messages/<public_id>/extract")
def extract_message(public_id: str):
    """The one-time codes and the links of an owned message. It does not mark
    the message seen: a test harness polling for a code reads no mail."""
    msg = owned_message(public_id)
    return ok(data=extract.extract(msg.subject or "", msg.body_text or "", msg.body_html or ""))


@bp.delete("/messages/<public_id>")
def delete_message(public_id: str):
    storage.commit_removal(owned_message(public_id).delete())
    return ok(message="Message was deleted successfully.")


@bp.get("/messages/<public_id>/attachments/<path:name>")
def attachment(public_id: str, name: str):
    att = owned_message(public_id).attachment_named(name)
    resp = storage.download_attachment(att) if att is not None else None
    if resp is None:
        raise ApiError(404, "Attachment not found.")
    return resp


# --------------------------------------------------------------------------
# waiting for mail and streaming it

def wait_arg() -> int:
    raw = request.args.get("wait", "").strip()
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 3 or int(raw) > MAX_WAIT:
        raise ApiError(422, f"Invalid wait. Use a whole number of seconds from 0 to {MAX_WAIT}.")
    return int(raw)


def since_arg(box: Mailbox) -> int:
    """``since``: the id of a message of this mailbox; 0 when absent. Public
    ids are random, so "newer" is decided by the internal id behind it."""
    raw = request.args.get("since", "").strip()
    if not raw:
        return 0
    found = message_of(box, raw)
    if found is None:
        raise ApiError(422, "Invalid since. Use the id of a message of this mailbox.")
    return found


def message_of(box: Mailbox, public_id: str) -> int | None:
    """The internal id of message ``public_id`` of ``box``, or None."""
    if len(public_id) != idgen.PUBLIC_ID_LENGTH:
        return None
    return db.session.scalar(select(Message.id).where(Message.public_id == public_id,
                                                      Message.mailbox_id == box.id))


def filter_arg(name: str, limit: int) -> str:
    raw = request.args.get(name, "")
    if len(raw) > limit or "\x00" in raw:
        raise ApiError(422, f"Invalid {name}. Use at most {limit} characters.")
    return raw.strip()


def message_filter() -> livefeed.MessageFilter:
    """``from`` and ``subject`` (case-insensitive substrings), ``tag`` (exact)."""
    return livefeed.MessageFilter(sender=livefeed.fold(filter_arg("from", livefeed.MAX_FILTER)) or None,
                                  subject=livefeed.fold(filter_arg("subject", livefeed.MAX_FILTER)) or None,
                                  tag=livefeed.tag_value(filter_arg("tag", livefeed.MAX_TAG)) or None)


def wait_for_mail(mailbox_id: int, since: int, filt: livefeed.MessageFilter, seconds: int) -> None:
    """Hold the request until a message above ``since`` passes ``filt`` or
    ``seconds`` pass; each look starts where the previous one ended."""
    cursor = since

    def arrived() -> bool:
        nonlocal cursor
        found, cursor = livefeed.newer_matches(mailbox_id, cursor, filt)
        return found
    try:
        mailevents.hold_until(mailbox_id, arrived, seconds)
    except mailevents.Busy:
        raise ApiError(503, BUSY, 1)


def stream_start(box: Mailbox) -> int:
    """Where a stream starts: after the message named by ``Last-Event-ID``
    (or ``since``), else after the newest message now. A ``Last-Event-ID``
    naming no message of the mailbox (deleted meanwhile) replays the whole
    mailbox: mail seen twice rather than mail lost."""
    last = request.headers.get("Last-Event-ID", "").strip()
    if last:
        return message_of(box, last) or 0
    return since_arg(box) or livefeed.newest_id(box.id)


class ApiFeed:
    """The User API stream of one mailbox (see ``livefeed.events``)."""

    def __init__(self, box: Mailbox, filt: livefeed.MessageFilter, cursor: int, base: str):
        self.mailbox_id, self.filt, self.cursor, self.base = box.id, filt, cursor, base
        self.user_id, self.key_id = user().id, g.v1_key_id

    def next_events(self) -> tuple[str, bool]:
        rows = list(db.session.scalars(self.filt.restrict(select(Message).where(
            Message.mailbox_id == self.mailbox_id, Message.id > self.cursor)).order_by(Message.id)
            .limit(livefeed.STREAM_BATCH).options(selectinload(Message.attachments))))
        if rows:
            self.cursor = rows[-1].id
        text = "".join(livefeed.sse("message", stream_json(m, self.base), m.public_id) for m in rows
                       if self.filt.matches(m.from_email, m.from_name, m.subject))
        return text, len(rows) == livefeed.STREAM_BATCH

    def still_open(self) -> bool:
        """The mailbox is live and still this user's, and the key is not revoked."""
        key_live = select(ApiKey.id).where(ApiKey.id == self.key_id, ApiKey.revoked_at.is_(None)).exists()
        expires = db.session.scalar(select(Mailbox.expires_at).where(
            Mailbox.id == self.mailbox_id, Mailbox.user_id == self.user_id, key_live))
        return expires is not None and expires > clock.now()

    def heartbeat(self) -> str:
        return ": heartbeat\n\n"


def stream_json(msg: Message, base: str) -> dict:
    """A stream's message: ``GET /messages/{id}``'s object less the body."""
    data = message_json(msg, base)
    del data["content"]
    return data


# --------------------------------------------------------------------------
# the objects this API shows

def domain_json(domain: Domain) -> dict:
    return {"domain": domain.name, "type": domain.type.capitalize(), "custom": bool(domain.custom)}


def mailbox_json(box: Mailbox) -> dict:
    """The mailbox object of the create and switch answers."""
    return {"id": box.id, "email": box.address, "domain": box.domain.name,
            "expire_at": clock.fmt_iso(box.expires_at),
            "expires_in_seconds": max(0, int((box.expires_at - clock.now()).total_seconds())),
            "created_at": clock.fmt_iso(box.created_at), "email_token": box.email_token()}


def message_json(msg, base: str, to: str | None = None, attachments: list | None = None,
                 zone=None) -> dict:
    """The message object of a ``Message`` (or of a listing's plain row, given
    its mailbox address ``to`` and its ``attachments`` rows); ``base`` is the
    site's URL without a trailing slash."""
    has_html = bool(msg.body_html)
    if to is None:
        to = msg.mailbox.address if msg.mailbox else msg.envelope_to
    files = msg.attachments if attachments is None else attachments
    return {"is_seen": bool(msg.is_read), "subject": msg.subject,
            "from": msg.from_name or msg.from_email, "from_email": msg.from_email,
            "to": to, "receivedAt": clock.fmt_local(msg.received_at, zone), "id": msg.public_id,
            "html": has_html, "content": msg.body_html if has_html else msg.body_text,
            "attachments": [attachment_json(a, base, msg.public_id) for a in files]}


def attachment_json(att, base: str, public_id: str) -> dict:
    """An attachment (an ``Attachment`` or a row with filename and size)."""
    return {"name": att.filename, "extension": Attachment.extension_of(att.filename), "size": att.size,
            "url": f"{base}/api/messages/{public_id}/attachments/{quote(att.filename, safe='')}"}


# --------------------------------------------------------------------------
# the hot route (hotpath.py): an unfiltered listing, answered again below
# Flask while the key, the mailbox and its messages are unchanged; the
# request is still authenticated and counted each time

_HOT_QUERY = re.compile(r"email=([A-Za-z0-9._%+@-]{1,960})")
_TOKEN68 = re.compile(r"Bearer ([A-Za-z0-9._~+/-]+=*)")
_key, _user = ApiKey.__table__, User.__table__
# authenticate's key rule, owned_mailbox_row's ownership and life rules and
# the listing's rows, in one statement and one row.
HOT_LISTING = (select(_key.c.user_id, _user.c.plan, _box.c.id, hotpath.marks(_msg))
               .select_from(_key.join(_user, _user.c.id == _key.c.user_id)
                            .join(_box, _box.c.user_id == _key.c.user_id)
                            .outerjoin(_msg, _msg.c.mailbox_id == _box.c.id))
               .where(_key.c.key_hash == bindparam("key_hash"), _key.c.revoked_at.is_(None),
                      _box.c.address == bindparam("address"), LIVE_BOX)
               .group_by(_key.c.user_id, _user.c.plan, _box.c.id))


def hot_listing_key(environ: dict) -> tuple | None:
    """``GET /api/messages?email=`` alone, with a plain Bearer key."""
    if environ.get("PATH_INFO") != "/api/messages":
        return None
    query = _HOT_QUERY.fullmatch(environ.get("QUERY_STRING", ""))
    token = _TOKEN68.fullmatch(environ.get("HTTP_AUTHORIZATION", ""))
    if query is None or token is None or len(token.group(1)) > 200:
        return None
    address = unquote_plus(query.group(1)).strip().lower()
    if not (address.isascii() and models.plausible(address, 320)):
        return None
    return (ApiKey.hash(token.group(1)), address) + hotpath.request_shape(environ)


def hot_listing_validator(run, key: tuple) -> tuple | None:
    return tuple(run(HOT_LISTING, key_hash=key[0], address=key[1], now=clock.now())) or None


def hot_listing_admit(_app: Flask, validator: tuple) -> list | None:
    """Reserve the request's unit as ``authenticate`` does; None when the
    quota is spent (Flask then answers the 429)."""
    limit, used = limits.reserve_unit(validator[0][0], validator[0][1])
    return None if used is None else quota_headers(limit, used)


def init_app(app: Flask) -> None:
    """Mount the User API at /api; authentication and counting hook in app-wide
    so unmatched /api/ paths answer 401 or carry quota headers as well."""
    app.register_blueprint(bp, url_prefix="/api")
    app.before_request(authenticate)
    app.after_request(count_quota)
    hotpath.register(app, hotpath.HotRoute("v1.listing", hot_listing_key, hot_listing_validator,
                                           admit=hot_listing_admit, per_request=frozenset(h.lower() for h in QUOTA_HEADERS)))
