"""Nothing lost: 5,000 messages over 16 SMTP connections while the daemon is
SIGKILLed twice, and the web app SIGKILLed in the middle of API deletes.

The daemon answers 250 only after the message and its files are committed
durably, and ``deliver()`` answers a retry of bytes it already stored with the
stored copy; so every 250 means "stored", and every message the client had to
retry is stored exactly once.
"""
from __future__ import annotations

import hashlib
import random
import smtplib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from sqlalchemy import func, select

import mailhandler
import smtpserver
from models import Attachment, Domain, Mailbox, Message, db

from .helpers import Daemon, Gunicorn, build_message, record, write_config
import storage  # noqa: E402
import retention  # noqa: E402

MESSAGES, CONNECTIONS, MAILBOXES = 5000, 16, 20
KILL_AT = (1500, 3300)  # acknowledged messages after which the daemon is killed


def make_mailboxes(app, count: int, prefix: str) -> list[str]:
    with app.app_context():
        domain = Domain.by_name("example.com")
        return [Mailbox.create(f"{prefix}{i}", domain, 86400).address for i in range(count)]


def corpus(addresses: list[str]) -> list[dict]:
    """5,000 distinct messages; every fifth carries one or two binary attachments."""
    rng = random.Random(8)
    items = []
    for n in range(MESSAGES):
        files = []
        if n % 5 == 0:
            files = [(f"file{n}-{k}.bin", rng.randbytes(rng.randint(1, 24) * 1024))
                     for k in range(1 + n % 2)]
        rcpt = addresses[n % len(addresses)]
        items.append({"n": n, "rcpt": rcpt, "data": build_message(n, rcpt, files),
                      "files": {name: hashlib.sha256(data).hexdigest() for name, data in files}})
    return items


class Load:
    """16 clients, each keeping one connection and retrying until it gets a 250."""

    def __init__(self, port: int, items: list[dict]):
        self.port, self.items = port, items
        self.acked = 0
        self.attempts = self.unanswered_data = self.reconnects = 0
        self.permanent: list[str] = []
        self.lock = threading.Lock()

    def run_client(self, mine: list[dict]) -> None:
        conn = None
        for item in mine:
            while True:
                try:
                    conn = conn or self.connect()
                    if self.send(conn, item):
                        break
                except (smtplib.SMTPException, OSError):
                    pass
                conn = self.drop(conn)

    def connect(self) -> smtplib.SMTP:
        """Connect, waiting for a killed daemon to come back."""
        while True:
            try:
                conn = smtplib.SMTP("127.0.0.1", self.port, timeout=60)
                conn.ehlo("loadclient.test")
                return conn
            except (smtplib.SMTPException, OSError):
                time.sleep(0.05)
                with self.lock:
                    self.reconnects += 1

    def drop(self, conn):
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        return None

    def send(self, conn: smtplib.SMTP, item: dict) -> bool:
        """One attempt; True once the message got its 250."""
        with self.lock:
            self.attempts += 1
        code, reply = conn.mail("loader@peer.test")
        if code == 250:
            code, reply = conn.rcpt(item["rcpt"])
        if code == 250:
            try:
                code, reply = conn.data(item["data"])
            except smtplib.SMTPServerDisconnected:
                with self.lock:  # sent, but the daemon died before answering
                    self.unanswered_data += 1
                raise
        if code == 250:
            with self.lock:
                self.acked += 1
            return True
        if code >= 500:
            self.permanent.append(f"{item['n']}: {code} {reply!r}")
            return True  # refused for good: reported by the test, not retried
        conn.rset()
        return False


def check_stored(app, items: list[dict]) -> dict:
    """Every message exactly once, raw file and attachments byte-identical."""
    with app.app_context():
        rows = {m.message_id: m for m in db.session.scalars(select(Message))}
        counts = dict(db.session.execute(select(Message.message_id, func.count()).group_by(Message.message_id)).all())
        dupes = {k: v for k, v in counts.items() if v > 1}
        missing, bad_raw, bad_files = [], [], []
        for item in items:
            msg = rows.get(f"<adv-{item['n']}@peer.test>")
            if msg is None:
                missing.append(item["n"])
                continue
            raw = storage.blob_path(msg.raw_sha256).read_bytes()
            if raw != item["data"] or msg.raw_sha256 != hashlib.sha256(raw).hexdigest():
                bad_raw.append(item["n"])
            got = {a.filename: hashlib.sha256(storage.blob_path(a.sha256).read_bytes()).hexdigest()
                   for a in msg.attachments}
            if got != item["files"]:
                bad_files.append(item["n"])
        return {"rows": len(rows), "dupes": dupes, "missing": missing, "bad_raw": bad_raw,
                "bad_files": bad_files, "attachments": db.session.scalar(select(func.count(Attachment.id)))}


