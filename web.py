"""The temp-mail web page: a browser-owned address, its live inbox and a safe reader.

Two ways into a mailbox share every view here:

* the visitor's own mailbox, found through a random id kept in the signed
  Flask session cookie and matched against ``Mailbox.session_id``
  (URLs under ``/web/...`` and the page at ``/``);
* a read-only view opened with a mailbox's ``email_token`` (``/m/<token>...``),
  the link the User API hands out.

A view only ever reaches messages of the mailbox its scope resolves to, so a
foreign message id answers 404 exactly like a missing one. Pages work with
plain links and forms; static/app.js adds live updates and the in-page reader.
"""
from __future__ import annotations

import hashlib
import io
import math
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Optional

import segno
from babel.dates import format_date
from babel.numbers import format_decimal
from flask import (Blueprint, Flask, abort, flash, jsonify, make_response, redirect,
                   render_template, request, session, url_for)
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_wtf.csrf import CSRFError
from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import selectinload
from werkzeug.exceptions import HTTPException

import apierrors
import clock
import idgen
import livefeed
import mailevents
import mailview
import models
import storage
from mailpolicy import open_mailbox
from models import Attachment, Domain, Mailbox, MailboxError, Message, db

bp = Blueprint("web", __name__)
MAX_ID = idgen.MAX_ROW_ID  # larger path ids answer 404 before they reach the database
# The page's answers to a refused mailbox, as /generate's (PHP) codes.
STATUS = {"taken": 409, "rate_limited": 429, "full": 503}

SITE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "font-src 'self'; connect-src 'self'; frame-src 'self'; object-src 'none'; "
        "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
# Same permissions the iframe element grants: links may open a new tab that
# escapes the sandbox; script and forms stay off. allow-same-origin lets the
# page (static/app.js) read the frame's height to size it to the mail: with
# scripts off in the frame (sandbox without allow-scripts, and a CSP without
# any script-src) the mail itself still runs nothing, so the same origin gives
# it nothing to act with. Never add allow-scripts next to it: together they let
# a frame lift its own sandbox.
FRAME_SANDBOX = "allow-popups allow-popups-to-escape-sandbox allow-same-origin"
PAGE_SIZE = 50  # messages per page of the inbox list
SEARCH_MAX = 100  # characters of a search that are used
SOURCE_LIMIT = 256 * 1024  # bytes of a raw message shown in the source view


# --------------------------------------------------------------------------
# the visitor's mailbox and the token scope

def lifetime() -> int:
    return int(models.cfg("mailbox_lifetime_seconds"))


def free_domains() -> list[str]:
    """Domains a visitor may pick: the Free ones, as api.php's /generate allows."""
    return Domain.active_names(("free",))


def session_key(create: bool = False) -> Optional[str]:
    """The browser's random session id (made on demand); mailboxes carry it."""
    sid = session.get("sid")
    if sid is None and create:
        sid = session["sid"] = secrets.token_urlsafe(24)
        session.permanent = True
    return sid


def session_box() -> Optional[Mailbox]:
    """The live mailbox this browser owns, newest first, or None."""
    sid = session_key()
    if sid is None:
        return None
    return db.session.scalar(select(Mailbox).where(
        Mailbox.session_id == sid, Mailbox.expires_at > clock.now())
        .order_by(Mailbox.id.desc()).limit(1))


def new_session_box() -> Optional[Mailbox]:
    """Give this browser a fresh random address on the first Free domain, or
    None when no domain is configured. Counts one attempt against the
    per-client-IP ``mailbox_create`` limit shared with api.php (every
    cookie-less visit of ``/`` would otherwise create a mailbox); raises
    MailboxError when refused."""
    names = free_domains()
    if not names:
        return None
    box = open_mailbox("web", Domain.by_name(names[0]), None, lifetime(), request.remote_addr,
                       session_id=session_key(True))
    session.pop("released", None)
    return box


@dataclass
class Scope:
    """Which mailbox a request may see; ``token`` is None for the browser's own."""
    box: Mailbox
    token: Optional[str] = None

    @property
    def readonly(self) -> bool:
        return self.token is not None

    def url(self, endpoint: str, **values) -> str:
        return url_for(f"web.{endpoint}", token=self.token, **values)

    def for_frame(self) -> "Scope":
        """The token scope of the same mailbox. The reader's iframe is sandboxed
        into an opaque origin, so the browser does not send the SameSite session
        cookie with its requests; its document and images use the token URLs."""
        return self if self.token else Scope(self.box, self.box.email_token())

    def message(self, msg_id: int) -> Message:
        """A message of this mailbox, else 404 (foreign and missing look the same)."""
        msg = db.session.get(Message, msg_id) if 0 < msg_id < MAX_ID else None
        if msg is None or msg.mailbox_id != self.box.id:
            abort(404)
        return msg


