"""Issue 12's holes, each reproduced and proved closed (items 1, 5, 6, 7, 9
and 11; the others live beside the code they test):

* api.php shows only its own mailboxes; it can be turned off; its ids are
  unpredictable, never reused, below 2^53; the SMTP 250 names a queue id;
  random usernames carry >= 36 bits;
* catch-all obeys reserved_usernames;
* one message to many mailboxes is stored once (content-addressed blobs);
* a full disk: no .tmp left behind, /healthz 503, 452 at MAIL and RCPT;
* huge numbers in paths and queries: 404/400, never 500;
* limits exact under concurrency (quota, sign-in failures), SQLite and PostgreSQL.
"""
from __future__ import annotations

import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import update

import idgen
import limits
import mailhandler
import storage
from models import ApiKey, Blob, Domain, Mailbox, Message, QuotaUsage, User, db

from .helpers import build_message, in_process_session, record


def keyed_user(app, email: str, password: str | None = None) -> str:
    with app.app_context():
        user = User.create(email, password=password)
        _, raw = ApiKey.issue(user)
        db.session.commit()
        return raw


# --------------------------------------------------------------------------
# 1. api.php isolation, ids, queue ids, random names

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_api_php_sees_only_its_own_mailboxes(app, backend):
    client = app.test_client()
    key = keyed_user(app, "owner@users.test")
    api_box = client.post("/api/emails", headers={"Authorization": f"Bearer {key}"}).get_json()["data"]["email"]
    client.get("/")  # the web page gives this browser a mailbox
    with app.app_context():
        web_box = db.session.scalar(db.select(Mailbox).where(Mailbox.origin == "web")).address
        legacy = Mailbox.create("legacybox", Domain.by_name("example.com"), 3600)
        own = {}
        for address in (api_box, web_box, legacy.address):
            (msg,) = mailhandler.deliver(build_message(1, address, [("s.txt", address.encode())]), [address])
            own[address] = (msg.legacy_id, msg.attachments[0].legacy_url())
    probes = 0
    for address in (api_box, web_box):
        msg_id, att_url = own[address]
        inbox = client.get(f"/api.php/inbox/{address}")
        assert inbox.status_code == 404 and inbox.get_json() == {
            "error": "Email not found", "searched_for": address,
            "hint": "Generate this email first via /generate endpoint"}
        for method, url in (("GET", f"/email/{msg_id}"), ("DELETE", f"/api.php/email/{msg_id}"),
                            ("GET", att_url), ("GET", "/api.php" + att_url)):
            resp = client.open(url, method=method)
            assert resp.status_code == 404, (method, url)
            probes += 1
    legacy_id, legacy_att = own[legacy.address]
    assert client.get(f"/email/{legacy_id}").status_code == 200
    assert client.get(legacy_att).data == legacy.address.encode()
    with app.app_context():
        assert db.session.query(Message).filter(Message.is_read.is_(True)).count() == 1
    record("trust", f"{backend}: api.php on User API and web-page mailboxes: {probes} probes -> 404 "
           f"(inbox body identical to an unknown address); the owners' mail untouched and unread")


def test_legacy_api_can_be_turned_off(app_factory):
    client = app_factory({"legacy_api": {"enabled": False}}).test_client()
    paths = ["/generate", "/api.php/generate", "/inbox/a@example.com", "/api.php/stats", "/domains",
             "/email/1", "/uploads/attachments/1/x"]
    for path in paths:
        resp = client.get(path)
        assert resp.status_code == 404 and resp.get_json()["error"].startswith("Invalid endpoint"), path
    assert client.get("/docs").status_code == 200
    record("trust", f"legacy_api.enabled=false: {len(paths)} api.php routes -> 404 Invalid endpoint")


def test_legacy_ids_are_unpredictable_never_reused_and_below_2_53(app):
    with app.app_context():
        box = Mailbox.create("idcheck", Domain.by_name("example.com"), 3600)
        shown, internal = [], []
        for n in range(40):
            (msg,) = mailhandler.deliver(build_message(n, box.address), [box.address])
            shown.append(msg.legacy_id)
            internal.append(msg.id)
        top = db.session.get(Message, internal[-1])
        import storage as st
        st.commit_removal(top.delete())  # SQLite would hand this id out again without AUTOINCREMENT
        (after,) = mailhandler.deliver(build_message(99, box.address), [box.address])
        assert after.id > internal[-1] and after.legacy_id not in shown
        assert all(0 <= s < 2 ** 53 for s in shown + [after.legacy_id])
    diffs = {b - a for a, b in zip(shown, shown[1:])}
    assert len(diffs) == len(shown) - 1  # no common step between neighbours
    assert sorted(shown) != shown
    record("trust", "api.php ids: 40 consecutive messages -> 39 distinct gaps, not ascending, all < 2^53; "
           "the top id deleted, the next message got a new internal and shown id")


