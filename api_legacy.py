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
from sqlalchemy import select

import models
from models import Attachment, Domain, Mailbox, MailboxError, Message, Stat, db

bp = Blueprint("legacy", __name__)

ERRORS = {
    "invalid": "Invalid username. Use 3-20 alphanumeric characters only.",
    "reserved": "This username is reserved and cannot be used.",
    "taken": "Username already taken. Please choose another one.",
}


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
        return fail(ERRORS[exc.code], 409 if exc.code == "taken" else 400)
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
    box = Mailbox.find_live(address)
    if box is None:
        return jsonify(error="Email not found", searched_for=address,
                       hint="Generate this email first via /generate endpoint"), 404
    limit = int_arg("limit", None, 1000)
    offset = int_arg("offset", 0, 10**9)
    # Only the summary columns, as plain rows: building whole Message objects
    # (bodies included) was most of the cost of listing a large mailbox.
    query = (select(Message.id, Message.from_email, Message.from_name, Message.subject,
                    Message.is_read, Message.received_at)
             .where(Message.mailbox_id == box.id).order_by(Message.id).offset(offset))
    if limit is not None:
        query = query.limit(limit)
    emails = [Message.to_legacy_summary(row) for row in db.session.execute(query)]
    # Unpaged, the list is the whole mailbox (same transaction): no COUNT needed.
    total = len(emails) if limit is None and offset == 0 else box.message_count()
    return jsonify(success=True, email=box.address, created_at=models.fmt_local(box.created_at),
                   expires_at=models.fmt_local(box.expires_at), total=total, emails=emails)


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
    try:
        path = models.file_path(att.stored_path)
    except ValueError:
        path = None
    if path is None or not path.exists():
        json_abort(404, error="Attachment file missing")
    resp = send_file(path, mimetype=att.content_type or "application/octet-stream",
                     as_attachment=True, download_name=att.filename or "attachment",
                     max_age=0)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return resp
