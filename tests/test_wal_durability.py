"""A failed fsync of SQLite's WAL (walsync.py), over real SMTP to the
in-process daemon with durability on: the commit has happened, so a 250 is
given only once a checkpoint has put every committed page into the synced
database file, for this message and for the sender's retry of it (which the
duplicate filter finds already stored).

The failure is Python's ``os.fsync`` raising EIO on the WAL, as a failing
disk makes it; SQLite's own syncs (C) are untouched, so the checkpoints are
real. A reader holding an older snapshot makes a checkpoint impossible, as
on a live server a long read does."""
from __future__ import annotations

import errno
import os
import smtplib
import sqlite3

import pytest

import smtpserver
import walsync
from test_receiving import inbox, make_boxes, smtp

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # PostgreSQL syncs its own commit

MESSAGE = b"From: <s@source.test>\r\nTo: <box@example.com>\r\nSubject: wal\r\n\r\nbody\r\n"


@pytest.fixture
def durable(app):
    """The daemon as shipped: every 250 after the WAL's fsync."""
    app.config["FSYNC"] = True
    make_boxes(app, "box", "other")
    with app.app_context():
        path = walsync.database_path()
    server = smtpserver.MailServer(app, "127.0.0.1", 0, purge=False).start()
    yield server, path
    server.stop()


def fail_wal_fsyncs(monkeypatch, count: int) -> None:
    real = os.fsync
    left = [count]

    def fsync(fd: int) -> None:
        if left[0] and os.readlink(f"/proc/self/fd/{fd}").endswith("-wal"):
            left[0] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def send(server, recipient: str = "box@example.com", message: bytes = MESSAGE) -> int:
    """The final reply code of one delivery."""
    with smtp(server) as conn:
        try:
            conn.sendmail("s@source.test", [recipient], message)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code
    return 250


def test_a_failed_sync_is_made_good_by_a_checkpoint(durable, client, monkeypatch, caplog):
    server, path = durable
    fail_wal_fsyncs(monkeypatch, 1)
    assert send(server) == 250
    assert os.path.getsize(path + "-wal") == 0  # TRUNCATE: every frame is in the database file
    assert not os.path.exists(path + walsync.MARKER_SUFFIX)
    assert "fsync of the SQLite WAL failed" in caplog.text and "durable again" in caplog.text
    assert len(inbox(client, "box@example.com")) == 1


def test_no_250_until_a_checkpoint_proves_the_commit_durable(durable, client, monkeypatch):
    server, path = durable
    monkeypatch.setattr(walsync, "CHECKPOINT_WAIT_SECONDS", 0.2)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM messages").fetchone()  # an older snapshot: no checkpoint
    fail_wal_fsyncs(monkeypatch, 1)
    assert send(server) == 451
    assert os.path.exists(path + walsync.MARKER_SUFFIX)
    # Committed, so visible; the sender's retry finds it and still gets no 250,
    # though the next plain fsync would succeed. Nor does any other mail.
    assert len(inbox(client, "box@example.com")) == 1
    assert send(server) == 451
    assert send(server, "other@example.com") == 451
    reader.execute("ROLLBACK")
    reader.close()
    assert send(server) == 250  # the checkpoint went through: durable, and stored once
    assert not os.path.exists(path + walsync.MARKER_SUFFIX)
    assert len(inbox(client, "box@example.com")) == 1
    assert os.path.getsize(path + "-wal") == 0 or send(server, "other@example.com") == 250


def test_the_mark_is_seen_by_another_process(durable, app, monkeypatch):
    """A receiver whose sync never failed sees the marker file another one
    left (walsync keeps it beside the database) and checkpoints first."""
    server, path = durable
    open(path + walsync.MARKER_SUFFIX, "w").close()  # left by another receiver
    assert send(server) == 250
    assert not os.path.exists(path + walsync.MARKER_SUFFIX)
    assert os.path.getsize(path + "-wal") == 0
