"""The answers of a few hot read routes, sent again below Flask while provably current.

Pollers ask the same question many times a second: api.php's ``GET
/inbox/{email}`` and ``GET /email/{id}``, the User API's ``GET
/messages?email=``. Flask's request cycle (contexts, routing, hooks, the
session's set-up and teardown) cost more CPU than these views themselves
(bench/README, session 4), so a worker keeps the whole answer Flask gave,
status, headers and body, and sends it again without entering Flask, as
long as a *validator* read from the database is unchanged.

A validator is every row a route's answer depends on that can change,
read in one statement on a raw pooled connection, always *before* Flask
builds an answer to be kept. What it covers never goes back to an earlier
value (ids are never reused, a read flag only goes to read, a revision
only grows, a deleted row stays gone), so if anything changed between the
validator's read and the answer's build, every later validator differs and
the kept answer is never sent. The statements apply the same rules as the
views (api.php shows only live api.php mailboxes; a key sees only its own
user's live mailboxes): a row another front may not see gives no
validator, and the request goes to Flask, which answers it as always.

Anything unusual goes to Flask as well: another method, a query string
or path the route's ``match`` does not take, a cookie, a conditional or
range request, an answer that set a cookie or was not a 200, any error
while validating. Per-request work that must still happen (counting the
request in the metrics, reserving the User API's quota and its headers)
runs here too, through the same functions as in Flask.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from flask import Flask
from sqlalchemy import String, cast, func

import metrics
from database import db, prepared

log = logging.getLogger(__name__)
ENVIRON_KEY = "tempmail.hot_offer"  # the request's Offer, for the view to accept
# Request headers that change an answer in ways a key does not hold: such
# requests always go to Flask.
UNKEYED = ("HTTP_COOKIE", "HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE", "HTTP_RANGE", "HTTP_IF_RANGE")


def request_shape(environ: dict) -> tuple:
    """What of a request, besides its path, can change a 200 answer's
    headers or links: the CORS origin and the site's address as seen. Part
    of every hot route's key."""
    return (environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST"), environ.get("wsgi.url_scheme"),
            environ.get("SCRIPT_NAME"))


def marks(messages) -> Any:
    """An aggregate of every listed message's changeable columns (id,
    public_id, is_read, revision) as one string, for a validator grouped by
    its mailbox: one row, where one row per message let Python's sqlite3
    give up and take back the GIL around each row's step, and every take
    waited for the other threads of a busy worker (50 rows: 26 µs alone,
    9.4 ms beside one busy thread; bench/README, session 5). The string
    holds every tuple, so two different sets never give the same string;
    the database's order within it only has to be stable to be matched."""
    mark = (cast(messages.c.id, String) + ":" + messages.c.public_id + ":" + cast(messages.c.is_read, String)
            + ":" + cast(messages.c.revision, String))
    return func.aggregate_strings(mark, ",")


@dataclass
class HotRoute:
    """A route whose 200 answers may be kept and sent again below Flask.

    ``match(environ)``: the answer's key (everything of the request it depends
    on), or None for a request Flask must answer. ``validate(run, key)``: the
    validator, read through ``run(statement, **params)``, or None when there
    is nothing to send again (Flask answers). ``admit(validator)``: per-request
    work before a kept answer is sent; it returns the headers to add, or
    None to let Flask answer after all. ``per_request``: header names of a
    kept answer that ``admit`` gives afresh each time."""
    name: str
    match: Callable[[dict], Optional[tuple]]
    validate: Callable[[Callable, tuple], Optional[tuple]]
    admit: Optional[Callable[[Flask, tuple], Optional[list]]] = None
    per_request: frozenset = field(default_factory=frozenset)


@dataclass
class Offer:
    """A request Flask answers whose answer may be kept: the view calls
    ``accept()`` when its answer is the route's ordinary one."""
    route: HotRoute
    key: tuple
    validator: tuple
    rule: Optional[str] = None

    def accept(self, rule: str) -> None:
        self.rule = rule


