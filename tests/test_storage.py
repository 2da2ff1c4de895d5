"""The blob storage suite, written once and run against every store: both
backends on both databases (SQLite, PostgreSQL), as Inbucket runs one
storage suite for each of its stores. Three stores: ``filesystem`` with
every blob in a file (``inline_max_bytes`` 0), ``inline`` (the filesystem
backend as shipped: blobs up to 128 KiB are rows, larger ones files) and
``database``.

What it holds each store to: one copy per distinct blob, counted and freed
with its last user; bytes that read back exactly and stream (a 25 MiB blob
in and out without a second whole copy in memory); a commit that carries
the bytes with the rows; a rollback that leaves nothing; purge, orphan sweep
and ``find_missing``; and concurrent deliveries racing deletions of the
same blob.
"""
from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc
from pathlib import Path

import pytest
from sqlalchemy import event, func, select, text

from app import create_app
from conftest import TEST_DOMAINS, dispose
import mailhandler
import retention
import storage
from models import OWN_SOURCE, Attachment, Blob, BlobChunk, Domain, Mailbox, Message, MessageSource, db

MIB = 1 << 20
INLINE_MAX = 128 * 1024  # settings.py's default storage.inline_max_bytes
STORES = {"filesystem": {"backend": "filesystem", "inline_max_bytes": 0},
          "inline": {"backend": "filesystem"},
          "database": {"backend": "database"}}


@pytest.fixture(params=list(STORES))
def blob_backend(request) -> str:
    return request.param


@pytest.fixture
def store_app(app_factory, blob_backend):
    """An app on this test's database whose blobs go to ``blob_backend``."""
    return app_factory({"storage": STORES[blob_backend]})


def kept_in(store: str, size: int) -> str:
    """Where ``store`` keeps a blob of ``size`` bytes: "filesystem" or "database"."""
    if store == "inline":
        return "database" if size <= INLINE_MAX else "filesystem"
    return store


# --------------------------------------------------------------------------
# helpers

def new_box(name: str, lifetime: int = 3600) -> Mailbox:
    return Mailbox.create(name, Domain.by_name("example.com"), lifetime)


def store(box: Mailbox, subject: str, *blobs: bytes) -> Message:
    """One message whose attachments carry exactly ``blobs``, committed durably."""
    parts = [{"filename": f"part{i}.bin", "data": data} for i, data in enumerate(blobs)]
    raw = f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode()
    return mailhandler.store_message(box, {"subject": subject}, raw, parts)


def raw_blobs(store: str, *msgs: Message) -> set:
    """The digests of ``msgs`` whose raw bytes ``store`` keeps as blobs (the
    others are rows of their own: ``storage.source_in_row``)."""
    return {m.raw_sha256 for m in msgs if not (kept_in(store, m.size) == "database" and m.size <= storage.CHUNK)}


def copies(sha: str) -> dict:
    """Where the bytes of ``sha`` are kept right now: a file? how many chunk rows?"""
    chunks = db.session.scalar(select(func.count()).select_from(BlobChunk).where(BlobChunk.sha256 == sha))
    return {"file": storage.blob_path(sha).is_file(), "chunks": chunks}