def test_5000_messages_16_connections_two_sigkills(app, tmp_path):
    addresses = make_mailboxes(app, MAILBOXES, "load")
    items = corpus(addresses)
    daemon = Daemon(write_config(app, tmp_path / "smtpd.json"), tmp_path / "smtpd.log").start()
    load = Load(daemon.port, items)
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            clients = [pool.submit(load.run_client, items[i::CONNECTIONS]) for i in range(CONNECTIONS)]
            for threshold in KILL_AT:
                while load.acked < threshold and not all(c.done() for c in clients):
                    time.sleep(0.01)
                daemon.kill()
                time.sleep(0.3)
                daemon.start()
            for client in clients:
                client.result(timeout=300)
    finally:
        daemon.stop()
    elapsed = time.perf_counter() - started
    result = check_stored(app, items)
    record("nothing lost: SMTP", f"{MESSAGES} messages over {CONNECTIONS} connections, daemon SIGKILLed "
           f"{len(KILL_AT)}x and restarted ({daemon.starts} starts) in {elapsed:.1f} s")
    record("nothing lost: SMTP", f"{load.attempts} attempts, {load.attempts - MESSAGES} retried, "
           f"{load.unanswered_data} DATA sent without an answer; {load.acked} got 250")
    record("nothing lost: SMTP", f"stored rows {result['rows']}, duplicates {len(result['dupes'])}, "
           f"missing {len(result['missing'])}, raw or attachment mismatches "
           f"{len(result['bad_raw']) + len(result['bad_files'])} ({result['attachments']} attachments)")
    assert load.permanent == []
    assert daemon.starts == 1 + len(KILL_AT)
    assert load.acked == MESSAGES
    assert result["dupes"] == {} and result["missing"] == []
    assert result["bad_raw"] == [] and result["bad_files"] == []
    assert result["rows"] == MESSAGES


def test_a_retry_of_stored_bytes_is_stored_once(app):
    """The rule behind "exactly once": same bytes, same envelope sender, same
    mailbox within the window answer with the stored copy; any other byte,
    another sender, or the window switched off stores a new copy."""
    (address,) = make_mailboxes(app, 1, "retry")
    raw = build_message(1, address, [("a.bin", b"\x00\x01" * 500)])
    with app.app_context():
        first = mailhandler.deliver(raw, [address], "s@peer.test")[0].id
        again = mailhandler.deliver(raw, [address], "s@peer.test")[0].id
        other_sender = mailhandler.deliver(raw, [address], "t@peer.test")[0].id
        other_bytes = mailhandler.deliver(raw + b"\r\n", [address], "s@peer.test")[0].id
        app.config["TEMPMAIL"]["dedupe_window_seconds"] = 0
        no_window = mailhandler.deliver(raw, [address], "s@peer.test")[0].id
        stored = db.session.scalar(select(func.count(Message.id)))
    assert again == first
    assert len({first, other_sender, other_bytes, no_window}) == 4 and stored == 4
    record("nothing lost: SMTP", "retried identical bytes answered with the stored copy; "
           "other sender/bytes or dedupe_window_seconds=0 store anew")


