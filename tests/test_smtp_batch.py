"""The daemon's group commit in-process (``smtpserver.store_batch``): a batch
decides every recipient with one look-up and still answers each message as
the policy says; a left-over chunk row under a new blob's name is replaced,
not doubled; and the plain-reply shortcut of ``SMTPChannel.push`` sends
exactly what the escaping path would."""
from __future__ import annotations

import base64
import contextlib

import pytest
from sqlalchemy import event, text

import database
import logsafe
import smtpserver
import storage
from models import Attachment, Domain, Mailbox, Message, db

SHIPPED_STORAGE = {"storage": {"inline_max_bytes": 131072}}  # small blobs as rows, as shipped


def message(n: int) -> bytearray:
    return bytearray(f"From: <s@source.test>\r\nSubject: batch {n}\r\nMessage-ID: <{n}@source.test>\r\n\r\n"
                     f"body {n}\r\n".encode())


def job(n: int, recipients: list[str]) -> smtpserver.Job:
    return smtpserver.Job(message(n), recipients, "s@source.test", "test", None)


@contextlib.contextmanager
def statements():
    """The SQL statements run inside the block: through the app's engine, and
    on its raw connection (``database.Prepared``, the writer's statements)."""
    seen: list[str] = []
    run = database.Prepared.run

    def note(_conn, _cursor, sql, *_args):
        seen.append(" ".join(sql.split()))

    def noted(self, cursor, **params):
        seen.append(" ".join(self.sql.split()))
        return run(self, cursor, **params)
    event.listen(db.engine, "before_cursor_execute", note)
    database.Prepared.run = noted
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", note)
        database.Prepared.run = run


def test_a_batch_decides_every_recipient_with_one_look_up(app_factory):
    app = app_factory(SHIPPED_STORAGE)
    with app.app_context():
        domain = Domain.by_name("example.com")
        Mailbox.create("alice", domain, 3600)
        Mailbox.create("bob", domain, 3600)
        jobs = [job(1, ["alice@example.com"]), job(2, ["Bob+news@example.com", "alice@example.com"]),
                job(3, ["nobody@example.com"]), job(4, ["alice@elsewhere.org"]),
                job(5, ["nobody@example.com", "bob@example.com"])]
        with statements() as seen:
            smtpserver.store_batch(jobs)
        assert [j.reply.split(" ")[0] for j in jobs] == ["250", "250", "550", "550", "250"]
        assert jobs[2].reply.startswith("550 5.1.1") and jobs[3].reply.startswith("550 5.7.1")
        look_ups = [sql for sql in seen if " FROM domains" in sql or " FROM mailboxes" in sql]
        assert len(look_ups) == 1, look_ups
        stored = sorted((m.envelope_to, m.tag or "") for m in db.session.query(Message))
        assert stored == [("alice@example.com", ""), ("alice@example.com", ""),
                          ("bob@example.com", ""), ("bob@example.com", "news")]


def test_catch_all_makes_a_mailbox_once_per_batch(app_factory):
    app = app_factory(dict(SHIPPED_STORAGE, catch_all=True))
    with app.app_context():
        jobs = [job(1, ["fresh42@example.com"]), job(2, ["Fresh42+x@example.com"]), job(3, ["admin@example.com"])]
        smtpserver.store_batch(jobs)
        assert [j.reply.split(" ")[0] for j in jobs] == ["250", "250", "550"]
        assert db.session.query(Mailbox).filter_by(address="fresh42@example.com").count() == 1
        assert db.session.query(Message).count() == 2


def test_the_writer_stores_what_sqlalchemy_would_write(app_factory):
    """The writer's rows go in on the raw connection: every value must be
    written in the form SQLAlchemy writes and reads back (SQLite: a date's
    text with microseconds, which the duplicate filter compares as text)."""
    app = app_factory(SHIPPED_STORAGE)
    with app.app_context():
        Mailbox.create("alice", Domain.by_name("example.com"), 3600)
        with statements() as seen:
            smtpserver.store_batch([job(1, ["alice@example.com"]), job(2, ["alice+t@example.com"])])
        assert any(sql.startswith("INSERT INTO messages") for sql in seen)
        db.session.expunge_all()
        stored = {m.subject: m for m in db.session.query(Message)}
        assert sorted(stored) == ["batch 1", "batch 2"] and stored["batch 2"].tag == "t"
        raw = db.session.execute(text("SELECT received_at, is_read FROM messages ORDER BY id")).all()
        date_type = Message.__table__.c.received_at.type
        for msg, (received, is_read) in zip(sorted(stored.values(), key=lambda m: m.id), raw):
            written = date_type.dialect_impl(db.engine.dialect).bind_processor(db.engine.dialect)
            assert received == (written(msg.received_at) if written else msg.received_at)
            assert not is_read
        # A small message keeps its bytes in a row of its own, not in a blob.
        assert storage.own_source(stored["batch 1"].id) == storage.read_source(stored["batch 1"]) == bytes(message(1))
        assert db.session.execute(text("SELECT count(*) FROM blobs")).scalar() == 0


def test_a_left_over_chunk_row_is_replaced_not_doubled(app_factory):
    app = app_factory(SHIPPED_STORAGE)
    with app.app_context():
        Mailbox.create("alice", Domain.by_name("example.com"), 3600)
        data = b"left over attachment bytes"
        sha = storage.digest(data)
        # A chunk row with no blobs row: a migration copy that raced the blob's deletion.
        db.session.execute(text("INSERT INTO blob_chunks (sha256, seq, data) VALUES (:sha, 0, :data)"),
                           {"sha": sha, "data": data})
        db.session.commit()
        one = smtpserver.Job(bytearray(
            b"From: <s@source.test>\r\nSubject: att\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=a.bin\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(data) + b"\r\n--b--\r\n"),
            ["alice@example.com"], "s@source.test", "test", None)
        smtpserver.store_batch([one])
        assert one.reply.startswith("250 ")
        assert db.session.query(Attachment).one().sha256 == sha
        rows = db.session.execute(text("SELECT count(*) FROM blob_chunks WHERE sha256 = :sha"), {"sha": sha})
        assert rows.scalar() == 1
        assert storage.read(sha) == data


@pytest.mark.parametrize("reply", [
    "250 2.1.5 OK", "250-mail.example\r\n250-SIZE 26214400\r\n250 HELP", "", "550 5.1.1 <a\x00b@x>: no",
    "550 5.1.1 <zoë@exämple.org>: User unknown", "501 bad\rline", "452 4.5.3 tab\there", "250 \u2028sep",
    "221 2.0.0 Bye\r\n",
])
def test_the_plain_reply_shortcut_sends_what_escaping_would(reply):
    if smtpserver.PLAIN_REPLY.match(reply):
        for ascii_only in (True, False):
            assert "\r\n".join(logsafe.escape(line, ascii_only) for line in reply.split("\r\n")) == reply
    else:
        assert any(logsafe.escape(line, True) != line for line in reply.split("\r\n"))
