"""The maintenance commands, with good and bad arguments: flask purge, stats,
reparse, import, init-db."""
from __future__ import annotations

import json
import mailbox
import os

from sqlalchemy import func, select

from ops import counted
from models import Domain, Mailbox, Message, db
import mailhandler  # noqa: E402
import storage  # noqa: E402

RAW = (b"From: Alice Example <alice@sender.test>\r\nTo: box@example.com\r\n"
       b"Subject: Fresh subject\r\nMessage-ID: <m1@sender.test>\r\n"
       b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
       b"--XX\r\nContent-Type: text/plain\r\n\r\nHello there\r\n"
       b"--XX\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=notes.txt\r\n\r\n"
       b"attached words\r\n--XX--\r\n")


def eml(n: int) -> bytes:
    return (f"From: sender{n}@sender.test\r\nTo: box@example.com\r\nSubject: number {n}\r\n\r\n"
            f"body {n}\r\n").encode()


def new_box(name: str = "box", lifetime: int = 3600) -> Mailbox:
    return Mailbox.create(name, Domain.by_name("example.com"), lifetime)


def subjects() -> list[str]:
    return list(db.session.scalars(select(Message.subject).order_by(Message.id)))


# -------------------------------------------------------------------- purge

def test_purge_command(app, runner, clock):
    with app.app_context():
        box = new_box("old", 60)
        for i in range(2):
            mailhandler.store_message(box, {"subject": str(i)}, eml(i))
        db.session.commit()
    clock.advance(120)
    result = runner.invoke(args=["purge"])
    assert result.exit_code == 0, result.output
    assert "Removed 1 expired mailbox and 2 messages." in result.stdout
    assert "Purging expired mail" in result.stderr
    assert "No per-mailbox cap configured" in result.stdout
    assert "Removed 0 orphaned files." in result.stdout
    with app.app_context():
        assert db.session.scalar(select(func.count(Mailbox.id))) == 0