def scope_for(token: Optional[str]) -> Scope:
    """Resolve the request's mailbox: from the token when given, else the session."""
    box = Mailbox.from_token(token) if token is not None else session_box()
    if box is None:
        abort(404)
    return Scope(box, token)


def owns(path: str) -> bool:
    """URLs of the page that no route matched still get the page's answers."""
    return path.startswith(("/web/", "/m/", "/static/"))


def both(rule: str, **options):
    """Register a view at ``/web<rule>`` (session) and ``/m/<token><rule>`` (token)."""
    def register(view):
        bp.add_url_rule("/web" + rule, view_func=view, defaults={"token": None}, **options)
        bp.add_url_rule("/m/<token>" + rule, view_func=view, **options)
        return view
    return register


def wants_json() -> bool:
    return request.accept_mimetypes.best == "application/json" or request.path.endswith(".json")


def http_error(exc: HTTPException):
    """The page's errors: JSON for its own fetch() endpoints, a friendly
    page for a missing inbox or message, the plain HTTP error otherwise."""
    if wants_json():
        return jsonify(error="Not found" if exc.code == 404 else exc.name), exc.code
    if exc.code == 404:
        return page("inbox_gone.html"), 404
    return exc


def server_error():
    if wants_json():
        return jsonify(error="Internal server error"), 500
    return page("inbox_gone.html", reason="error"), 500


apierrors.own_errors(bp, http_error, server_error)


def page(template: str, **context):
    """Render a page with the site name; pages about a mailbox are never cached."""
    resp = make_response(render_template(template, site_name=models.cfg("site_name"),
                                         **context))
    resp.headers["Cache-Control"] = "no-store"
    return resp


# --------------------------------------------------------------------------
# inbox listing

def seconds_left(box: Mailbox) -> int:
    return max(0, int((box.expires_at - clock.now()).total_seconds()))


def inbox_etag(box: Mailbox, view: str = "") -> str:
    """A validator that changes whenever the list would: one aggregate query,
    so an unchanged inbox costs the server two indexed look-ups and a 304.
    ``view`` names the search and page shown (and the language of its words)."""
    count, top, unread = db.session.execute(
        select(func.count(), func.max(Message.id),
               func.coalesce(func.sum(case((Message.is_read.is_(False), 1), else_=0)), 0))
        .where(Message.mailbox_id == box.id)).one()
    state = f"{box.id}|{box.address}|{box.expires_at.isoformat()}|{count}|{top}|{unread}|{view}"
    return hashlib.sha256(state.encode()).hexdigest()[:32]


def summary(scope: Scope, msg: Message) -> dict:
    """One row of the inbox list as the page's JSON shows it."""
    return {"id": msg.id, "from_name": msg.from_name, "from_email": msg.from_email,
            "subject": msg.subject, "received_at": clock.fmt_iso(msg.received_at),
            "received": short_time(msg.received_at), "received_full": clock.fmt_local(msg.received_at),
            "is_read": bool(msg.is_read),
            "attachments": len(real_attachments(msg)), "url": scope.url("message_page", msg_id=msg.id)}


def search_terms() -> str:
    """The request's ``?q=``, trimmed and bounded (PostgreSQL refuses NUL in text)."""
    return (request.args.get("q") or "").replace("\x00", "").strip()[:SEARCH_MAX]


def search_filter(q: str):
    """Subject, sender name or sender address containing ``q``, any case;
    LIKE's wildcards in ``q`` are matched literally."""
    like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return or_(*(column.ilike(like, escape="\\")
                 for column in (Message.subject, Message.from_name, Message.from_email)))


@dataclass
class Listing:
    """One page of a mailbox's messages, newest first, maybe narrowed by a search."""
    scope: Scope
    q: str = ""
    page: int = 1
    total: int = 0
    messages: list = field(default_factory=list)

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / PAGE_SIZE))

    @property
    def first(self) -> int:
        return min(self.total, (self.page - 1) * PAGE_SIZE + 1)

    @property
    def last(self) -> int:
        return min(self.total, self.page * PAGE_SIZE)

    def url(self, page: int, q: Optional[str] = "") -> str:
        """The inbox page showing ``page`` of this search (``q=None``: no search)."""
        q = self.q if q == "" else q
        values = {"q": q or None, "page": page if page > 1 else None}
        if self.scope.token:
            return url_for("web.token_inbox", token=self.scope.token, **values)
        return url_for("web.index", **values)


