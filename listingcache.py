"""Mailbox listings answered again from memory, only while provably current.

A listing (api.php ``GET /inbox/{email}``, the User API's ``GET /messages``)
is mostly work on things that never change: a stored message's sender,
subject, date, body and attachments are written once (only its read flag
changes, and only to read; ``flask reparse`` rewrites the rest and bumps its
``revision``), and its id is never given to another message.
So each web worker keeps the JSON body of a listing it built, together with
its *fingerprint*: every ``(id, public_id, is_read, revision)`` of the listed
messages, read from the very rows the body was built from. A later request
reads the fingerprint again (one query of four narrow columns, no bodies,
no date parsing) and sends the kept body only when it is equal; a new,
deleted or newly read message changes it, so the next request through any
worker, after any other process's commit, builds the body afresh. The
public id, random and unique, keeps a kept body from matching even if a
restored database gave an id to another message.

Everything else a body shows is part of the key the caller gives (the
mailbox's id, address and dates, the page, the filters, the site's URL).
The memory is bounded by ``listing_cache_bytes`` per worker (least recently
used first out; 0 turns the cache off).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Hashable, Optional

from flask import Flask, Response, current_app

ROW_BYTES = 120  # rough size of one fingerprint row in memory, for the budget


class ListingCache:
    """Bodies by key, each valid for one fingerprint; LRU within ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict = OrderedDict()  # key -> (fingerprint, body, size)
        self._bytes = 0

    def get(self, key: Hashable, fingerprint: tuple):
        """The body kept for ``key`` if it was built at exactly ``fingerprint``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != fingerprint:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: Hashable, fingerprint: tuple, body, size: Optional[int] = None) -> None:
        """Keep ``body`` for ``key`` (replacing an older one); a body larger
        than an eighth of the budget is not kept. ``size``: the bytes ``body``
        holds when it is not itself ``bytes`` (hotpath.py keeps whole answers)."""
        size = (len(body) if size is None else size) + ROW_BYTES * (len(fingerprint) + 1)
        if size > self.max_bytes // 8:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            self._entries[key] = (fingerprint, body, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _key, (_f, _b, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def __len__(self) -> int:
        return len(self._entries)


def cache() -> Optional[ListingCache]:
    """The current app's cache, or None when ``listing_cache_bytes`` is 0."""
    return current_app.extensions.get("listing_cache")


def fingerprint(rows) -> tuple:
    """The fingerprint of listing rows that have ``id``, ``public_id``, ``is_read`` and ``revision``."""
    return tuple((row.id, row.public_id, bool(row.is_read), row.revision) for row in rows)


def marks(result) -> tuple:
    """The fingerprint straight from a query of exactly ``id, public_id,
    is_read, revision`` (rows as plain tuples: cheaper than reading them by name)."""
    return tuple(map(tuple, result))


def json_response(body: bytes) -> Response:
    """A kept body answered as ``jsonify`` answers it (same type and length)."""
    return current_app.response_class(body, mimetype=current_app.json.mimetype)


def etag_of(body: bytes) -> str:
    """A strong validator of a listing's body, for ``If-None-Match`` pollers."""
    return hashlib.blake2b(body, digest_size=12).hexdigest()


def init_app(app: Flask) -> None:
    size = int(app.config["TEMPMAIL"].get("listing_cache_bytes") or 0)
    if size > 0:
        app.extensions["listing_cache"] = ListingCache(size)