def test_purge_command_reports_missing_files_and_applies_the_cap(app_factory):
    app = app_factory({"max_messages_per_mailbox": 1})
    with app.app_context():
        box = new_box()
        msgs = [mailhandler.store_message(box, {"subject": str(i)}, eml(i)) for i in range(3)]
        db.session.commit()
        storage.blob_path(msgs[2].raw_sha256).unlink()
        last_id = msgs[2].id
    result = app.test_cli_runner().invoke(args=["purge", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    assert "Removed 2 messages over the cap of 1 per mailbox." in result.stdout
    assert f"Warning: 1 message whose stored file is gone (ids {last_id})." in result.stdout


def test_purge_command_quiet_prints_warnings_only(app, runner):
    with app.app_context():
        msg = mailhandler.store_message(new_box(), {"subject": "x"}, eml(1))
        db.session.commit()
        storage.blob_path(msg.raw_sha256).unlink()
        msg_id = msg.id
    result = runner.invoke(args=["purge", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output == f"Warning: 1 message whose stored file is gone (ids {msg_id}).\n"
    assert runner.invoke(args=["purge", "--quiet", "--no-orphans"]).output == ""


def test_purge_command_bad_arguments(runner):
    result = runner.invoke(args=["purge", "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size" in result.output
    result = runner.invoke(args=["purge", "--grace", "soon"])
    assert result.exit_code == 2 and "'soon' is not a valid integer" in result.output


# -------------------------------------------------------------------- stats

def test_stats_command(app, runner):
    with app.app_context():
        mailhandler.store_message(new_box(), {"subject": "x"}, eml(1), [{"filename": "a", "data": b"12345"}])
        db.session.commit()
    result = runner.invoke(args=["stats"])
    assert result.exit_code == 0, result.output
    lines = dict(line.rsplit(None, 1) for line in result.stdout.splitlines())
    assert lines["mailboxes live"] == "1" and lines["messages"] == "1"
    assert lines["attachment bytes"] == "5" and lines["domains"] == "3"
    data = json.loads(runner.invoke(args=["stats", "--json"]).stdout)
    assert data["messages"] == 1 and data["total_received"] == 1
    assert runner.invoke(args=["stats", "--yaml"]).exit_code == 2


def test_counts_have_their_noun_in_the_right_number(app, runner, clock):
    assert [counted(n, "message") for n in (0, 1, 2)] == ["0 messages", "1 message", "2 messages"]
    assert counted(1, "expired mailbox", "expired mailboxes") == "1 expired mailbox"
    assert counted(3, "expired mailbox", "expired mailboxes") == "3 expired mailboxes"
    with app.app_context():
        mailhandler.store_message(new_box("old", 60), {"subject": "x"}, eml(1))
        db.session.commit()
        stray = storage.uploads_dir() / "stray.bin"  # no row references it
        stray.write_bytes(b"left behind")
        os.utime(stray, (0, 0))  # older than any grace period
    clock.advance(120)
    result = runner.invoke(args=["purge"])
    assert result.exit_code == 0, result.output
    assert "Removed 1 expired mailbox and 1 message." in result.stdout
    assert "Removed 1 orphaned file." in result.stdout
    assert not stray.exists()


# -------------------------------------------------------------------- reparse

def test_reparse_command_refreshes_fields_and_attachments(app, runner):
    with app.app_context():
        msg = mailhandler.store_message(new_box(), {"subject": "stale", "body_text": "old"}, RAW,
                                   [{"filename": "old.bin", "data": b"old"}])
        db.session.commit()
        old_file = storage.blob_path(msg.attachments[0].sha256)
        msg_id = msg.id
    result = runner.invoke(args=["reparse"])
    assert result.exit_code == 0, result.output
    assert "Re-parsed 1 message." in result.stdout and "Re-parsing messages" in result.stderr
    with app.app_context():
        msg = db.session.get(Message, msg_id)
        assert msg.subject == "Fresh subject" and msg.from_name == "Alice Example"
        assert "Hello there" in msg.body_text
        assert [a.filename for a in msg.attachments] == ["notes.txt"]
        assert storage.blob_path(msg.attachments[0].sha256).read_bytes().strip() == b"attached words"
    assert not old_file.exists()


def test_reparse_reads_a_message_kept_in_a_row_of_its_own(app, runner):
    """As shipped a small message's bytes are a row of their own, not a blob
    (``storage.source_in_row``): ``flask reparse`` reads them from there."""
    app.config["TEMPMAIL"]["storage"]["inline_max_bytes"] = 131072  # as shipped (the suite's app: files)
    with app.app_context():
        msg = mailhandler.store_message(new_box(), {"subject": "stale"}, RAW)
        db.session.commit()
        msg_id = msg.id
        assert storage.own_source(msg_id) == RAW and not storage.exists(msg.raw_sha256)
    result = runner.invoke(args=["reparse", "--id", str(msg_id)])
    assert result.exit_code == 0 and "Re-parsed 1 message." in result.stdout, result.output
    with app.app_context():
        assert db.session.get(Message, msg_id).subject == "Fresh subject"


def test_reparse_command_skips_missing_raw_and_bad_ids(app, runner):
    with app.app_context():
        msg = mailhandler.store_message(new_box(), {"subject": "kept"}, RAW)
        db.session.commit()
        storage.blob_path(msg.raw_sha256).unlink()
        msg_id = msg.id
    result = runner.invoke(args=["reparse", "--id", str(msg_id), "--id", "99999"])
    assert result.exit_code == 0, result.output
    assert "Re-parsed 0 messages." in result.stdout
    assert f"Skipped 2 (missing message or raw file): ids {msg_id}, 99999" in result.stdout
    with app.app_context():
        assert subjects() == ["kept"]
    assert runner.invoke(args=["reparse", "--id", "0"]).exit_code == 2
    assert runner.invoke(args=["reparse", "--id", "abc"]).exit_code == 2


# -------------------------------------------------------------------- import

def test_import_an_mbox(app, runner, tmp_path):
    path = tmp_path / "archive.mbox"
    box = mailbox.mbox(str(path))
    for n in range(3):
        box.add(mailbox.mboxMessage(eml(n)))
    box.flush()
    box.close()
    with app.app_context():
        new_box()
    result = runner.invoke(args=["import", str(path), "--to", "BOX@example.com"])
    assert result.exit_code == 0, result.output
    assert "Imported 3 of 3 messages into box@example.com." in result.stdout
    assert "Importing into box@example.com" in result.stderr
    with app.app_context():
        assert subjects() == ["number 0", "number 1", "number 2"]
        assert db.session.scalar(select(Message.body_text).limit(1)).strip() == "body 0"


def test_import_a_folder_and_a_single_file_with_create(app, runner, tmp_path):
    folder = tmp_path / "mails"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.eml").write_bytes(eml(2))
    (folder / "sub" / "a.eml").write_bytes(eml(1))
    (folder / "skip.txt").write_text("not mail")
    result = runner.invoke(args=["import", str(folder), "--to", "fresh@example.com", "--create"])
    assert result.exit_code == 0, result.output
    assert "Imported 2 of 2 messages into fresh@example.com." in result.stdout
    result = runner.invoke(args=["import", str(folder / "b.eml"), "--to", "fresh@example.com"])
    assert result.exit_code == 0 and "Imported 1 of 1 message into fresh@example.com." in result.stdout
    with app.app_context():
        assert subjects() == ["number 2", "number 1", "number 2"]


def test_import_bad_arguments(app, runner, tmp_path):
    (tmp_path / "empty").mkdir()
    one = tmp_path / "one.eml"
    one.write_bytes(eml(1))
    cases = [
        (["import", str(one)], "Missing option '--to'"),
        (["import", str(tmp_path / "nope"), "--to", "box@example.com"], "does not exist"),
        (["import", str(one), "--to", "not-an-address"], "is not an e-mail address"),
        (["import", str(one), "--to", "ghost@example.com"], "no live mailbox 'ghost@example.com'"),
        (["import", str(one), "--to", "x@elsewhere.test", "--create"], "'elsewhere.test' is not a configured domain"),
        (["import", str(one), "--to", "admin@example.com", "--create"], "cannot create 'admin@example.com': reserved"),
    ]
    with app.app_context():
        new_box()
    cases.append((["import", str(tmp_path / "empty"), "--to", "box@example.com"], "holds no .eml files"))
    for args, message in cases:
        result = runner.invoke(args=args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_import_reports_refused_messages(app_factory, tmp_path):
    app = app_factory({"max_message_bytes": 200})
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "1.eml").write_bytes(eml(1))
    (folder / "2.eml").write_bytes(eml(2) + b"x" * 500)
    with app.app_context():
        new_box()
    result = app.test_cli_runner().invoke(args=["import", str(folder), "--to", "box@example.com"])
    assert result.exit_code == 1
    assert "Imported 1 of 2 messages" in result.stdout
    assert "1 message was not stored" in result.output


# -------------------------------------------------------------------- init-db

def test_init_db_command(runner):
    result = runner.invoke(args=["init-db"])
    assert result.exit_code == 0 and "Database ready (current)." in result.stdout
