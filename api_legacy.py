"""API 1: the PHP ``api.php`` TempMail API, route for route.

Mounted twice: under ``/api.php/`` and at the site root, because the PHP
original was reached both as ``/api.php/generate`` (PATH_INFO) and through
rewrite rules as ``/generate``. Errors carry an ``error`` key as the PHP script
printed them; some also carry ``success: false`` and some do not, exactly as in
the original documentation.

api.php has no authentication (as in the original), so it only ever shows
mailboxes made through it: ``/generate`` and catch-all mail. A mailbox of a
User API key or of a browser session answers exactly like one that never
existed. ``legacy_api.enabled: false`` turns the whole API off.
"""
from __future__ import annotations

import re
from urllib.parse import unquote

from flask import Blueprint, Flask, abort, jsonify, make_response, request
from sqlalchemy import BigInteger, Integer, bindparam, func, select, update
from werkzeug.exceptions import HTTPException

import apierrors
import clock
import hotpath
import idgen
import listingcache
import mailevents
import models
import storage
from mailpolicy import open_mailbox
from models import LEGACY_ORIGINS, Attachment, Domain, Mailbox, MailboxError, Message, Stat, db

bp = Blueprint("legacy", __name__)
ROUTES = r"(generate|inbox/.*|email/.*|stats|domains|uploads/attachments/.*)"
PATHS = rf"^/(api\.php/.*|{ROUTES})$"
_OWNED = re.compile(rf"^/(api\.php(/.*)?|{ROUTES})$", re.DOTALL)
# /generate's refusals: the PHP original's codes, plus the abuse limits.
STATUS = {"taken": 409, "rate_limited": 429, "full": 503}
MAX_WAIT = 60  # seconds a ?wait= may hold an inbox request


def fail(status: int, message: str):
    """The ``{"success": false, "error": ...}`` shape of generate's errors."""
    return jsonify(success=False, error=message), status


def json_abort(status: int, **body):
    """Stop the request with a JSON body (used from helpers below the views)."""
    abort(make_response(jsonify(body), status))


def config_not_found():
    # The PHP script answered this when config.php was missing; here it means
    # no Free domain is configured, the one thing generate cannot do without.
    return jsonify(error="Config not found"), 500


# --------------------------------------------------------------------------
# errors: the PHP script's shapes, never an HTML page

def owns(path: str) -> bool:
    """True for the paths this API answers (its routes, mounted twice)."""
    return bool(_OWNED.match(path))


def http_error(exc: HTTPException):
    """404 and 405 as the PHP script printed them; other HTTP errors alike."""
    if exc.code == 404:
        path = request.path[len("/api.php"):] if request.path.startswith("/api.php") else request.path
        return jsonify(error=f"Invalid endpoint: {path or '/'}"), 404
    if exc.code == 405:
        return jsonify(error="Method not allowed"), 405
    return jsonify(error=exc.name), exc.code or 500


def server_error():
    return jsonify(error="Internal server error"), 500


apierrors.own_errors(bp, http_error, server_error)


# --------------------------------------------------------------------------
# routes

@bp.get("/generate")
def generate():
    free = Domain.active_names(("free",))
    if not free:
        return config_not_found()
    wanted = request.args.get("domain")
    domain = Domain.by_name(wanted) if wanted else Domain.by_name(free[0])
    if domain is None or domain.type != "free":
        return fail(400, MailboxError("domain").message)
    username = request.args.get("username")
    if username is not None and username.strip() == "":
        username = None  # PHP's empty($_GET['username']) meant "random"
    try:
        box = open_mailbox("api.php", domain, username, int(models.cfg("mailbox_lifetime_seconds")),
                           request.remote_addr)
    except MailboxError as exc:
        resp = make_response(*fail(STATUS.get(exc.code, 400), exc.message))
        if exc.retry_after:
            resp.headers["Retry-After"] = str(exc.retry_after)
        return resp
    return jsonify(success=True, email=box.address, username=box.username,
                   domain=box.domain.name, expires_at=clock.fmt_local(box.expires_at))


