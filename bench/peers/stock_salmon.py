"""Peer for the benches: stock Salmon 3.3.0 with a minimal SQLite handler.

This is what a naive port gets: Salmon's own ``SMTPReceiver`` (one asyncore
thread, ``listen(5)``, no TCP_NODELAY), a single ``@stateless`` route that
parses the message with Salmon's ``MailRequest``, stores its fields, raw bytes
and attachment parts into SQLite, and commits once per message. None of the
mending that TempMail's mailhandler does is applied, on purpose.

Run: ``.venv/bin/python bench/peers/stock_salmon.py --port 8825 --db /tmp/s.db``
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import threading

from salmon import routing
from salmon.routing import route, stateless
from salmon.server import SMTPReceiver

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, sender TEXT, recipient TEXT,
    subject TEXT, body TEXT, raw BLOB);
CREATE TABLE IF NOT EXISTS attachments (id INTEGER PRIMARY KEY, message_id INTEGER,
    filename TEXT, content_type TEXT, data BLOB);
"""

DB: sqlite3.Connection | None = None


def open_db(path: str) -> sqlite3.Connection:
    """The file a naive port would use: WAL, but a commit (fsync'd by
    synchronous=NORMAL at checkpoints) per message, like TempMail's durability."""
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    return conn


@route("(address)@(host)", address=".+", host=".+")
@stateless
def START(message, address=None, host=None):
    """Store the message: header fields, text body, raw bytes, attachment parts."""
    cur = DB.execute("INSERT INTO messages (sender, recipient, subject, body, raw) VALUES (?,?,?,?,?)",
                     (message.From, message.To, message["Subject"], message.body(),
                      message.Data))
    for part in message.walk():
        # Salmon's MailBase parts: content_encoding holds (value, params) pairs.
        disposition, params = part.content_encoding["Content-Disposition"]
        if disposition == "attachment" or (params or {}).get("filename"):
            ctype = part.content_encoding["Content-Type"][0]
            DB.execute("INSERT INTO attachments (message_id, filename, content_type, data) "
                       "VALUES (?,?,?,?)", (cur.lastrowid, (params or {}).get("filename"), ctype,
                                            part.body))
    DB.commit()


def main(argv: list[str] | None = None) -> None:
    global DB
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8825)
    parser.add_argument("--db", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    DB = open_db(args.db)
    routing.Router.load([__name__ if __name__ != "__main__" else "__main__"])
    # Salmon's poller is a non-daemon thread running asyncore.loop forever, so
    # sys.exit would hang: SIGTERM (the bench stopping its peers) exits at once.
    # Every stored message is already committed.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    receiver = SMTPReceiver(args.host, args.port)
    receiver.start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