def test_the_daemons_batches_apply_the_same_rule(app):
    """The group commit looks earlier copies up once per batch
    (``DeliveryBatch.look_up_earlier``): the same answers as one by one,
    within a batch, across batches, and under a sub-address tag."""
    (address,) = make_mailboxes(app, 1, "batchretry")
    raw = build_message(2, address, [("a.bin", b"\x02" * 700)])
    tagged = address.replace("@", "+shop@")

    def batch(*items) -> list[str]:
        jobs = [smtpserver.Job(bytearray(data), [rcpt], sender, "test", None) for data, rcpt, sender in items]
        with app.app_context():
            smtpserver.store_batch(jobs)
        return [job.reply for job in jobs]

    def count() -> int:
        with app.app_context():
            return db.session.scalar(select(func.count(Message.id)))

    replies = batch((raw, address, "s@peer.test"), (raw, address, "s@peer.test"), (raw, address, "t@peer.test"),
                    (raw + b"\r\n", address, "s@peer.test"), (raw, tagged, "s@peer.test"))
    assert all(r.startswith("250") for r in replies) and count() == 4  # the second is the first
    replies = batch((raw, address, "s@peer.test"), (raw, tagged, "s@peer.test"), (raw, address, "u@peer.test"))
    assert all(r.startswith("250") for r in replies) and count() == 5  # only the new sender stored
    app.config["TEMPMAIL"]["dedupe_window_seconds"] = 0
    batch((raw, address, "s@peer.test"))
    assert count() == 6


def seed_messages(app, address: str, count: int) -> list[int]:
    with app.app_context():
        ids = []
        for n in range(count):
            raw = build_message(n, address, [(f"a{n}.bin", bytes([n % 256]) * 4000),
                                             (f"b{n}.txt", b"text " * 100)], tag="del")
            ids.append(mailhandler.deliver(raw, [address], "s@peer.test")[0].legacy_id)
        return ids


def half_deleted(app) -> dict:
    """Rows without their files, and files without their rows."""
    with app.app_context():
        referenced = set()
        rows_missing = []
        for msg in db.session.scalars(select(Message)):
            paths = [msg.raw_sha256] + [a.sha256 for a in msg.attachments]
            referenced.update(paths)
            if len(msg.attachments) != 2 or not all(storage.blob_path(p).is_file() for p in paths):
                rows_missing.append(msg.id)
        root = storage.uploads_dir()
        files = {p.name: p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                 and not p.name.startswith(".")}  # a blob's file is named by its SHA-256
        orphans = sorted(rel for name, rel in files.items() if name not in referenced)
        return {"rows_without_files": rows_missing, "orphans": orphans,
                "rows": db.session.scalar(select(func.count(Message.id)))}


def test_web_app_killed_during_api_deletes(app, tmp_path):
    """gunicorn SIGKILLed (master and workers) while 8 clients delete messages
    through api.php: no row ever loses a file. Files whose row was deleted
    but not yet unlinked at the kill are orphans that ``flask purge`` removes."""
    (address,) = make_mailboxes(app, 1, "deletes")
    ids = seed_messages(app, address, 300)
    web = Gunicorn(write_config(app, tmp_path / "web.json"), tmp_path / "gunicorn.log", workers=2).start()
    deleted, errors = [], []

    def delete(msg_id: int) -> None:
        try:
            resp = requests.delete(f"{web.url}/api.php/email/{msg_id}", timeout=30)
            (deleted if resp.status_code == 200 else errors).append(msg_id)
        except requests.RequestException:
            errors.append(msg_id)

    try:
        with ThreadPoolExecutor(8) as pool:
            for msg_id in ids:
                pool.submit(delete, msg_id)
            deadline = time.time() + 120
            while len(deleted) < 100 and time.time() < deadline:
                time.sleep(0.002)
            assert len(deleted) >= 100, f"deletes answered: {len(deleted)}, refused: {len(errors)}"
            web.kill()
    finally:
        web.stop()
    state = half_deleted(app)
    with app.app_context():
        swept = retention.remove_orphans(grace_seconds=0)
    after = half_deleted(app)
    record("nothing lost: deletes", f"300 messages x (raw + 2 attachments); gunicorn SIGKILLed after "
           f"{len(deleted)} answered deletes ({len(errors)} cut off); {state['rows']} rows left")
    record("nothing lost: deletes", f"rows without a file: {len(state['rows_without_files'])}; files "
           f"without a row: {len(state['orphans'])} (removed by the orphan sweep: {len(swept)})")
    assert state["rows_without_files"] == []
    assert state["rows"] <= 300 - len(deleted)
    assert set(swept) == set(state["orphans"]) and after["orphans"] == []
    assert after["rows_without_files"] == []