def test_smtp_reply_names_a_queue_id(app):
    with app.app_context():
        Mailbox.create("queued", Domain.by_name("example.com"), 3600)
    replies = []
    with in_process_session(app) as conn:
        for n in range(3):
            conn.mail("s@peer.test")
            conn.rcpt("queued@example.com")
            replies.append(conn.data(build_message(n, "queued@example.com"))[1].decode())
    ids = [re.fullmatch(r"2\.0\.0 Ok: queued as ([0-9A-F]{12})", r).group(1) for r in replies]
    assert len(set(ids)) == 3
    record("trust", f"SMTP 250 names a random queue id ({ids[0]}), never a message id")


def test_random_usernames_carry_36_bits(app):
    bits = math.log2(len(idgen.ADJECTIVES) * len(idgen.NOUNS) * 10 ** 7)
    with app.app_context():
        names = {idgen.random_username() for _ in range(2000)}
    assert bits >= 36 and len(names) == 2000
    assert all(re.fullmatch(r"[a-z]{2,12}[0-9]{7}", n) and len(n) <= 20 for n in names)
    record("trust", f"random usernames: {bits:.1f} bits (e.g. {sorted(names)[0]}), 2,000 drawn, no repeat")


# --------------------------------------------------------------------------
# 5. catch-all and reserved names

def test_catch_all_refuses_reserved_names(app_factory):
    app = app_factory({"catch_all": True})
    refused = []
    with in_process_session(app) as conn:
        conn.mail("ca@peer.test")
        for name in ("admin", "postmaster", "hostmaster", "webmaster", "abuse", "root"):
            code, _ = conn.rcpt(f"{name}@example.com")
            refused.append((name, code))
    assert all(code == 550 for _, code in refused)
    with app.app_context():
        assert db.session.query(Mailbox).count() == 0
    record("trust", f"catch-all on: {len(refused)} reserved names (admin, postmaster, ...) -> 550 at RCPT, "
           "no mailbox created")


# --------------------------------------------------------------------------
# 6. one blob per distinct content

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_one_message_to_many_mailboxes_is_stored_once(app, backend):
    attachment = bytes(range(256)) * 8000  # 2 MB
    with app.app_context():
        boxes = [Mailbox.create(f"many{i}", Domain.by_name("example.com"), 3600).address for i in range(10)]
        raw = build_message(1, boxes[0], [("big.bin", attachment)])
        msgs = mailhandler.deliver(raw, boxes)
        root = storage.uploads_dir()
        on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        assert len(msgs) == 10 and db.session.query(Blob).count() == 2
        # the raw message once, plus its decoded attachment once: not 10 copies
        assert on_disk < 2 * len(raw)
        for msg in msgs[:9]:
            storage.commit_removal(msg.delete())
        assert storage.blob_path(msgs[9].raw_sha256).exists()
        storage.commit_removal(msgs[9].delete())
        assert db.session.query(Blob).count() == 0
        left = [p for p in root.rglob("*") if p.is_file()]
    assert left == []
    record("trust", f"{backend}: a {len(raw) / 1e6:.2f} MB message to 10 mailboxes -> {on_disk / 1e6:.2f} MB "
           "on disk (was 35.3 MB); freed when the last copy went")


# --------------------------------------------------------------------------
# 7. a full disk

