"""Retention: bounded purge of expired mailboxes (also while mail arrives),
the per-mailbox cap and orphan repair, on SQLite and PostgreSQL."""
from __future__ import annotations

import os
import threading
import time

from sqlalchemy import func, select

from models import Attachment, Domain, Mailbox, Message, db
import mailhandler  # noqa: E402
import storage  # noqa: E402
import retention  # noqa: E402


def new_box(name: str, lifetime: int = 3600) -> Mailbox:
    return Mailbox.create(name, Domain.by_name("example.com"), lifetime)


def store(box: Mailbox, subject: str = "hi", attachments: int = 1) -> Message:
    parts = [{"filename": f"f{i}.txt", "data": f"{subject}-{i}".encode()} for i in range(attachments)]
    msg = mailhandler.store_message(box, {"subject": subject}, f"Subject: {subject}\r\n\r\nbody".encode(), parts)
    db.session.commit()
    return msg


def files_on_disk(app) -> set[str]:
    root = app.config["UPLOADS_DIR"]
    found = set()
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if not name.startswith("."):
                found.add(name)  # a blob's file is named by its SHA-256
    return found


def referenced_files() -> set[str]:
    paths = set(db.session.scalars(select(Message.raw_sha256)))
    return paths | set(db.session.scalars(select(Attachment.sha256)))


def count(model) -> int:
    return db.session.scalar(select(func.count()).select_from(model))


def test_purge_removes_expired_mailboxes_messages_and_files(app, clock):
    with app.app_context():
        old, live = new_box("oldbox", 60), new_box("livebox", 3600)
        for i in range(3):
            store(old, f"old{i}", attachments=2)
        keep = store(live, "keep")
        clock.advance(120)
        result = retention.purge_expired()
        assert result == {"mailboxes": 1, "messages": 3}
        assert [b.address for b in db.session.scalars(select(Mailbox))] == ["livebox@example.com"]
        assert count(Message) == 1 and count(Attachment) == 1
        assert files_on_disk(app) == referenced_files() == {keep.raw_sha256, keep.attachments[0].sha256}
        assert retention.purge_expired() == {"mailboxes": 0, "messages": 0}


def test_purge_bounds_every_transaction(app, clock):
    """A mailbox with many messages is emptied in batches, never in one go."""
    with app.app_context():
        big = new_box("bigbox", 60)
        for i in range(23):
            store(big, f"m{i}", attachments=0)
        for i in range(5):
            new_box(f"empty{i}", 60)
        clock.advance(120)
        batches = []
        result = retention.purge_expired(batch_size=4, progress=batches.append)
        assert result == {"mailboxes": 6, "messages": 23}
        assert max(batches) <= 4 and sum(batches) == 29
        assert count(Mailbox) == 0 and files_on_disk(app) == set()


def test_purge_while_mail_arrives(app, clock):
    """A writer stores into live mailboxes during the purge: nothing live is
    removed, nothing expired is left, no file is orphaned."""
    with app.app_context():
        expired = [new_box(f"gone{i}", 60) for i in range(12)]
        for box in expired:
            for j in range(6):
                store(box, f"{box.username}-{j}")
        clock.advance(120)
        live_ids = [new_box(f"live{i}", 3600).id for i in range(4)]
    stored, errors = [], []

    def writer():
        try:
            with app.app_context():
                for i in range(60):
                    box = db.session.get(Mailbox, live_ids[i % len(live_ids)])
                    stored.append(store(box, f"new{i}").id)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    with app.app_context():
        result = retention.purge_expired(batch_size=5)
    thread.join()
    assert not errors
    with app.app_context():
        assert result == {"mailboxes": 12, "messages": 72}
        assert sorted(db.session.scalars(select(Mailbox.id))) == sorted(live_ids)
        assert sorted(db.session.scalars(select(Message.id))) == sorted(stored)
        assert files_on_disk(app) == referenced_files()
        assert len(files_on_disk(app)) == 2 * len(stored)


def test_trim_mailbox_keeps_the_newest(app_factory):
    app = app_factory({"max_messages_per_mailbox": 3})
    with app.app_context():
        box = new_box("capped")
        oldest = store(box, "m0").raw_sha256
        for i in range(1, 5):
            store(box, f"m{i}")
        trimmed = retention.trim_mailbox(box.id)
        assert trimmed.count == 2
        storage.commit_removal(trimmed.freed)
        assert list(db.session.scalars(select(Message.subject).order_by(Message.id))) == ["m2", "m3", "m4"]
        assert files_on_disk(app) == referenced_files()
        assert oldest not in files_on_disk(app)
        assert retention.trim_mailbox(box.id).count == 0


def test_trim_without_cap_is_off(app):
    with app.app_context():
        box = new_box("uncapped")
        for i in range(4):
            store(box, f"m{i}", attachments=0)
        assert retention.max_messages_per_mailbox() == 0
        assert retention.trim_mailbox(box.id).count == 0
        assert retention.trim_all_mailboxes() == 0
        assert count(Message) == 4


def test_trim_all_mailboxes_in_batches(app_factory):
    app = app_factory({"max_messages_per_mailbox": 2})
    with app.app_context():
        boxes = [new_box(f"box{i}") for i in range(3)]
        for box, n in zip(boxes, (7, 2, 4)):
            for j in range(n):
                store(box, f"{box.username}-{j}", attachments=0)
        batches = []
        assert retention.trim_all_mailboxes(batch_size=2, progress=batches.append) == 7
        assert max(batches) <= 2
        per_box = dict(db.session.execute(select(Message.mailbox_id, func.count()).group_by(Message.mailbox_id)).all())
        assert per_box == {boxes[0].id: 2, boxes[1].id: 2, boxes[2].id: 2}
        assert set(db.session.scalars(select(Message.subject).where(Message.mailbox_id == boxes[0].id))) \
            == {"box0-5", "box0-6"}


def age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_orphan_files_are_removed_after_the_grace_period(app):
    with app.app_context():
        msg = store(new_box("orphans"), "kept")
        root = storage.uploads_dir()
        (root / "20200101").mkdir(parents=True)
        stray = root / "20200101" / "stray.bin"
        stray.write_bytes(b"no row")
        fresh = root / "20200101" / "fresh.eml"
        fresh.write_bytes(b"being stored right now")
        tmp = root / "20200101" / "half.tmp"
        tmp.write_bytes(b"interrupted write")
        (root / ".htaccess").write_text("Require all denied\n")
        for path in (stray, tmp, root / ".htaccess", storage.blob_path(msg.raw_sha256)):
            age(path, 7200)
        removed = retention.remove_orphans(grace_seconds=3600)
        assert sorted(removed) == ["20200101/half.tmp", "20200101/stray.bin"]
        assert fresh.exists() and (root / ".htaccess").exists()
        assert storage.blob_path(msg.raw_sha256).exists()
        assert storage.blob_path(msg.attachments[0].sha256).exists()
        fresh.unlink()
        age(root / "20200101", 7200)
        retention.remove_orphans(grace_seconds=3600)
        assert not (root / "20200101").exists()


def test_rows_whose_files_are_gone_are_reported(app):
    with app.app_context():
        box = new_box("missing")
        a, b = store(box, "a"), store(box, "b", attachments=2)
        storage.blob_path(a.raw_sha256).unlink()
        storage.blob_path(b.attachments[1].sha256).unlink()
        assert retention.find_missing(batch_size=1) == {
            "messages": [a.id], "attachments": [b.attachments[1].id]}
        assert count(Message) == 2
