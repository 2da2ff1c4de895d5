"""API 1: the PHP ``api.php`` TempMail API, route for route.

Mounted twice by app.py: under ``/api.php/`` and at the site root, because the
PHP original was reached both as ``/api.php/generate`` (PATH_INFO) and through
rewrite rules as ``/generate``. Errors carry an ``error`` key as the PHP script
printed them; some also carry ``success: false`` and some do not, exactly as in
the original documentation.
"""
from __future__ import annotations

from urllib.parse import unquote

from flask import Blueprint, abort, jsonify, make_response, request, send_file
from sqlalchemy import Integer, bindparam, func, select

import models
from models import Attachment, Domain, Mailbox, MailboxError, Message, Stat, db

bp = Blueprint("legacy", __name__)



def fail(message: str, status: int):
    """The ``{"success": false, "error": ...}`` shape of generate's errors."""
    return jsonify(success=False, error=message), status


def json_abort(status: int, **body):
    """Stop the request with a JSON body (used from helpers below the views)."""
    abort(make_response(jsonify(body), status))


def config_not_found():
    # The PHP script answered this when config.php was missing; here it means
    # no Free domain is configured, the one thing generate cannot do without.
    return jsonify(error="Config not found"), 500


@bp.get("/generate")
def generate():
    free = Domain.active_names(("free",))
    if not free:
        return config_not_found()
    wanted = request.args.get("domain")
    domain = Domain.by_name(wanted) if wanted else Domain.by_name(free[0])
    if domain is None or domain.type != "free":
        return fail("Invalid domain. Use one of the domains listed by /domains.", 400)
    wait = models.retry_after("mailbox_create", request.remote_addr or "-")
    if wait:
        resp = fail("Too many addresses generated from your network. Try again later.", 429)
        resp[0].headers["Retry-After"] = str(wait)
        return resp
    if models.mailbox_cap_reached():
        resp = fail("No new addresses can be created right now. Try again later.", 503)
        resp[0].headers["Retry-After"] = "60"
        return resp
    username = request.args.get("username")
    if username is not None and username.strip() == "":
        username = None  # PHP's empty($_GET['username']) meant "random"
    try:
        box = Mailbox.create(username, domain, int(models.cfg("mailbox_lifetime_seconds", 86400)))
    except MailboxError as exc:
        return fail(exc.message, 409 if exc.code == "taken" else 400)
    return jsonify(success=True, email=box.address, username=box.username,
                   domain=box.domain.name, expires_at=models.fmt_local(box.expires_at))


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
    # Only the summary columns, as plain rows, from statements built once
    # and run as Core: whole Message objects (bodies included), then building
    # and caching the statement per request were most of the cost.
    conn = db.session.connection()
    params = {"mailbox_id": box.id, "offset": offset}
    if limit is None:
        rows = conn.execute(INBOX_ALL, params)
    else:
        rows = conn.execute(INBOX_PAGE, dict(params, limit=limit))
    zone = models.local_zone()  # once, not once per message
    emails = [{"id": row.id, "from_email": row.from_email, "from_name": row.from_name,
               "subject": row.subject, "is_read": int(row.is_read),  # PHP/MySQL TINYINT
               "received_at": models.fmt_local(row.received_at, zone)}
              for row in rows]
    # Unpaged, the list is the whole mailbox (same transaction): no COUNT needed.
    total = len(emails) if limit is None and offset == 0 else conn.scalar(INBOX_COUNT, params) or 0
    return jsonify(success=True, email=box.address, created_at=models.fmt_local(box.created_at, zone),
                   expires_at=models.fmt_local(box.expires_at, zone), total=total, emails=emails)


_messages = Message.__table__
INBOX_ALL = (select(_messages.c.id, _messages.c.from_email, _messages.c.from_name, _messages.c.subject,
                    _messages.c.is_read, _messages.c.received_at)
             .where(_messages.c.mailbox_id == bindparam("mailbox_id")).order_by(_messages.c.id)
             .offset(bindparam("offset", type_=Integer)))
INBOX_PAGE = INBOX_ALL.limit(bindparam("limit", type_=Integer))
INBOX_COUNT = (select(func.count()).select_from(_messages)
               .where(_messages.c.mailbox_id == bindparam("mailbox_id")))
_mailboxes = Mailbox.__table__
INBOX_BOX = (select(_mailboxes.c.id, _mailboxes.c.address, _mailboxes.c.created_at, _mailboxes.c.expires_at)
             .where(_mailboxes.c.address == bindparam("address")))


def live_mailbox_row(address: str):
    """``Mailbox.find_live`` as a plain row of the four columns the inbox
    shows (no ORM object, no joined domain), or None."""
    address = (address or "").strip().lower()
    if not models.plausible(address, 320):
        return None
    row = db.session.connection().execute(INBOX_BOX, {"address": address}).first()
    return row if row is not None and row.expires_at > models.now() else None


def live_message(raw_id: str) -> Message:
    """The message with integer id ``raw_id`` whose mailbox is live, else a 404."""
    msg = db.session.get(Message, int(raw_id)) if raw_id.isdigit() and len(raw_id) < 16 else None
    if msg is None or not msg.mailbox.is_live:
        json_abort(404, error="Email not found")
    return msg


@bp.get("/email/<raw_id>")
def email_detail(raw_id: str):
    msg = live_message(raw_id)
    msg.mark_read()
    return jsonify(success=True, email=msg.to_legacy(),
                   attachments=[a.to_legacy() for a in msg.attachments])


@bp.delete("/email/<raw_id>")
def email_delete(raw_id: str):
    msg = live_message(raw_id)
    models.delete_messages(select(Message.id).where(Message.id == msg.id))
    db.session.commit()
    # The PHP script echoed $_GET's id back, so it is a string.
    return jsonify(success=True, deleted_id=str(msg.id))


@bp.get("/stats")
def stats():
    return jsonify(success=True, stats=Stat.snapshot())


@bp.get("/domains")
def domains():
    names = Domain.active_names(("free",))
    if not names:
        return config_not_found()
    return jsonify(success=True, domains=names)


@bp.get("/uploads/attachments/<int:att_id>/<path:name>")
def attachment_file(att_id: int, name: str):
    """Download an attachment; the name in the URL is cosmetic, the id decides."""
    att = db.session.get(Attachment, att_id)
    if att is None or not att.message.mailbox.is_live:
        return jsonify(error="Attachment not found"), 404
    return send_stored(att)


def send_stored(att: Attachment):
    """Send an attachment's bytes as a download that no browser renders inline."""
    resp = stored_download(att.stored_path, att.content_type or "application/octet-stream",
                           att.filename or "attachment")
    if resp is None:
        json_abort(404, error="Attachment file missing")
    return resp


def stored_download(rel: str | None, mimetype: str, name: str):
    """A stored file (attachment or raw .eml) as a download that no browser
    renders inline or sniffs; None when the file is gone, so each caller
    answers in its own error shape."""
    try:
        path = models.file_path(rel) if rel else None
    except ValueError:
        path = None
    if path is None or not path.exists():
        return None
    resp = send_file(path, mimetype=mimetype, as_attachment=True, download_name=name, max_age=0)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return resp