def test_full_disk_leaves_no_tmp_and_is_reported(app_factory, monkeypatch):
    app = app_factory({"storage": {"min_free_bytes": 10 ** 18}})  # "below the floor" on any disk
    client = app.test_client()
    health = client.get("/healthz")
    assert health.status_code == 503 and health.get_json()["uploads"] == "full"
    with app.app_context():
        Mailbox.create("fullbox", Domain.by_name("example.com"), 3600)
    with in_process_session(app) as conn:
        mail_code, mail_text = conn.mail("s@peer.test")
    assert mail_code == 452 and mail_text.startswith(b"4.3.1")

    app = app_factory()
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(".tmp") and "w" in mode:
            class Full:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    handle.close()

                def write(self, _data):
                    raise OSError(28, "No space left on device")
            return Full()
        return handle
    monkeypatch.setattr("builtins.open", failing_open)
    with app.app_context():
        box = Mailbox.create("tmpcheck", Domain.by_name("example.com"), 3600)
        for n in range(2):
            with pytest.raises(mailhandler.StoreFailed):
                mailhandler.deliver(build_message(n, box.address, [("a.bin", b"x" * 1000)]), [box.address])
        leftovers = [p.name for p in Path(app.config["UPLOADS_DIR"]).rglob("*") if p.is_file()]
    assert leftovers == []
    record("trust", "disk full: /healthz 503 'full', MAIL -> 452 4.3.1; 2 failed writes left 0 .tmp files")


# --------------------------------------------------------------------------
# 9. out-of-range numbers

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_huge_numbers_never_reach_the_database(app, backend):
    client = app.test_client()
    client.get("/")
    huge = ["99999999999999999999999", "9223372036854775808", "18446744073709551616", "-1", "0x10",
            "2147483648", "987654", "4503599627370495"]
    seen = []
    for n in huge:
        for path in (f"/uploads/attachments/{n}/x", f"/api.php/uploads/attachments/{n}/x", f"/email/{n}",
                     f"/api.php/email/{n}", f"/web/messages/{n}", f"/web/messages/{n}/body",
                     f"/web/messages/{n}/raw", f"/web/messages/{n}/attachments/{n}"):
            status = client.get(path).status_code
            seen.append(status)
            assert status == 404, path
        for query in (f"?limit={n}", f"?offset={n}"):
            status = client.get(f"/api.php/inbox/nobody@example.com{query}").status_code
            assert status in (400, 404)
    record("trust", f"{backend}: {len(seen)} paths with numbers beyond 2^31/2^63, negative or hex -> 404, no 500")


# --------------------------------------------------------------------------
# 11. exact limits

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_quota_is_exact_under_concurrency(app_factory, backend, tmp_path):
    from .helpers import Gunicorn, write_config
    app = app_factory()
    key = keyed_user(app, "quota@users.test")
    with app.app_context():
        user = User.by_email("quota@users.test")
        QuotaUsage.reserve(user.id, limits.quota_period(), 10)
        db.session.execute(update(QuotaUsage).where(QuotaUsage.user_id == user.id).values(used=49_995))
        db.session.commit()
    import requests
    server = Gunicorn(write_config(app, tmp_path / "quota.json"), tmp_path / "gunicorn.log", workers=4).start()
    try:
        def call(_n):
            return requests.get(server.url + "/api/domains", headers={"Authorization": f"Bearer {key}"},
                                timeout=60).status_code
        with ThreadPoolExecutor(max_workers=40) as pool:
            codes = list(pool.map(call, range(40)))
    finally:
        server.stop()
    with app.app_context():
        used = QuotaUsage.used_in(User.by_email("quota@users.test").id, limits.quota_period())
    assert codes.count(200) == 5 and codes.count(429) == 35 and used == 50_000
    record("trust", f"{backend}: 40 parallel requests at 49,995/50,000 over 4 gunicorn workers -> "
           f"{codes.count(200)} x 200, {codes.count(429)} x 429, used ends at {used}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_sign_in_failures_are_exact_under_concurrency(app, backend):
    keyed_user(app, "victim@users.test", password="correct horse battery")
    app.config["WTF_CSRF_ENABLED"] = False
    checked = []
    original = User.check_password
    lock = threading.Lock()

    def counting(self, password):
        with lock:
            checked.append(password)
        return original(self, password)

    import accounts
    real_auth = accounts.authenticate

    def auth(email, password):
        with lock:
            checked.append(password)
        return real_auth(email, password)
    accounts.authenticate = auth
    try:
        def attempt(n):
            return app.test_client().post("/signin", data={"email": "victim@users.test",
                                                           "password": f"wrong {n}"}).status_code
        with ThreadPoolExecutor(max_workers=30) as pool:
            codes = list(pool.map(attempt, range(30)))
    finally:
        accounts.authenticate = real_auth
    assert len(checked) == 10 and codes.count(401) == 10 and codes.count(429) == 20
    record("trust", f"{backend}: 30 parallel wrong passwords, limit 10 -> {len(checked)} checked, "
           f"{codes.count(429)} refused with 429")