def listing(scope: Scope) -> Listing:
    """The page of messages the request asks for (``?q=``, ``?page=``)."""
    result = Listing(scope, search_terms())
    where = [Message.mailbox_id == scope.box.id]
    if result.q:
        where.append(search_filter(result.q))
    result.total = db.session.scalar(select(func.count()).select_from(Message).where(*where)) or 0
    result.page = min(max(1, request.args.get("page", 1, type=int)), result.pages)
    result.messages = list(db.session.scalars(
        select(Message).where(*where).order_by(Message.id.desc())
        .options(selectinload(Message.attachments))  # one query for the page's paper clips
        .offset((result.page - 1) * PAGE_SIZE).limit(PAGE_SIZE)))
    return result


def real_attachments(msg: Message) -> list[Attachment]:
    """The attachments a reader expects in the list: every file except the
    images the HTML body shows in place through ``cid:`` references."""
    shown = mailview.referenced_cids(msg.body_html) if msg.body_html else set()
    return [a for a in msg.attachments
            if not (a.content_id and (a.content_type or "").startswith("image/")
                    and mailview.normal_cid(a.content_id) in shown)]


def refusal_text(exc: MailboxError) -> str:
    """The page's own words for a refused address, in the visitor's language
    (the APIs keep ``exc.message``, the PHP original's English)."""
    texts = {"invalid": _("Invalid username. Use 3-20 alphanumeric characters only."),
             "reserved": _("This username is reserved and cannot be used."),
             "taken": _("Username already taken. Please choose another one."),
             "domain": _("Invalid domain. Choose one of the listed domains."),
             "rate_limited": _("Too many addresses were created from your network. Try again later."),
             "full": _("No new addresses can be created right now. Try again later.")}
    return texts.get(exc.code, exc.message)


def refused_page(exc: MailboxError):
    resp = page("inbox_gone.html", reason="limit", message=refusal_text(exc))
    resp.status_code = STATUS.get(exc.code, 400)
    resp.headers["Retry-After"] = str(exc.retry_after)
    return resp


@bp.get("/")
def index():
    """The temp-mail page: the visitor's address, created on the first visit."""
    box = session_box()
    if box is None and not session.get("released"):
        try:
            box = new_session_box()
        except MailboxError as exc:
            return refused_page(exc)
        if box is None:
            return page("inbox_gone.html", reason="no-domain"), 503
    if box is None:
        return page("inbox.html", scope=None, messages=[], domains=free_domains())
    return render_inbox(Scope(box))


@bp.get("/m/<token>")
def token_inbox(token: str):
    """The read-only inbox opened with a mailbox's ``email_token``."""
    return render_inbox(scope_for(token))


def render_inbox(scope: Scope):
    return page("inbox.html", scope=scope, listing=listing(scope), domains=free_domains(),
                seconds_left=seconds_left(scope.box), expires_iso=clock.fmt_iso(scope.box.expires_at),
                lifetime=lifetime())


@both("/inbox.json")
def inbox_json(token: Optional[str]):
    """The list for live updates, answered 304 while nothing changed."""
    scope = scope_for(token)
    view = f"{search_terms()}|{request.args.get('page', '')}|{get_locale()}"
    tag = inbox_etag(scope.box, view)
    if request.if_none_match.contains(tag):
        resp = make_response("", 304)
    else:
        box, shown = scope.box, listing(scope)
        resp = jsonify(address=box.address, expires_at=clock.fmt_iso(box.expires_at),
                       expires_in=seconds_left(box), total=shown.total, page=shown.page,
                       pages=shown.pages, first=shown.first, last=shown.last, q=shown.q,
                       newer_url=shown.url(shown.page - 1), older_url=shown.url(shown.page + 1),
                       messages=[summary(scope, m) for m in shown.messages])
    resp.set_etag(tag)
    resp.headers["Cache-Control"] = "no-cache, private"
    return resp