def expected_copies(store: str, size: int) -> dict:
    """One copy, where the configured store keeps a blob of that size only."""
    chunks = max(1, -(-size // storage.CHUNK))
    return {"file": True, "chunks": 0} if kept_in(store, size) == "filesystem" else {"file": False, "chunks": chunks}


def refs(sha: str):
    return db.session.scalar(select(Blob.refs).where(Blob.sha256 == sha))


def users_of(sha: str) -> int:
    """Rows that really name ``sha`` (what ``blobs.refs`` must equal); a
    message whose bytes are in a row of its own does not use a blob."""
    raw = db.session.scalar(select(func.count(Message.id)).where(Message.raw_sha256 == sha, ~OWN_SOURCE))
    att = db.session.scalar(select(func.count(Attachment.id)).where(Attachment.sha256 == sha))
    return raw + att


def assert_counts_exact() -> None:
    """Every blob row counts exactly the rows that use it, and every used blob is readable."""
    for sha, n in db.session.execute(select(Blob.sha256, Blob.refs)).all():
        assert n == users_of(sha), sha
        assert storage.exists(sha), sha
    db.session.rollback()


def nothing_stored(app) -> bool:
    """No blob row, no chunk row, no blob file, no message's own row."""
    rows = db.session.scalar(select(func.count()).select_from(Blob))
    chunks = db.session.scalar(select(func.count()).select_from(BlobChunk))
    sources = db.session.scalar(select(func.count()).select_from(MessageSource))
    files = [p for p in (Path(app.config["UPLOADS_DIR"]) / "blobs").rglob("*") if p.is_file()]
    return rows == 0 and chunks == 0 and sources == 0 and not files


# --------------------------------------------------------------------------
# put, dedupe, reference counts, free on last release

def test_each_blob_is_stored_once_and_freed_with_its_last_user(store_app, blob_backend):
    with store_app.app_context():
        box = new_box("dedupe")
        shared, other = b"S" * (storage.CHUNK + 10), b"other bytes"
        msgs = [store(box, f"m{i}", shared) for i in range(3)] + [store(box, "m3", other)]
        sha = storage.digest(shared)
        assert refs(sha) == 3 and copies(sha) == expected_copies(blob_backend, len(shared))
        for left, msg in zip((2, 1), msgs[:2]):
            storage.commit_removal(msg.delete())
            assert refs(sha) == left and storage.read(sha) == shared
        storage.commit_removal(msgs[2].delete())
        assert refs(sha) is None and copies(sha) == {"file": False, "chunks": 0}
        assert storage.read(storage.digest(other)) == other
        storage.commit_removal(msgs[3].delete())
        assert nothing_stored(store_app)


@pytest.mark.parametrize("size", [20, MIB - 100, MIB + 1])
def test_a_message_reads_back_as_received_wherever_its_bytes_are(store_app, blob_backend, size):
    """A message's raw bytes are a row of its own where the store keeps a
    blob of that size in the database (one chunk at most), else a blob.
    Either way they read back and download exactly, the integrity check
    misses nothing, and deleting the message leaves nothing behind."""
    raw = b"Subject: source\r\n\r\n" + b"x" * size + b"\r\n"
    with store_app.app_context():
        msg = mailhandler.store_message(new_box("source"), {"subject": "source"}, raw)
        in_row = kept_in(blob_backend, len(raw)) == "database" and len(raw) <= storage.CHUNK
        assert (storage.own_source(msg.id) is not None) == in_row
        assert refs(msg.raw_sha256) == (None if in_row else 1)
        assert storage.read_source(msg) == raw and b"".join(storage.source_chunks(msg)) == raw
        assert retention.find_missing() == {"messages": [], "attachments": []}
        with store_app.test_request_context():
            resp = storage.download_source(msg, "m.eml")
            resp.direct_passthrough = False
            assert resp.get_data() == raw and resp.mimetype == "message/rfc822"
            assert resp.headers["Content-Disposition"].startswith("attachment")
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            resp.close()
        storage.commit_removal(msg.delete())
        assert nothing_stored(store_app) and storage.read_source(msg) is None


@pytest.mark.parametrize("size", [0, 1, MIB - 1, MIB, MIB + 1, 3 * MIB + 5])
def test_bytes_read_back_exactly_whatever_the_size(store_app, blob_backend, size):
    with store_app.app_context():
        data = os.urandom(size)
        msg = store(new_box(f"size{size}"), "sizes", data)
        att = msg.attachments[0]
        assert copies(att.sha256) == expected_copies(blob_backend, size)
        assert storage.read(att.sha256) == data
        url = att.legacy_url()
    resp = store_app.test_client().get(url)
    assert resp.status_code == 200 and resp.data == data
    assert resp.headers["Content-Length"] == str(size)


# --------------------------------------------------------------------------
# streaming: 25 MiB in and out without a second whole copy

def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns it in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kib()["VmHWM"]


def rss_kib() -> dict:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


class Measured:
    """Peak Python allocations (tracemalloc) and peak RSS growth of a block."""

    def __enter__(self):
        self.rss0 = reset_peak_rss()
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.rss_growth = (rss_kib()["VmHWM"] - self.rss0) * 1024
        return False

    def text(self) -> str:
        return f"peak traced {self.traced_peak / MIB:.1f} MiB, peak RSS +{self.rss_growth / MIB:.1f} MiB"


def test_a_25_mib_blob_streams_in_and_out(store_app, blob_backend, backend):
    big = os.urandom(25 * MIB)
    with store_app.app_context():
        box = new_box("bigblob")
        with Measured() as put:
            msg = store(box, "big", big)
        url, sha = msg.attachments[0].legacy_url(), msg.attachments[0].sha256
    client = store_app.test_client()
    hasher, received = hashlib.sha256(), 0
    with Measured() as get:
        resp = client.get(url, buffered=False)
        for part in resp.response:
            hasher.update(part)
            received += len(part)
        resp.close()
    print(f"\n[storage {blob_backend}/{backend}] store 25 MiB: {put.text()}; download: {get.text()}")
    assert received == len(big) and hasher.hexdigest() == sha
    # The bytes are held once by the caller; storing them may add a chunk's
    # worth of driver buffers, never another whole copy. Downloading holds
    # one chunk at a time.
    assert put.traced_peak < 6 * MIB and get.traced_peak < 6 * MIB
    assert put.rss_growth < 12 * MIB and get.rss_growth < 12 * MIB


# --------------------------------------------------------------------------
# durability: the bytes are committed with the rows, or before them

def observe(engine) -> dict:
    """What another connection sees committed: message rows, blob rows, chunk rows."""
    with engine.connect() as conn:
        return {name: conn.scalar(text(f"SELECT count(*) FROM {name}"))
                for name in ("messages", "blobs", "blob_chunks", "message_sources")}


def test_a_commit_carries_the_bytes_with_the_rows(store_app, blob_backend):
    """Right before the commit, another connection sees none of the rows; a
    database backend's chunks are in that same transaction, a filesystem
    backend's file is already complete. Right after, all of it."""
    data = os.urandom(2 * MIB + 3)
    seen = {}
    with store_app.app_context():
        box = new_box("durable")
        engine = db.engine

        def before_commit(session):
            if "before" not in seen:
                seen["before"] = observe(engine)
                seen["file_before"] = storage.blob_path(storage.digest(data)).is_file()

        event.listen(db.session, "before_commit", before_commit)
        try:
            msg = store(box, "durable", data)
        finally:
            event.remove(db.session, "before_commit", before_commit)
        after = observe(engine)
        sha = msg.attachments[0].sha256
    assert seen["before"] == {"messages": 0, "blobs": 0, "blob_chunks": 0, "message_sources": 0}
    assert seen["file_before"] == (kept_in(blob_backend, len(data)) == "filesystem")
    # The attachment: 3 chunks in the database; the small raw message: a
    # row of its own where the store keeps small blobs in the database, else a file.
    chunks = 3 if blob_backend == "database" else 0
    in_row = blob_backend != "filesystem"
    assert after == {"messages": 1, "blobs": 1 if in_row else 2, "blob_chunks": chunks, "message_sources": int(in_row)}
    with store_app.app_context():
        assert hashlib.sha256(storage.read(sha)).hexdigest() == sha


def test_sqlite_wal_is_synced_after_the_commit(tmp_path, clock, blob_backend, monkeypatch):
    """On SQLite (synchronous=NORMAL) the WAL holding the rows, and with the
    database backend the chunks, is fsynced once the commit is done; the
    filesystem backend's files are synced before it. (PostgreSQL's COMMIT
    syncs its WAL by itself with synchronous_commit=on, its default; the
    suite's throw-away server turns that off for speed, so SQLite is where
    the order can be watched.)"""
    conf = {"database_url": f"sqlite:///{tmp_path}/wal.db", "uploads_dir": str(tmp_path / "uploads"),
            "domains": TEST_DOMAINS, "storage": STORES[blob_backend]}
    app = create_app({"TESTING": True, "CLOCK": clock, "FSYNC": True, "TEMPMAIL": conf})
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    with app.app_context():
        box = new_box("walsync")
        monkeypatch.setattr(os, "fsync", recording_fsync)
        msg = store(box, "wal", os.urandom(MIB))
    dispose([app])
    wal = [i for i, p in enumerate(synced) if p.endswith("-wal")]
    assert wal, synced
    blob_files = [i for i, p in enumerate(synced) if "/blobs/" in p]
    if blob_backend != "database":
        # Two files (raw + attachment) are synced by one syncfs(2), else one by one.
        assert not blob_files or max(blob_files) < wal[-1]
    else:
        assert not blob_files
    assert msg.id


# --------------------------------------------------------------------------
# rollback

def test_a_rolled_back_delivery_leaves_nothing(store_app, blob_backend):
    with store_app.app_context():
        box = new_box("rollback")
        kept_bytes = b"kept by an earlier message"
        kept = store(box, "kept", kept_bytes)
        kept_sha = kept.attachments[0].sha256

        def fail(session):
            raise RuntimeError("the database went away at commit")

        event.listen(db.session, "before_commit", fail)
        try:
            with pytest.raises(mailhandler.StoreFailed):
                store(box, "doomed", kept_bytes, os.urandom(MIB + 7))
        finally:
            event.remove(db.session, "before_commit", fail)
        assert db.session.scalar(select(func.count(Message.id))) == 1
        assert refs(kept_sha) == 1 and storage.read(kept_sha) == kept_bytes
        # The kept message's raw bytes: a blob (a file) when every blob is a
        # file, else a row of its own; its attachment: a file, else a chunk row.
        in_files = blob_backend == "filesystem"
        blobs = {kept_sha, kept.raw_sha256} if in_files else {kept_sha}
        assert {sha for (sha,) in db.session.execute(select(Blob.sha256))} == blobs
        assert db.session.scalar(select(func.count()).select_from(MessageSource)) == (0 if in_files else 1)
        rows = set(db.session.scalars(select(BlobChunk.sha256).distinct()))
        assert rows == (set() if in_files else blobs)
        files = {p.name for p in (Path(store_app.config["UPLOADS_DIR"]) / "blobs").rglob("*") if p.is_file()}
        assert files == (blobs if in_files else set())


# --------------------------------------------------------------------------
# purge, orphans, missing bytes

def test_purge_frees_the_blobs_only_expired_mail_used(store_app, blob_backend, clock):
    with store_app.app_context():
        old, live = new_box("oldpurge", 60), new_box("livepurge", 7200)
        shared, alone = b"in both mailboxes", b"only in the expired one"
        for i in range(3):
            store(old, f"old{i}", shared, alone)
        keep = store(live, "live", shared)
        clock.advance(120)
        assert retention.purge_expired(batch_size=2) == {"mailboxes": 1, "messages": 3}
        assert refs(storage.digest(shared)) == 1 and storage.read(storage.digest(shared)) == shared
        assert copies(storage.digest(alone)) == {"file": False, "chunks": 0}
        assert {sha for (sha,) in db.session.execute(select(Blob.sha256))} == {
            storage.digest(shared)} | raw_blobs(blob_backend, keep)
        assert_counts_exact()


def test_orphan_sweep_and_missing_bytes(store_app, blob_backend):
    with store_app.app_context():
        box = new_box("sweep")
        a, b = store(box, "a", b"bytes of a"), store(box, "b", b"bytes of b", b"second part of b")
        # A blob row nothing uses, with its bytes (a state only a bug or a
        # crash between transactions leaves), and chunk rows no blob row names.
        stray, loose = b"nobody uses me", b"chunks without a row"
        pending = storage.PendingBlobs()
        pending.add(stray)
        storage.commit_durably(pending)
        db.session.execute(BlobChunk.__table__.insert(),
                           {"sha256": storage.digest(loose), "seq": 0, "data": loose})
        db.session.commit()
        removed = retention.remove_orphans(grace_seconds=0)
        assert storage.digest(stray) in removed and f"chunks/{storage.digest(loose)}" in removed
        assert not storage.exists(storage.digest(stray)) and not storage.exists(storage.digest(loose))
        assert_counts_exact()
        assert retention.find_missing() == {"messages": [], "attachments": []}
        lose(a.raw_sha256, a.id)
        lose(b.attachments[1].sha256)
        assert retention.find_missing(batch_size=1) == {"messages": [a.id], "attachments": [b.attachments[1].id]}


def test_a_message_to_several_mailboxes_shares_one_blob(store_app, blob_backend):
    """Only a message stored once keeps its bytes in a row of its own: one
    delivery to several mailboxes stores its bytes once, as one blob they
    all count, so a sender cannot multiply its bytes on disk by its RCPTs."""
    raw = b"Subject: many\r\n\r\n" + b"m" * 60_000 + b"\r\n"
    with store_app.app_context():
        boxes = [new_box(f"many{i}").address for i in range(10)]
        msgs = mailhandler.deliver(raw, boxes)
        assert len(msgs) == 10 and {m.raw_sha256 for m in msgs} == {storage.digest(raw)}
        assert refs(storage.digest(raw)) == 10 and copies(storage.digest(raw)) == expected_copies(
            blob_backend, len(raw))
        assert db.session.scalar(select(func.count()).select_from(MessageSource)) == 0
        assert all(storage.read_source(m) == raw for m in msgs)
        print(f"\n[storage {blob_backend}] a {len(raw):,}-byte message to 10 mailboxes: its bytes stored once")


def test_a_blob_that_only_a_message_with_its_own_row_names_is_swept(store_app, blob_backend):
    """A message whose bytes are in its own row names its digest but uses no
    blob: a leaked blob row of the same bytes is an orphan (and where the
    message's bytes are that blob, the blob is used and stays)."""
    raw = b"Subject: own\r\n\r\nown row\r\n"
    with store_app.app_context():
        msg = mailhandler.store_message(new_box("ownrow"), {"subject": "own"}, raw)
        pending = storage.PendingBlobs()
        pending.add(raw)  # a reference nobody holds: a crash between two transactions
        storage.commit_durably(pending)
        in_row = storage.own_source(msg.id) is not None
        assert in_row == (blob_backend != "filesystem")
        assert (msg.raw_sha256 in retention.remove_orphans(grace_seconds=0)) == in_row
        assert storage.read_source(msg) == raw


def lose(sha: str, msg_id: int = 0) -> None:
    """The bytes of ``sha`` (and message ``msg_id``'s own row of them)
    vanish behind the application's back (a disk error, an operator's rm,
    a bad restore)."""
    storage.blob_path(sha).unlink(missing_ok=True)
    db.session.execute(BlobChunk.__table__.delete().where(BlobChunk.__table__.c.sha256 == sha))
    db.session.execute(MessageSource.__table__.delete().where(MessageSource.__table__.c.message_id == msg_id))
    db.session.commit()


# --------------------------------------------------------------------------
# concurrency: the same blob delivered and deleted at once

def in_threads(app, workers: list) -> list:
    """Run each callable in its own thread with its own app context (and so
    its own session); returns the exceptions raised."""
    errors: list = []

    def run(work):
        with app.app_context():
            try:
                work()
            except Exception as exc:  # reported to the test below
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


def test_concurrent_deliveries_of_one_blob_store_it_once(store_app, blob_backend):
    shared = os.urandom(MIB + 1)
    with store_app.app_context():
        boxes = [new_box(f"conc{i}").id for i in range(4)]

    def deliver_to(box_id):
        def work():
            box = db.session.get(Mailbox, box_id)
            for n in range(6):
                store(box, f"c{box_id}-{n}", shared)
        return work

    assert in_threads(store_app, [deliver_to(b) for b in boxes]) == []
    with store_app.app_context():
        sha = storage.digest(shared)
        assert refs(sha) == 24 == users_of(sha)
        assert copies(sha) == expected_copies(blob_backend, len(shared))
        assert_counts_exact()


def split_delivery(box: Mailbox, data: bytes, subject: str) -> mailhandler.DeliveryBatch:
    """Stage (not commit) a message carrying ``data``, as a receiver does
    before its commit: the filesystem backend has written or found the file."""
    batch = mailhandler.DeliveryBatch()
    fields = {"subject": subject, "attachments": [{"filename": "x.bin", "data": data}]}
    raw = f"Subject: {subject}\r\n\r\n.".encode()
    mailhandler.store_copy(box, None, fields, raw, storage.digest(raw), "", batch)
    return batch


@pytest.mark.parametrize("order", ["discard-before-commit", "commit-before-discard"])
def test_a_deletion_racing_a_delivery_of_the_same_blob(store_app, blob_backend, order):
    """The last user of blob X is deleted while a delivery of X is staged:
    whichever finishes first, the delivered message keeps its bytes
    (``storage.discard``'s re-check and ``PendingBlobs.after_commit``)."""
    data = b"the blob both race for" * 1000
    with store_app.app_context():
        box_id = new_box("race").id
        first_id = store(db.session.get(Mailbox, box_id), "first", data).id
    steps = [threading.Event() for _ in range(4)]
    result = {}

    def deleter():
        freed = db.session.get(Message, first_id).delete()
        db.session.commit()  # the blob row is gone: the file is the next to go
        steps[0].set()
        steps[1].wait(30)
        if order == "commit-before-discard":
            steps[2].wait(30)
        storage.discard(freed)
        steps[3].set()

    def deliverer():
        steps[0].wait(30)
        batch = split_delivery(db.session.get(Mailbox, box_id), data, "second")
        steps[1].set()
        if order == "discard-before-commit":
            steps[3].wait(30)
        batch.commit()
        result["id"] = next(iter(batch.copies.values())).id
        steps[2].set()

    assert in_threads(store_app, [deleter, deliverer]) == []
    with store_app.app_context():
        msg = db.session.get(Message, result["id"])
        assert storage.read(msg.attachments[0].sha256) == data
        assert refs(storage.digest(data)) == 1
        assert_counts_exact()


def test_deliveries_and_deletions_of_one_blob_hammered_together(store_app, blob_backend):
    """Two threads deliver the same attachment over and over while a third
    deletes whatever is there: at the end every surviving message reads
    back, every count is exact, and deleting the rest leaves nothing."""
    data = os.urandom(64 * 1024)
    with store_app.app_context():
        box_id = new_box("hammer").id
    stop = threading.Event()

    def deliver():
        box = db.session.get(Mailbox, box_id)
        for n in range(25):
            store(box, f"h{threading.get_ident()}-{n}", data)
        stop.set()

    def delete_all():
        while not stop.is_set():
            for (msg_id,) in db.session.execute(select(Message.id).where(Message.mailbox_id == box_id)).all():
                msg = db.session.get(Message, msg_id)
                if msg is not None:
                    storage.commit_removal(msg.delete())

    assert in_threads(store_app, [deliver, deliver, delete_all]) == []
    with store_app.app_context():
        assert_counts_exact()
        for msg in db.session.scalars(select(Message)):
            assert storage.read(msg.attachments[0].sha256) == data
        storage.commit_removal(db.session.get(Mailbox, box_id).delete())
        assert nothing_stored(store_app)


def test_two_purges_at_once_release_each_blob_once(store_app, blob_backend, clock):
    """Two purges (two hosts' timers) over the same expired mail: each blob
    still in use elsewhere keeps its exact count (no double release)."""
    with store_app.app_context():
        live = new_box("stays", 7200)
        shared = b"shared with a live mailbox"
        store(live, "live", shared)
        for i in range(6):
            box = new_box(f"expires{i}", 60)
            for n in range(10):
                store(box, f"e{i}-{n}", shared)
        clock.advance(120)
    totals: list[dict] = []
    errors = in_threads(store_app, [lambda: totals.append(retention.purge_expired(batch_size=7))] * 2)
    assert errors == []
    with store_app.app_context():
        assert refs(storage.digest(shared)) == 1 and storage.read(storage.digest(shared)) == shared
        assert db.session.scalar(select(func.count(Message.id))) == 1
        assert sum(t["messages"] for t in totals) == 60 and sum(t["mailboxes"] for t in totals) == 6
        assert_counts_exact()