def int_arg(name: str, default: int | None, maximum: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    # isdigit() alone lets "²" and 5,000-digit numbers through to int(), which raise.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12 or int(raw) > maximum:
        json_abort(400, success=False, error=f"Invalid {name}. Use a whole number from 0 to {maximum}.")
    return int(raw)


@bp.get("/inbox/<path:email>")
def inbox(email: str):
    # Flask has already decoded %40 once; some clients encode twice.
    address = unquote(email) if "%" in email else email
    box = live_mailbox_row(address)
    if box is None:
        return jsonify(error="Email not found", searched_for=address,
                       hint="Generate this email first via /generate endpoint"), 404
    limit = int_arg("limit", None, 1000)
    offset = int_arg("offset", 0, 10**9)
    wait = int_arg("wait", 0, MAX_WAIT)
    since = since_arg()
    if wait:
        hold_for_mail(box.id, since, wait)
        box = live_mailbox_row(address)  # it may have expired or gone meanwhile
        if box is None:
            return jsonify(error="Email not found", searched_for=address,
                           hint="Generate this email first via /generate endpoint"), 404
    kept, key = listingcache.cache(), ("inbox", box.id, box.address, box.created_at, box.expires_at, limit, offset)
    body = kept.get(key, inbox_fingerprint(box.id, limit, offset)) if kept is not None else None
    if body is None:
        response, fingerprint = inbox_answer(box, limit, offset)
        body = response.get_data()
        if kept is not None:
            kept.put(key, fingerprint, body)
    else:
        response = listingcache.json_response(body)
    hotpath.accept(request.environ, request.url_rule.rule)
    return conditional(response, body)


def conditional(response, body: bytes):
    """The inbox with an ETag, and 304 Not Modified (no body) to a poller
    whose ``If-None-Match`` names the same answer: api.php has no quota, so
    an unchanged poll may cost nothing. (The User API keeps answering 200:
    there every 2xx counts, and a 304 would make polling free of quota.)"""
    etag = listingcache.etag_of(body)
    response.set_etag(etag)
    if request.if_none_match.contains(etag):
        # werkzeug sends a 304 without its body and entity headers
        # (make_conditional would add a Date header beside gunicorn's own)
        response.status_code = 304
    return response


def inbox_fingerprint(mailbox_id: int, limit: int | None, offset: int) -> tuple:
    """What of the mailbox's messages can change (see listingcache), with the
    total of a paged listing: equal fingerprints, equal answers."""
    conn = db.session.connection()
    params = {"mailbox_id": mailbox_id, "offset": offset, "limit": limit}
    marks = listingcache.marks(conn.execute(INBOX_MARKS if limit is None else INBOX_MARKS_PAGE, params))
    paged = limit is not None or offset != 0
    return marks + ((conn.scalar(INBOX_COUNT, params) or 0,) if paged else ())


def inbox_answer(box, limit: int | None, offset: int):
    """The inbox JSON answer and the fingerprint of the rows it was built from."""
    # Only the summary columns, as plain rows, from statements built once
    # and run as Core: whole Message objects (bodies included), then building
    # and caching the statement per request were most of the cost.
    conn = db.session.connection()
    params = {"mailbox_id": box.id, "offset": offset}
    if limit is None:
        rows = conn.execute(INBOX_ALL, params).all()  # one fetchall, not a fetchone per row
    else:
        rows = conn.execute(INBOX_PAGE, dict(params, limit=limit)).all()
    zone = clock.local_zone()  # once, not once per message
    shown = idgen.expose_many([row.id for row in rows], "messages")
    emails = [{"id": shown_id, "from_email": row.from_email,
               "from_name": row.from_name, "subject": row.subject,
               "is_read": int(row.is_read),  # PHP/MySQL TINYINT
               "received_at": clock.fmt_local(row.received_at, zone)}
              for shown_id, row in zip(shown, rows)]
    # Unpaged, the list is the whole mailbox (same transaction): no COUNT needed.
    paged = limit is not None or offset != 0
    total = (conn.scalar(INBOX_COUNT, params) or 0) if paged else len(emails)
    response = jsonify(success=True, email=box.address, created_at=clock.fmt_local(box.created_at, zone),
                       expires_at=clock.fmt_local(box.expires_at, zone), total=total, emails=emails)
    return response, listingcache.fingerprint(rows) + ((total,) if paged else ())


def since_arg() -> int:
    """``since``: the api.php id of a message; waiting then wants a message
    newer than that one, i.e. with a greater internal id (the shown ids are
    a keyed permutation, so their order says nothing). Absent or 0: any."""
    raw = request.args.get("since")
    if raw is None or raw == "":
        return 0
    shown = idgen.parse_shown_id(raw)
    if shown is None:
        json_abort(400, success=False, error="Invalid since. Use the id of a message from this inbox.")
    return idgen.unexpose(shown, "messages") if shown else 0


def hold_for_mail(mailbox_id: int, since: int, seconds: int) -> None:
    """Hold the request until the mailbox has a message above internal id
    ``since`` or ``seconds`` pass (then the inbox answers as usual)."""
    def newer() -> bool:
        params = {"mailbox_id": mailbox_id, "since": since}
        return db.session.connection().execute(INBOX_NEWER, params).first() is not None
    try:
        mailevents.hold_until(mailbox_id, newer, seconds)
    except mailevents.Busy:
        resp = make_response(jsonify(success=False, error="Too many waiting requests. Try again in a moment."), 503)
        resp.headers["Retry-After"] = "1"
        abort(resp)


_messages = Message.__table__
# ``since`` as BIGINT: the id behind a shown id may be far above any row
# (and above PostgreSQL's INTEGER), which simply means "nothing newer yet".
INBOX_NEWER = (select(_messages.c.id).where(_messages.c.mailbox_id == bindparam("mailbox_id"),
                                            _messages.c.id > bindparam("since", type_=BigInteger)).limit(1))
INBOX_ALL = (select(_messages.c.id, _messages.c.public_id, _messages.c.from_email, _messages.c.from_name,
                    _messages.c.subject, _messages.c.is_read, _messages.c.revision, _messages.c.received_at)
             .where(_messages.c.mailbox_id == bindparam("mailbox_id")).order_by(_messages.c.id)
             .offset(bindparam("offset", type_=Integer)))
INBOX_PAGE = INBOX_ALL.limit(bindparam("limit", type_=Integer))
# The fingerprint of a listing (listingcache): the same rows, four narrow columns.
INBOX_MARKS = (select(_messages.c.id, _messages.c.public_id, _messages.c.is_read, _messages.c.revision)
               .where(_messages.c.mailbox_id == bindparam("mailbox_id")).order_by(_messages.c.id)
               .offset(bindparam("offset", type_=Integer)))
INBOX_MARKS_PAGE = INBOX_MARKS.limit(bindparam("limit", type_=Integer))
INBOX_COUNT = (select(func.count()).select_from(_messages)
               .where(_messages.c.mailbox_id == bindparam("mailbox_id")))
_mailboxes = Mailbox.__table__
# What api.php may show: a live mailbox made through it (``now`` bound per
# request). Every statement below that finds a mailbox or a message applies
# exactly this, the views' and the kept answers' (hotpath) alike.
LIVE_LEGACY_BOX = (_mailboxes.c.origin.in_(LEGACY_ORIGINS),
                   _mailboxes.c.expires_at > bindparam("now", type_=_mailboxes.c.expires_at.type))
INBOX_BOX = (select(_mailboxes.c.id, _mailboxes.c.address, _mailboxes.c.created_at, _mailboxes.c.expires_at)
             .where(_mailboxes.c.address == bindparam("address"), *LIVE_LEGACY_BOX))


def live_mailbox_row(address: str):
    """The live api.php mailbox ``address`` as a plain row of the four columns
    the inbox shows (no ORM object, no joined domain), or None."""
    address = (address or "").strip().lower()
    if not models.plausible(address, 320):
        return None
    return db.session.connection().execute(INBOX_BOX, {"address": address, "now": clock.now()}).first()


def live_message(raw_id: str) -> Message:
    """The message api.php calls ``raw_id``, in a live api.php mailbox, else a 404."""
    msg = Message.by_legacy_id(raw_id)
    if msg is None:
        json_abort(404, error="Email not found")
    return msg


def message_json(msg, is_read: bool | None = None) -> dict:
    """api.php's message object (``GET /email/{id}``) of a ``Message`` or a row
    with its columns; ``is_read`` overrides the stored flag (just marked)."""
    read = msg.is_read if is_read is None else is_read
    return {"id": idgen.expose(msg.id, "messages"), "email_address_id": idgen.expose(msg.mailbox_id, "mailboxes"),
            "from_email": msg.from_email, "from_name": msg.from_name, "subject": msg.subject,
            "body_text": msg.body_text, "body_html": msg.body_html, "is_read": int(read),
            "received_at": clock.fmt_local(msg.received_at)}


def attachment_json(att) -> dict:
    """An attachment (``Attachment`` or a row with id, filename, size, content_type)."""
    return {"id": idgen.expose(att.id, "attachments"), "filename": att.filename, "size": att.size,
            "content_type": att.content_type, "file_path": Attachment.legacy_url_of(att.id, att.filename)}


_att = Attachment.__table__
# The shown message's fields (EMAIL_HEAD has decided it may be shown).
EMAIL_ROW = (select(_messages.c.id, _messages.c.mailbox_id, _messages.c.from_email, _messages.c.from_name,
                    _messages.c.subject, _messages.c.body_text, _messages.c.body_html, _messages.c.is_read,
                    _messages.c.received_at)
             .where(_messages.c.id == bindparam("msg_row")))
# The message if it may be shown, without its bodies: what can change of it
# (whether it must be marked read, its revision), also the kept answer's
# validator (hot_email_validator).
EMAIL_HEAD = (select(_messages.c.id, _messages.c.public_id, _messages.c.is_read, _messages.c.revision)
              .join_from(_messages, _mailboxes, _mailboxes.c.id == _messages.c.mailbox_id)
              .where(_messages.c.id == bindparam("msg_row"), *LIVE_LEGACY_BOX))
EMAIL_ATTACHMENTS = (select(_att.c.id, _att.c.filename, _att.c.size, _att.c.content_type)
                     .where(_att.c.message_id == bindparam("msg_row")).order_by(_att.c.id))
EMAIL_MARK_READ = (update(_messages).where(_messages.c.id == bindparam("msg_row"))
                   .values(is_read=True))


@bp.get("/email/<raw_id>")
def email_detail(raw_id: str):
    # Plain rows from statements built once (whether it may be shown, its
    # fields, its attachments): three ORM loads (message, lazy mailbox, lazy
    # attachments) were most of this route's cost.
    row_id = idgen.row_id_of(raw_id, "messages")
    conn = db.session.connection()
    head = conn.execute(EMAIL_HEAD, {"msg_row": row_id, "now": clock.now()}).first() if row_id is not None else None
    if head is None:
        return jsonify(error="Email not found"), 404
    # The answer shows only what never changes (the read flag is always 1
    # here), so a worker that built it once sends it again for as long as
    # the message is there: the key holds its random public id too.
    kept, key = listingcache.cache(), ("email", head.id, head.public_id, head.revision)
    body = kept.get(key, ()) if kept is not None else None
    if body is not None:
        response = listingcache.json_response(body)
    else:
        msg = conn.execute(EMAIL_ROW, {"msg_row": head.id}).first()
        if msg is None:  # deleted between the two statements
            return jsonify(error="Email not found"), 404
        attachments = conn.execute(EMAIL_ATTACHMENTS, {"msg_row": msg.id}).all()
        response = jsonify(success=True, email=message_json(msg, is_read=True),
                           attachments=[attachment_json(a) for a in attachments])
        if kept is not None:
            kept.put(key, (), response.get_data())
    if not head.is_read:
        conn.execute(EMAIL_MARK_READ, {"msg_row": head.id})  # 0 rows if deleted meanwhile: fine
        db.session.commit()
    hotpath.accept(request.environ, request.url_rule.rule)
    return response


@bp.delete("/email/<raw_id>")
def email_delete(raw_id: str):
    msg = live_message(raw_id)
    storage.commit_removal(msg.delete())
    # The PHP script echoed $_GET's id back, so it is a string.
    return jsonify(success=True, deleted_id=str(msg.legacy_id))


@bp.get("/stats")
def stats():
    return jsonify(success=True, stats=Stat.snapshot())


@bp.get("/domains")
def domains():
    names = Domain.active_names(("free",))
    if not names:
        return config_not_found()
    return jsonify(success=True, domains=names)


@bp.get("/uploads/attachments/<raw_id>/<path:name>")
def attachment_file(raw_id: str, name: str):
    """Download an attachment; the name in the URL is cosmetic, the id decides."""
    att = Attachment.by_legacy_id(raw_id)
    if att is None:
        return jsonify(error="Attachment not found"), 404
    return send_attachment(att)


def send_attachment(att: Attachment):
    """An attachment's bytes as a download that no browser renders inline."""
    resp = storage.download_attachment(att)
    if resp is None:
        json_abort(404, error="Attachment file missing")
    return resp


# --------------------------------------------------------------------------
# the hot routes (hotpath.py): the inbox and a read message, answered again
# below Flask while their rows are unchanged

# The mount (``/api.php`` or the root) is part of the key: the answers are
# the same, but each is counted under its own URL rule.
_HOT_INBOX = re.compile(r"(/api\.php)?/inbox/([^/%]+)")
_HOT_EMAIL = re.compile(r"(/api\.php)?/email/([^/%]+)")
# INBOX_BOX and the inbox's fingerprint (INBOX_MARKS) in one statement and
# one row: the live api.php mailbox and its messages' changeable columns.
HOT_INBOX = (select(_mailboxes.c.id, _mailboxes.c.created_at, _mailboxes.c.expires_at, hotpath.marks(_messages))
             .select_from(_mailboxes.outerjoin(_messages, _messages.c.mailbox_id == _mailboxes.c.id))
             .where(_mailboxes.c.address == bindparam("address"), *LIVE_LEGACY_BOX)
             .group_by(_mailboxes.c.id, _mailboxes.c.created_at, _mailboxes.c.expires_at))


def hot_inbox_key(environ: dict) -> tuple | None:
    """A plain ``GET /inbox/{email}`` (no paging, waiting or percent sign)."""
    found = None if environ.get("QUERY_STRING") else _HOT_INBOX.fullmatch(environ.get("PATH_INFO", ""))
    address = found.group(2).strip().lower() if found is not None else ""
    if not (address.isascii() and models.plausible(address, 320)):
        return None
    return (address, found.group(1)) + hotpath.request_shape(environ)


def hot_inbox_validator(run, key: tuple) -> tuple | None:
    return tuple(run(HOT_INBOX, address=key[0], now=clock.now())) or None


def hot_email_key(environ: dict) -> tuple | None:
    """A plain ``GET /email/{id}`` of a plausible api.php id."""
    found = None if environ.get("QUERY_STRING") else _HOT_EMAIL.fullmatch(environ.get("PATH_INFO", ""))
    row_id = idgen.row_id_of(found.group(2), "messages") if found is not None else None
    return None if row_id is None else (row_id, found.group(1)) + hotpath.request_shape(environ)


def hot_email_validator(run, key: tuple) -> tuple | None:
    """Only a message already read: the first read must go through Flask,
    which marks it read."""
    rows = run(EMAIL_HEAD, msg_row=key[0], now=clock.now())
    return tuple(rows) if rows and rows[0][2] else None


def init_app(app: Flask) -> None:
    """Mount api.php at ``/api.php/`` and at the root, unless ``legacy_api.enabled``
    is false: then every api.php path answers 404 ``Invalid endpoint``."""
    if not app.config["TEMPMAIL"]["legacy_api"]["enabled"]:
        return
    app.register_blueprint(bp, url_prefix="/api.php", name="legacy_php")
    app.register_blueprint(bp, name="legacy")
    hotpath.register(app, hotpath.HotRoute("legacy.inbox", hot_inbox_key, hot_inbox_validator))
    hotpath.register(app, hotpath.HotRoute("legacy.email", hot_email_key, hot_email_validator))