def register(app: Flask, route: HotRoute) -> None:
    """Let ``route``'s answers be kept (called by the API modules' init_app)."""
    app.extensions.setdefault("hot_routes", []).append(route)


def accept(environ: dict, rule: str) -> None:
    """From a view: this request's answer is the route's ordinary one and may
    be kept, counted in the metrics under URL rule ``rule``."""
    offer = environ.get(ENVIRON_KEY)
    if offer is not None:
        offer.accept(rule)


class HotPath:
    """WSGI middleware around Flask's ``wsgi_app``: kept answers of the
    registered routes are sent while their validator holds."""

    def __init__(self, app: Flask, inner: Callable) -> None:
        self.app, self.inner = app, inner
        self.hits = 0  # answers sent from memory (tests check the path is taken)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        kept = self.app.extensions.get("listing_cache")
        if kept is None or environ.get("REQUEST_METHOD") != "GET" or any(h in environ for h in UNKEYED):
            return self.inner(environ, start_response)
        with self.app.app_context():  # ~4 µs: the routes' rules read the app's config
            sent = self._from_memory(environ, start_response, kept)
        if sent is not None:
            return sent
        if ENVIRON_KEY in environ:
            return self._build(environ, start_response, kept)
        return self.inner(environ, start_response)

    def _from_memory(self, environ: dict, start_response: Callable, kept) -> Optional[list]:
        """The kept answer, sent; or None after leaving an Offer in ``environ``
        when Flask's answer may be kept."""
        for route in self.app.extensions.get("hot_routes", ()):
            key = route.match(environ)
            if key is not None:
                break
        else:
            return None
        try:
            validator = route.validate(_run, key)
        except Exception:  # the database's trouble: Flask answers it in the API's shape
            log.debug("validation failed; Flask answers", exc_info=True)
            return None
        if validator is None:
            return None
        entry = kept.get((route.name,) + key, validator)
        sent = self._replay(route, entry, validator, start_response) if entry is not None else None
        if sent is None:
            environ[ENVIRON_KEY] = Offer(route, key, validator)
        return sent

    def _replay(self, route: HotRoute, entry, validator: tuple, start_response):
        status, headers, body, rule = entry
        extra: list = []
        if route.admit is not None:
            try:
                extra = route.admit(self.app, validator)
            except Exception:
                log.debug("admission failed; Flask answers", exc_info=True)
                return None
            if extra is None:
                return None
        metrics.count_request(rule, "GET", status[:3])
        metrics.ANSWERS_FROM_MEMORY.labels(route=route.name).inc()
        self.hits += 1
        start_response(status, headers + extra)
        return [body]

    def _build(self, environ: dict, start_response: Callable, kept) -> Iterable[bytes]:
        """Flask answers; an accepted 200 without cookies is kept whole."""
        seen: list = []

        def capture(status, headers, exc_info=None):
            seen[:] = [status, headers]
            return start_response(status, headers, exc_info)

        result = self.inner(environ, capture)
        offer = environ.get(ENVIRON_KEY)
        if offer is None or offer.rule is None or not seen or not seen[0].startswith("200"):
            return result
        headers = [(n, v) for n, v in seen[1] if n.lower() not in offer.route.per_request]
        if any(n.lower() == "set-cookie" for n, _v in headers):
            return result
        try:
            body = b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        kept.put((offer.route.name,) + offer.key, offer.validator, (seen[0], headers, body, offer.rule),
                 size=len(body) + 64 * len(headers))
        return [body]


def _run(statement, **params: Any) -> list[tuple]:
    """A validator's statement, compiled once per dialect (``database.prepared``)
    and run on a raw pooled connection taken for it and given back at once
    (the pool rolls back what the read began)."""
    conn = db.engine.raw_connection()
    try:
        cursor = conn.cursor()
        try:
            return prepared(statement).rows(cursor, **params)
        finally:
            cursor.close()
    finally:
        conn.close()
