"""What the held HTTP requests share: message filters, Server-Sent Events,
and the Origin rules of the streams. The routes themselves live with their
API (api_legacy ``?wait=``, api_v1 ``?wait=`` and ``/api/messages/stream``,
web ``/web/stream``); the wake-ups come from ``mailevents``.

A stream is one ``text/event-stream`` response that stays open: each new
message is one ``message`` event whose ``id:`` lets the client resume
(``Last-Event-ID``), and silence is broken by a heartbeat every
``live.heartbeat_seconds`` so proxies and clients see the link alive. It
holds no database connection between looks at the database, and ends after
``live.stream_max_seconds`` (clients reconnect and resume), or with a
``gone`` event once its mailbox expired or was deleted.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

from flask import Response, current_app, request, stream_with_context
from flask_cors.core import try_match_any_pattern
from sqlalchemy import func, select

import mailevents
from models import Message, db

MAX_FILTER = 200  # characters of a from= / subject= filter
MAX_TAG = 64  # as mailpolicy keeps them
STREAM_BATCH = 100  # messages loaded per look; a resumed stream catches up in batches


# --------------------------------------------------------------------------
# filters (User API: from=, subject=, tag=)

def fold(text: Optional[str]) -> str:
    """Case-insensitive form for substring matching. Done in Python, not in
    SQL: SQLite's lower() and PostgreSQL's under the C locale fold ASCII
    only, and the two databases must answer alike."""
    return (text or "").casefold()


@dataclass(frozen=True)
class MessageFilter:
    """Which messages a listing, a wait or a stream wants: ``sender`` and
    ``subject`` are case-insensitive substrings (``sender`` of the address
    or the display name), ``tag`` the exact sub-address tag."""
    sender: Optional[str] = None
    subject: Optional[str] = None
    tag: Optional[str] = None

    @property
    def needs_fields(self) -> bool:
        return bool(self.sender or self.subject)

    def matches(self, from_email: str, from_name: str, subject: str) -> bool:
        """The substring tests (the tag is tested in SQL by ``restrict``)."""
        if self.sender and self.sender not in fold(from_email) and self.sender not in fold(from_name):
            return False
        return not self.subject or self.subject in fold(subject)

    def restrict(self, stmt):
        """Add the exact tag test to a statement over messages."""
        return stmt.where(Message.tag == self.tag) if self.tag else stmt


def tag_value(raw: str) -> str:
    """A tag as the recipient policy stores it: ASCII lower-cased (the policy
    leaves other scripts alone so look-alikes never merge)."""
    return raw.lower() if raw.isascii() else raw


def newer_matches(mailbox_id: int, after_id: int, filt: MessageFilter) -> tuple[bool, int]:
    """Whether ``mailbox_id`` has a message above ``after_id`` that passes
    ``filt``, and the highest id looked at (so the next look starts there)."""
    columns = (Message.id, Message.from_email, Message.from_name, Message.subject) if filt.needs_fields \
        else (Message.id,)
    stmt = filt.restrict(select(*columns).where(Message.mailbox_id == mailbox_id, Message.id > after_id))
    if not filt.needs_fields:
        top = db.session.execute(stmt.order_by(Message.id.desc()).limit(1)).first()
        return top is not None, top[0] if top is not None else after_id
    top = after_id
    for row in db.session.execute(stmt.order_by(Message.id)):
        if filt.matches(row.from_email, row.from_name, row.subject):
            return True, row.id
        top = row.id
    return False, top


def newest_id(mailbox_id: int) -> int:
    """The highest message id of a mailbox (0 when empty): a stream that
    starts "from now" starts after it."""
    return db.session.scalar(select(func.max(Message.id)).where(Message.mailbox_id == mailbox_id)) or 0


# --------------------------------------------------------------------------
# Origin

def own_origin() -> str:
    """This server's origin as the client reached it (``scheme://host[:port]``)."""
    return request.host_url.rstrip("/")


def api_origin_allowed() -> bool:
    """The User API stream: a browser page of another site may read it only
    if ``cors_origins`` lets that site call the APIs at all. No Origin (a
    program, or a same-origin request) and our own origin always pass.

    What ``cors_origins`` means here: the User API authenticates with a
    Bearer key that a browser never sends by itself, so a page can only
    read a stream whose key it holds. ``"*"`` (the default) lets any site's
    pages use the APIs with their users' keys, the stream included; a list
    (matched like flask-cors matches it, regular expressions too) names the
    only sites whose pages may."""
    origin = request.headers.get("Origin")
    if origin is None or origin == own_origin():
        return True
    allowed = current_app.config["TEMPMAIL"]["cors_origins"]
    patterns = [allowed] if isinstance(allowed, str) else list(allowed)
    return "*" in patterns or bool(try_match_any_pattern(origin, patterns, caseSensitive=False))


def page_origin_allowed() -> bool:
    """The web page's stream rides on the session cookie (or a token in the
    URL), so only the page's own origin may read it, whatever
    ``cors_origins`` says: a request a browser marks cross-site or
    same-site, or with a foreign Origin, is refused."""
    site = request.headers.get("Sec-Fetch-Site")
    if site in ("cross-site", "same-site"):
        return False
    origin = request.headers.get("Origin")
    return origin is None or origin == own_origin() or site == "same-origin"


# --------------------------------------------------------------------------
# Server-Sent Events

def sse(event: str, data: dict, event_id: Optional[str] = None) -> str:
    """One event. JSON escapes CR and LF inside strings, so mail content can
    never end a field or forge another event."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"{head}event: {event}\ndata: {body}\n\n"


class Feed(Protocol):
    """What a stream needs from its API."""
    mailbox_id: int

    def next_events(self) -> tuple[str, bool]:
        """Events for the messages after the stream's cursor (advancing it),
        and whether more are waiting already."""

    def still_open(self) -> bool:
        """False once the mailbox (or the right to read it) is gone."""

    def heartbeat(self) -> str:
        """What breaks a silence."""


def stream_response(feed: Feed, slot: mailevents.Slot) -> Response:
    """The ``text/event-stream`` response of ``feed``; ``slot`` (taken by the
    caller, which answers 503 when none is free) is released when the
    response closes, even if no byte was ever sent."""
    if request.method == "HEAD":  # headers only: never hold a thread for a body nobody reads
        slot.release()
        resp = Response(mimetype="text/event-stream")
    else:
        resp = Response(stream_with_context(events(feed)), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache, no-store"
    resp.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    resp.call_on_close(slot.release)
    return resp


def events(feed: Feed) -> Iterator[str]:
    """The body of a stream: a first line at once (headers reach the client
    now), then events as mail arrives, heartbeats in between."""
    beat = float(mailevents.live_config("heartbeat_seconds"))
    end = time.monotonic() + float(mailevents.live_config("stream_max_seconds"))
    db.session.close()  # no pooled connection held while queueing for the hub
    current = mailevents.hub()
    yield "retry: 2000\n: connected\n\n"
    with current.watch(feed.mailbox_id) as waiter:
        next_beat = time.monotonic() + beat
        while True:
            waiter.arm()
            text, more = look(feed.next_events)
            if text:
                yield text
            now = time.monotonic()
            if now >= end or mailevents.STOPPING.is_set():
                return
            if now >= next_beat:
                if not look(feed.still_open):
                    yield sse("gone", {})
                    return
                yield feed.heartbeat()
                next_beat = now + beat
            if not more:
                waiter.sleep(current.nap(min(next_beat, end) - now))


def look(step):
    """Run one database step of a feed, then give the connection back."""
    try:
        return step()
    finally:
        db.session.close()