@both("/stream")
def inbox_stream(token: Optional[str]):
    """Live updates as Server-Sent Events: a ``message`` event (the row of
    inbox.json) per new message, ``id:`` its id, so the browser's automatic
    reconnection resumes after the last one it saw (``Last-Event-ID``); a
    ``ping`` with the time left every ``live.heartbeat_seconds``; ``gone``
    when the mailbox is. ``?after=`` is the newest id the page showed."""
    if not livefeed.page_origin_allowed():
        abort(403)
    scope = scope_for(token)
    try:
        slot = mailevents.Slot.take(int(mailevents.live_config("max_held_per_process")))
    except mailevents.Busy:
        resp = jsonify(error="Too many live pages open. Try again in a moment.")
        resp.status_code, resp.headers["Retry-After"] = 503, "1"
        return resp
    return livefeed.stream_response(PageFeed(scope, stream_cursor(scope.box)), slot)


def id_value(raw: Optional[str]) -> int:
    """A message id from a header or a query string, 0 when it is not one."""
    raw = (raw or "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else 0


def stream_cursor(box: Mailbox) -> int:
    """Where the page's stream starts: after the newest message the page (or
    the stream, on a reconnection) already showed, never past the newest
    message there is; from now when it names none."""
    newest = livefeed.newest_id(box.id)
    shown = max(id_value(request.headers.get("Last-Event-ID")), id_value(request.args.get("after")))
    return min(shown, newest) if shown else newest


class PageFeed:
    """The page's stream of one mailbox (see ``livefeed.events``)."""

    def __init__(self, scope: Scope, cursor: int):
        self.scope, self.mailbox_id, self.cursor = scope, scope.box.id, cursor
        self.left = seconds_left(scope.box)

    def next_events(self) -> tuple[str, bool]:
        rows = list(db.session.scalars(select(Message).where(
            Message.mailbox_id == self.mailbox_id, Message.id > self.cursor).order_by(Message.id)
            .limit(livefeed.STREAM_BATCH).options(selectinload(Message.attachments))))
        if rows:
            self.cursor = rows[-1].id
        text = "".join(livefeed.sse("message", summary(self.scope, m), str(m.id)) for m in rows)
        return text, len(rows) == livefeed.STREAM_BATCH

    def still_open(self) -> bool:
        box = db.session.get(Mailbox, self.mailbox_id)
        if box is None or not box.is_live:
            return False
        self.left = seconds_left(box)
        return True

    def heartbeat(self) -> str:
        return livefeed.sse("ping", {"expires_in": self.left})


# --------------------------------------------------------------------------
# reading

def cid_resolver(scope: Scope, msg: Message):
    """Map a Content-ID to the URL of the attachment that carries it."""
    by_cid = {mailview.normal_cid(a.content_id): a for a in msg.attachments if a.content_id}

    def resolve(cid: str) -> Optional[str]:
        att = by_cid.get(mailview.normal_cid(cid))
        return scope.url("attachment", msg_id=msg.id, att_id=att.id) if att else None
    return resolve


def safe_body(scope: Scope, msg: Message, remote: bool) -> mailview.SafeHtml:
    return mailview.sanitize_html(msg.body_html, cid_resolver(scope.for_frame(), msg), remote)


def reader_view(msg: Message) -> str:
    """Which view of a message was asked for: html (the default when there
    is HTML), text, or source (headers and raw message)."""
    asked = request.args.get("view")
    if asked in ("text", "source"):
        return asked
    return "html" if msg.body_html else "text"


@both("/messages/<int:msg_id>")
def message_page(token: Optional[str], msg_id: int):
    """A message: full page without JavaScript, or the reader pane (``?partial=1``)."""
    scope = scope_for(token)
    msg = scope.message(msg_id)
    msg.mark_read()
    remote = request.args.get("remote") == "1"
    view = reader_view(msg)
    blocked = safe_body(scope, msg, remote).blocked_images if view == "html" else 0
    # In the HTML view, images shown in place are not listed again as files.
    files = real_attachments(msg) if view == "html" else list(msg.attachments)
    template = "message_reader.html" if request.args.get("partial") == "1" else "message.html"
    return page(template, scope=scope, msg=msg, remote=remote, view=view, blocked=blocked,
                files=files, source=raw_source(msg) if view == "source" else None,
                body_text=mailview.linkify_text(msg.body_text) if view == "text" else "")


@dataclass
class Source:
    """The start of a raw message as text for the source view."""
    headers: str
    text: str
    size: int
    shown: int


def raw_source(msg: Message) -> Optional[Source]:
    """The first SOURCE_LIMIT bytes of the stored ``.eml``, as text: undecodable
    bytes replaced and control characters made visible, so nothing in it can
    act on the page (Jinja escapes the rest). None when the blob is gone."""
    chunks = storage.source_chunks(msg)
    if chunks is None:
        return None
    head = b""
    for chunk in chunks:
        head += chunk[:SOURCE_LIMIT - len(head)]
        if len(head) >= SOURCE_LIMIT:
            break
    text = mailview.printable(head.decode("utf-8", "replace"))
    headers, _sep, _body = text.partition("\n\n")
    return Source(headers, text, max(msg.size or 0, len(head)), len(head))


@both("/messages/<int:msg_id>/body")
def message_body(token: Optional[str], msg_id: int):
    """The sanitised HTML shown inside the reader's sandboxed iframe, with a
    policy of its own: no script at all, images only from this message's
    attachments (and the wider web only once the reader asked for it)."""
    scope = scope_for(token)
    msg = scope.message(msg_id)
    remote = request.args.get("remote") == "1"
    resp = make_response(render_template("message_frame.html", body=safe_body(scope, msg, remote).html))
    # CSP host-sources may carry a path: allow exactly this message's attachments.
    att_url = scope.for_frame().url("attachment", msg_id=msg.id, att_id=0)
    own = request.host_url.rstrip("/") + att_url.rsplit("/", 1)[0] + "/"
    # Asked-for remote images come over http too: plenty of mail still links them so.
    images = f"{own} data:" + (" https: http:" if remote else "")
    resp.headers["Content-Security-Policy"] = (
        f"default-src 'none'; img-src {images}; style-src 'unsafe-inline'; base-uri 'none'; "
        f"form-action 'none'; frame-ancestors 'self'; sandbox {FRAME_SANDBOX}")
    resp.headers["X-Frame-Options"] = "SAMEORIGIN"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    return resp


@both("/messages/<int:msg_id>/attachments/<int:att_id>")
def attachment(token: Optional[str], msg_id: int, att_id: int):
    """Download one attachment (also the target of rewritten ``cid:`` images)."""
    msg = scope_for(token).message(msg_id)
    att = next((a for a in msg.attachments if a.id == att_id), None)
    resp = storage.download_attachment(att) if att is not None else None
    if resp is None:
        abort(404)
    return resp


@both("/qr.svg")
def qr_code(token: Optional[str]):
    """A QR code of the link that opens this inbox on another device (its
    read-only ``/m/<token>`` page), drawn here as SVG: no outside service
    learns the address, and the image is private like the link it holds."""
    scope = scope_for(token)
    link = request.host_url.rstrip("/") + url_for("web.token_inbox", token=scope.for_frame().token)
    out = io.BytesIO()
    segno.make(link, error="m").save(out, kind="svg", scale=4, border=2, dark="#172033",
                                     xmldecl=False, title=scope.box.address)
    resp = make_response(out.getvalue())
    resp.mimetype = "image/svg+xml"
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
    return resp


@both("/messages/<int:msg_id>/raw")
def message_raw(token: Optional[str], msg_id: int):
    """The message exactly as it was received, as a ``.eml`` download."""
    msg = scope_for(token).message(msg_id)
    resp = storage.download_source(msg, f"message-{msg.id}.eml")
    if resp is None:
        abort(404)
    return resp


# --------------------------------------------------------------------------
# changing things (session scope only; CSRF-protected by Flask-WTF)

def done(message: str, category: str = "ok", status: int = 200):
    """Answer a form: JSON for fetch() callers, else a flash and back to the page."""
    if wants_json():
        return jsonify(ok=category == "ok", message=message), status
    flash(message, category)
    return redirect(url_for("web.index"), 303)


@bp.post("/web/messages/<int:msg_id>/delete")
def delete_message(msg_id: int):
    storage.commit_removal(scope_for(None).message(msg_id).delete())
    return done(_("Message deleted."))


@bp.post("/web/address")
def change_address():
    """Move the visitor's address to another username and/or Free domain,
    keeping its messages; the same rules and wording as api.php's /generate."""
    scope = scope_for(None)
    domain = Domain.by_name(request.form.get("domain", ""))
    if domain is None or domain.type != "free":
        return done(_("Invalid domain. Choose one of the listed domains."), "error", 400)
    try:
        scope.box.rename(request.form.get("username", ""), domain)
    except MailboxError as exc:
        return done(refusal_text(exc), "error", STATUS.get(exc.code, 400))
    return done(_("Your address is now %(address)s.", address=scope.box.address))


@bp.post("/web/address/extend")
def extend_address():
    """Give the visitor's address a full lifetime again, counted from now:
    ``expires_at`` becomes now + ``mailbox_lifetime_seconds`` (never earlier
    than it already was). So an address lives at most one configured lifetime
    past the visitor's last extension, and a forgotten one still expires."""
    box = scope_for(None).box
    box.expires_at = max(box.expires_at, clock.now() + timedelta(seconds=lifetime()))
    db.session.commit()
    # Whole minutes, rounded up: the second spent on the request would turn "24 h" into "23 h 59 min".
    left = math.ceil(seconds_left(box) / 60) * 60
    return done(_("Your address now expires in %(time)s.", time=duration(left)))


@bp.post("/web/address/new")
def new_address():
    """Hand out a new random address, then drop the old one with its mail
    (in that order: a refused request keeps the old address)."""
    old = session_box()
    try:
        box = new_session_box()
    except MailboxError as exc:
        resp = done(refusal_text(exc), "error", STATUS.get(exc.code, 400))
        resp = resp if not isinstance(resp, tuple) else make_response(*resp)
        resp.headers["Retry-After"] = str(exc.retry_after)
        return resp
    if box is None:
        return done(_("No domain is configured."), "error", 503)
    if old is not None:
        storage.commit_removal(old.delete())
    return done(_("Your new address is %(address)s.", address=box.address))


@bp.post("/web/address/delete")
def delete_address():
    """Delete the address and its mail; no new one until the visitor asks."""
    box = scope_for(None).box
    address = box.address
    storage.commit_removal(box.delete())
    session["released"] = True
    return done(_("%(address)s and its messages are deleted.", address=address))


# --------------------------------------------------------------------------

def security_headers(resp):
    """Strict defaults for every response; a route that set its own keeps it."""
    for name, value in SITE_HEADERS.items():
        resp.headers.setdefault(name, value)
    return resp


def csrf_failed(exc: CSRFError):
    """A form whose CSRF token is missing or stale (often a page left open past
    the token's hour): a page in the visitor's language, not Werkzeug's English
    one; Flask-WTF's own reason stays under "technical details"."""
    message = _("This form has expired. Reload the page and try again.")
    if wants_json():
        return jsonify(ok=False, message=message, detail=exc.description), 400
    resp = page("inbox_gone.html", reason="expired", message=message, detail=exc.description)
    resp.status_code = 400
    return resp


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.after_request(security_headers)
    app.register_error_handler(CSRFError, csrf_failed)
    app.jinja_env.filters.setdefault("localtime", clock.fmt_local)
    app.jinja_env.filters.setdefault("duration", duration)
    app.jinja_env.filters.setdefault("shorttime", short_time)
    app.jinja_env.filters.setdefault("human_size", human_size)
    app.jinja_env.filters.setdefault("real_attachments", real_attachments)


def short_time(value: datetime) -> str:
    """"14:05" for today's mail, "3 Nov" (in the page's language) for older:
    the list has little room."""
    zone = clock.local_zone()
    local = value.replace(tzinfo=timezone.utc).astimezone(zone)
    today = clock.now().replace(tzinfo=timezone.utc).astimezone(zone).date()
    if local.date() == today:
        return local.strftime("%H:%M")
    return format_date(local.date(), "d MMM", locale=get_locale() or "en")


def duration(seconds: int) -> str:
    """Time left as people say it: "23 h 5 min", "4 min 10 s", "24 h"."""
    hours, rest = divmod(max(0, int(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        if not minutes:
            return _("%(h)d h", h=hours)
        return _("%(h)d h %(m)d min", h=hours, m=minutes)
    if minutes:
        return _("%(m)d min %(s)d s", m=minutes, s=secs)
    return _("%(s)d s", s=secs)


SIZE_UNITS = ("KB", "MB", "GB", "TB")


def human_size(size: int) -> str:
    """Bytes as people read them: "157 B", "1.2 MB" ("1,2 MB" in Italian);
    binary multiples, one decimal below 10 units."""
    value = float(max(0, int(size or 0)))
    if value < 1024:
        return f"{int(value)} B"
    for unit in SIZE_UNITS:
        value /= 1024
        if value < 1024 or unit == SIZE_UNITS[-1]:
            break
    pattern = "0.#" if value < 10 else "0"
    return f"{format_decimal(value, pattern, locale=get_locale() or 'en')} {unit}"
